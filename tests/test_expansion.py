"""Expand / contract without Lightning: every preset on tiny HF models built from configs (no hub downloads).

For every preset: zero-initialised writing weights make expansion function-preserving bit for bit, and
``contract(expand(model))`` gives back exactly the original weights, keys and size attributes. Unit groups,
zero-ablation, state-dict contraction, the record's round trip and every bad-input error are checked too.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from era_models import HIDDEN, NEURONS, PRESET_MODELS, SEQ, VOCAB, gpt2, gpt_neo, llama
from torch import Tensor, nn

from lightning_gradroute import Expansion, ExpansionRecord, contract, expand, expansion_record, zero_expanded
from lightning_gradroute.expansion import ablate_state_dict


def ids(seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).logits


def size_attrs(model: nn.Module) -> dict[str, tuple]:
    keys = ("in_features", "out_features", "nf", "nx", "num_heads", "split_size")
    return {n: tuple(getattr(m, k, None) for k in keys) for n, m in model.named_modules()}


@pytest.mark.parametrize("preset", sorted(PRESET_MODELS))
def test_every_preset_preserves_the_function_and_contracts_exactly(preset: str) -> None:
    factory, pattern = PRESET_MODELS[preset]
    torch.manual_seed(0)
    model = factory().eval()
    before, attrs, x = {k: v.clone() for k, v in model.state_dict().items()}, size_attrs(model), ids()
    reference = logits(model, x)
    add = 2 if preset.endswith("attn") else 5
    record = expand(model, [Expansion(pattern, preset=preset, add=add)])
    grown = {k: v.shape for k, v in model.state_dict().items() if v.shape != before[k].shape}
    assert grown and set(grown) == set(record.params) and model.state_dict().keys() == before.keys()
    assert torch.equal(logits(model, x), reference)  # bit-identical
    model.train()
    model(x, labels=x).loss.backward()  # new units are trainable parameters in the graph
    assert all(model.get_parameter(name).grad is not None for name in record.params)
    contract(model)
    assert expansion_record(model) is None and size_attrs(model) == attrs
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(logits(model.eval(), x), reference)


def test_unit_groups_of_an_mlp_and_of_fused_gpt2_heads() -> None:
    neo = gpt_neo()
    record = expand(neo, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=4)])
    new, old = list(range(NEURONS, NEURONS + 4)), list(range(NEURONS))
    for layer in (0, 1):
        for site in [("c_fc", "output"), ("act", "input"), ("act", "output"), ("c_proj", "input")]:
            assert record.unit_groups[(f"transformer.h.{layer}.mlp.{site[0]}", site[1])] == {
                "expanded": new, "original": old}
    assert neo.transformer.h[0].mlp.c_fc.out_features == NEURONS + 4

    model = gpt2()
    record = expand(model, [Expansion("transformer.h.0.attn", preset="gpt2_attn", add=1)])
    head = HIDDEN // 2  # 2 heads
    fused = record.unit_groups[("transformer.h.0.attn.c_attn", "output")]["expanded"]
    widths = HIDDEN + head
    assert fused == [i + part * widths for part in range(3) for i in range(HIDDEN, widths)]  # q, k and v each
    assert record.unit_groups[("transformer.h.0.attn.c_proj", "input")]["expanded"] == list(range(HIDDEN, widths))
    attn = model.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf) == (3, widths, 3 * widths)


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
    assert model.encoder[0].weight.shape == (9, 4) and model.encoder[2].weight.shape == (3, 9)
    assert torch.equal(model(x), reference)
    assert torch.count_nonzero(model.encoder[2].weight[:, 6:]) == 0 and model.encoder[0].weight[6:].std() > 0.2
    assert record.unit_groups[("encoder.1", "output")] == {"expanded": [6, 7, 8], "original": list(range(6))}
    contract(model)

    writes = Expansion("encoder", preset="linear_pair", add=3, output_init="match", up=("0",), down=("2",))
    expand(model, [writes])
    assert not torch.equal(model(x), reference)  # random writing weights change the function
    zeros = Expansion("encoder", preset="linear_pair", add=3, init="zeros", up=("0",), down=("2",))
    contract(model)
    expand(model, [zeros])
    assert torch.count_nonzero(model.encoder[0].weight[6:]) == 0


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
    assert all(torch.equal(offline_zero[k], v) for k, v in zeroed.state_dict().items())
    zero_logits = logits(zeroed, x)
    contract(model)
    assert all(torch.equal(offline[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits(model, x), zero_logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="has no 'prefix.model.layers.0.mlp"):
        ablate_state_dict(expanded, record, prefix="prefix.")


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
    assert expansion_record(model) is None and model.transformer.h[0].mlp.c_fc.out_features == NEURONS
    with pytest.raises(ValueError, match="multiple of the 2 query heads per key/value head"):
        expand(llama(), [Expansion("model.layers.*.self_attn", preset="llama_attn", add=3)])
    with pytest.raises(ValueError, match="is not expanded"):
        contract(model)


def test_expanded_models_refuse_other_expansions_and_mismatched_state_dicts() -> None:
    model, plain = gpt_neo(), gpt_neo()
    expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=4)])
    with pytest.raises(ValueError, match=r"already expanded with \[transformer.h.\*.mlp \+4 \(gpt_neo_mlp\)\]"):
        expand(model, [Expansion("transformer.h.*.mlp", preset="gpt_neo_mlp", add=8)])
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.weight' has shape \(32, 16\) but the model "
                                         r"expanded with \[transformer.h.\*.mlp \+4 \(gpt_neo_mlp\)\] has \(36, 16\)"):
        model.load_state_dict(plain.state_dict())
    contract(model)
    model.load_state_dict(plain.state_dict())  # the check leaves with the expansion
