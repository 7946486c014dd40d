"""Expand / contract without Lightning: every preset on tiny HF models built from configs (no hub downloads).

What "exact" means here, and why it holds on any CPU: an expansion never widens a layer. Each original layer
runs its own ``forward`` on a tensor of its original shape and memory layout (checked below by spying on the
layers' own ``forward``), so it takes the same kernel as without the expansion, and the new units join through
``+ x_new @ 0`` (exactly ``+ 0``). Hence, with zero writing weights, MLP and ``linear_pair`` expansions are
bit-identical to the original model for any BLAS and thread count. Attention-head presets run the attention
kernel over more heads, so they are asserted to a tolerance. Contraction gives back the very parameters.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from era_models import HIDDEN, NEURONS, PRESET_MODELS, SEQ, VOCAB, gpt2, gpt_neo, llama
from torch import Tensor, nn

from lightning_gradroute import (
    Expansion,
    ExpansionRecord,
    ablate_state_dict,
    contract,
    expand,
    expansion_record,
    zero_expanded,
)
from lightning_gradroute.era import Phase, era_state
from lightning_gradroute.new_units import NewUnits

MLP_PRESETS = sorted(p for p in PRESET_MODELS if not p.endswith("attn"))


def ids(seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).logits


def size_attrs(model: nn.Module) -> dict[str, tuple]:
    keys = ("in_features", "out_features", "nf", "nx", "num_heads", "split_size")
    return {n: tuple(getattr(m, k, None) for k in keys) for n, m in model.named_modules()}


@contextmanager
def own_forward_inputs(classes: set[type]) -> Iterator[list[tuple[int, tuple, tuple, Tensor]]]:
    """Record ``(id(module), shape, stride, value)`` of the input of every call of these classes' own forward."""
    calls: list[tuple[int, tuple, tuple, Tensor]] = []
    originals = {cls: cls.__dict__["forward"] for cls in classes}

    def spy(original: Any) -> Any:
        def forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append((id(self), tuple(x.shape), x.stride(), x.detach().clone()))
            return original(self, x, *args, **kwargs)

        return forward

    for cls, original in originals.items():
        cls.forward = spy(original)
    try:
        yield calls
    finally:
        for cls, original in originals.items():
            cls.forward = original


@pytest.mark.parametrize("preset", sorted(PRESET_MODELS))
def test_every_preset_preserves_the_function_and_contracts_to_the_very_parameters(preset: str) -> None:
    factory, pattern = PRESET_MODELS[preset]
    torch.manual_seed(0)
    model = factory().eval()
    params = dict(model.named_parameters())
    before, attrs, x = {k: v.clone() for k, v in model.state_dict().items()}, size_attrs(model), ids()
    reference = logits(model, x)
    add = 2 if preset.endswith("attn") else 5
    record = expand(model, [Expansion(pattern, preset=preset, add=add)])
    state = model.state_dict()
    assert set(state) - set(before) == set(record.params)  # the new units are new keys ...
    assert all(torch.equal(state[k], v) for k, v in before.items())  # ... and the original ones untouched
    assert all(model.get_parameter(n) is p for n, p in params.items())  # the very same Parameter objects
    if preset in MLP_PRESETS:
        assert torch.equal(logits(model, x), reference)  # bit-identical
    else:
        torch.testing.assert_close(logits(model, x), reference, rtol=1e-5, atol=1e-6)
    model.train()
    model(x, labels=x).loss.backward()  # new units are trainable parameters in the graph
    assert all(model.get_parameter(name).grad is not None for name in record.params)
    contract(model)
    assert expansion_record(model) is None and era_state(model).phase is Phase.CONTRACTED
    assert size_attrs(model) == attrs and dict(model.named_parameters()) == params
    assert not any(hasattr(m, "new_units") or "forward" in vars(m) for m in model.modules())
    assert torch.equal(logits(model.eval(), x), reference)


@pytest.mark.parametrize("preset", sorted(PRESET_MODELS))
def test_original_layers_run_on_tensors_of_their_original_shape_and_layout(preset: str) -> None:
    """The portable reason for exactness: same shape, strides and values in, so the same kernel on any machine."""
    factory, pattern = PRESET_MODELS[preset]
    torch.manual_seed(1)
    model, x = factory().eval(), ids(1)
    probe = expand(factory(), [Expansion(pattern, preset=preset, add=2)])  # which layers an expansion touches
    classes = {type(model.get_submodule(name)) for name in probe.layers}
    with own_forward_inputs(classes) as plain:
        logits(model, x)
    record = expand(model, [Expansion(pattern, preset=preset, add=2)])
    with own_forward_inputs(classes) as expanded:
        logits(model, x)
    touched = {id(model.get_submodule(name)) for name in record.layers}
    first_calls: dict[int, tuple] = {}
    for call in expanded:
        first_calls.setdefault(call[0], call)  # an elementwise layer runs twice: original units first
    compared = [call for call in plain if call[0] in touched]
    assert {call[0] for call in compared} == touched
    for module_id, shape, stride, value in compared:
        _, shape_e, stride_e, value_e = first_calls[module_id]
        assert (shape_e, stride_e) == (shape, stride)
        if preset in MLP_PRESETS:
            assert torch.equal(value_e, value)
        else:  # the attention kernel ran over more heads before the output projection
            torch.testing.assert_close(value_e, value, rtol=1e-5, atol=1e-6)


def test_unit_groups_of_an_mlp_and_of_fused_gpt2_heads() -> None:
    neo = gpt_neo()
    record = expand(neo, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=4)])
    new, old = list(range(NEURONS, NEURONS + 4)), list(range(NEURONS))
    for layer in (0, 1):
        for site in [("c_fc", "output"), ("act", "input"), ("act", "output"), ("c_proj", "input")]:
            assert record.unit_groups[(f"transformer.h.{layer}.mlp.{site[0]}", site[1])] == {
                "expanded": new, "original": old}
    assert neo.transformer.h[0].mlp.c_fc(torch.zeros(2, HIDDEN)).shape == (2, NEURONS + 4)
    assert record.layers["transformer.h.0.mlp.act"] == {"role": "elementwise", "size": NEURONS,
                                                        "inserts": [[NEURONS, 4]]}

    model = gpt2()
    record = expand(model, [Expansion("transformer.h.0.attn", preset="gpt2_attn", add=1)])
    head = HIDDEN // 2  # 2 heads
    fused = record.unit_groups[("transformer.h.0.attn.c_attn", "output")]["expanded"]
    widths = HIDDEN + head
    assert fused == [i + part * widths for part in range(3) for i in range(HIDDEN, widths)]  # q, k and v each
    assert record.unit_groups[("transformer.h.0.attn.c_proj", "input")]["expanded"] == list(range(HIDDEN, widths))
    attn = model.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.new_units.weight.shape) == (3, widths, (3 * head, HIDDEN))
    hidden = torch.randn(2, 3, HIDDEN)
    out = attn.c_attn(hidden)  # the new q/k/v columns are interleaved after each original part
    assert torch.equal(out[..., :HIDDEN], type(attn.c_attn).forward(attn.c_attn, hidden)[..., :HIDDEN])


@pytest.mark.parametrize("inserts", [[(6, 3)], [(2, 1), (4, 2), (6, 1)]], ids=["one", "fused"])
def test_new_units_split_and_interleave_have_exact_gradients(inserts: list[tuple[int, int]]) -> None:
    units = NewUnits("elementwise", 6, inserts)
    x = torch.randn(2, 3, 6 + units.added, dtype=torch.float64, requires_grad=True)
    assert torch.equal(units.interleave(*units.split(x, "t")), x)
    torch.autograd.gradcheck(lambda t: units.split(t, "t"), (x,))
    torch.autograd.gradcheck(lambda t: units.split(t, "t")[0].sin(), (x,))  # the new part unused downstream
    torch.autograd.gradcheck(lambda t: units.split(t, "t")[1].sin(), (x,))  # the original part unused
    with pytest.raises(ValueError, match=r"t: expanded to 10 input features \(6 \+ 4 new\) but called with 9"):
        NewUnits("elementwise", 6, [(2, 1), (4, 2), (6, 1)]).split(torch.zeros(9), "t")


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


def test_linear_pair_on_a_custom_module_with_init_options() -> None:
    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(5, 4)
    reference = model(x).detach()
    spec = Expansion("encoder", preset="linear_pair", add=3, init=0.5, up=("0",), down=("2",), between=("1",))
    record = expand(model, [spec])
    assert model.encoder[0].weight.shape == (6, 4) and model.encoder[0].new_units.weight.shape == (3, 4)
    assert model.encoder[2].new_units.weight.shape == (3, 3) and model.encoder[2].new_units.bias is None
    assert torch.equal(model(x), reference)
    assert torch.count_nonzero(model.encoder[2].new_units.weight) == 0 and model.encoder[0].new_units.weight.std() > 0.2
    assert torch.count_nonzero(model.encoder[0].new_units.bias) == 0
    assert record.unit_groups[("encoder.1", "output")] == {"expanded": [6, 7, 8], "original": list(range(6))}
    contract(model)

    writes = Expansion("encoder", preset="linear_pair", add=3, output_init="match", up=("0",), down=("2",))
    expand(model, [writes])
    assert not torch.equal(model(x), reference)  # random writing weights change the function
    zeros = Expansion("encoder", preset="linear_pair", add=3, init="zeros", up=("0",), down=("2",))
    contract(model)
    expand(model, [zeros])
    assert torch.count_nonzero(model.encoder[0].new_units.weight) == 0


def test_zero_ablation_equals_contraction_and_state_dicts_ablate_offline() -> None:
    torch.manual_seed(0)
    model, x = llama(), ids()
    record = expand(model, [Expansion("model.layers.*.mlp", preset="llama_mlp", add=4),
                            Expansion("model.layers.*.self_attn", preset="llama_attn", add=2)])
    with torch.no_grad():
        for p in model.parameters():  # "training" reaches every new weight
            p.add_(0.05 * torch.randn_like(p))
    expanded = {k: v.clone() for k, v in model.state_dict().items()}
    offline, offline_zero = ablate_state_dict(expanded, record), ablate_state_dict(expanded, record, mode="zero")
    zeroed = zero_expanded(model)
    assert era_state(model).phase is Phase.ZEROED
    assert all(torch.equal(offline_zero[k], v) for k, v in zeroed.state_dict().items())
    zero_logits = logits(zeroed, x)
    contract(model)
    assert model.state_dict().keys() == offline.keys()
    assert all(torch.equal(offline[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, x), zero_logits, rtol=1e-5, atol=1e-6)  # more heads in the kernel
    with pytest.raises(ValueError, match="has no 'prefix.model.layers.0.mlp"):
        ablate_state_dict(expanded, record, prefix="prefix.")


def test_zeroed_mlp_units_are_bit_identical_to_contraction() -> None:
    torch.manual_seed(0)
    model, x = gpt_neo(), ids()
    expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=4, output_init="match")])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    zero_logits = logits(zero_expanded(model), x)
    assert torch.equal(logits(contract(model), x), zero_logits)


def test_record_round_trips_through_json_and_torch_save() -> None:
    model = gpt2()
    record = expand(model, [Expansion("transformer.h.*.mlp", preset="gpt2_mlp", add=3)])
    again = ExpansionRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and again.spec_hash == record.spec_hash
    buffer = io.BytesIO()
    torch.save({"gradroute": record.to_dict()}, buffer)
    buffer.seek(0)
    assert ExpansionRecord.from_dict(torch.load(buffer)["gradroute"]) == record
    assert expand(model, [Expansion("transformer.h.*.mlp", preset="gpt2_mlp", add=3, init=0.1)]) is record


def test_bad_specs_fail_in_the_constructor() -> None:
    with pytest.raises(ValueError, match="unknown preset 'gpt3_mlp'; presets are"):
        Expansion("transformer.h.*.mlp", preset="gpt3_mlp")
    with pytest.raises(ValueError, match="add must be a positive integer"):
        Expansion("transformer.h.*.mlp", preset="gpt2_mlp", add=0)
    with pytest.raises(ValueError, match="init must be 'match', 'zeros' or a std"):
        Expansion("transformer.h.*.mlp", preset="gpt2_mlp", init="kaiming")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'linear_pair' needs up=.* and down="):
        Expansion("encoder", up=("0",))
    with pytest.raises(ValueError, match="up/down/between only apply to preset 'linear_pair'"):
        Expansion("transformer.h.*.mlp", preset="gpt2_mlp", up=("c_fc",))
    with pytest.raises(ValueError, match="regex"):
        Expansion("re:transformer.h.(", preset="gpt2_mlp")


def test_models_that_do_not_fit_are_clear_errors_and_stay_untouched() -> None:
    model = gpt_neo()
    with pytest.raises(ValueError, match=r"pattern 'transformer.layers.\*.mlp' matches no module .*closest names"):
        expand(model, [Expansion("transformer.layers.*.mlp", preset="gpt_neo_mlp")])
    with pytest.raises(ValueError, match=r"'c_fc' is a Linear, the preset expects Conv1D"):
        expand(model, [Expansion("transformer.h.*.mlp", preset="gpt2_mlp")])
    with pytest.raises(ValueError, match=r"at 'transformer.h.0.mlp': no submodule 'gate_proj' \(children: c_fc"):
        expand(model, [Expansion("transformer.h.*.mlp", preset="llama_mlp")])
    with pytest.raises(ValueError, match="no integer head_dim; it is not an attention module"):
        expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_attn")])
    with pytest.raises(ValueError, match=r"'act' is a NewGELUActivation, not an nn.Linear"):
        expand(model, [Expansion("transformer.h.*.mlp", preset="linear_pair", up=("c_fc",), down=("act",))])
    with pytest.raises(ValueError, match="grown by two expansions"):
        expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp"),
                       Expansion("transformer.h.0.mlp", preset="gpt_neo_mlp")])
    assert era_state(model) is None and not any(hasattr(m, "new_units") for m in model.modules())
    with pytest.raises(ValueError, match="multiple of the 2 query heads per key/value head"):
        expand(llama(), [Expansion("model.layers.*.self_attn", preset="llama_attn", add=3)])
    with pytest.raises(ValueError, match="is not expanded"):
        contract(model)


def test_a_module_shared_by_two_places_cannot_take_new_units() -> None:
    shared_act = nn.GELU()
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), shared_act, nn.Linear(6, 4)),
        nn.Sequential(nn.Linear(4, 6), shared_act, nn.Linear(6, 4)),
    )
    with pytest.raises(ValueError, match=r"expand: '0.1' is the same module as '1.1'; a shared module cannot"):
        expand(model, [Expansion("0", preset="linear_pair", add=2, up=("0",), down=("2",), between=("1",))])
    assert not hasattr(shared_act, "new_units")


def test_expanded_models_refuse_other_expansions_and_mismatched_state_dicts() -> None:
    model, plain = gpt_neo(), gpt_neo()
    expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=4)])
    with pytest.raises(ValueError, match=r"already expanded with \[transformer.h.\*.mlp \+4 \(gpt_neo_mlp\)\]"):
        expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=8)])
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"transformer.h.0.mlp.c_fc.new_units"):
        model.load_state_dict(plain.state_dict())
    wider = gpt_neo()
    expand(wider, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=8)])
    with pytest.raises(RuntimeError, match=r"size mismatch for transformer.h.0.mlp.c_fc.new_units.weight"):
        model.load_state_dict(wider.state_dict())
    contract(model)
    model.load_state_dict(plain.state_dict())  # the original architecture again
