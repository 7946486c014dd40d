"""The steering scalar: residual-dimension routing at a block output (exact gradients), the steering hook, the
nearest-unembedding evaluation, and a routed fit under DDP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers
from helpers import hook_count, trainer_kwargs
from torch import Tensor, nn

from lightning_gradroute import GradientRouter, GradientRoutingCallback, Route, Target
from gradroute_experiments.text.causal_lm import CausalLM
from gradroute_experiments.steering.evaluate import SteeringEvaluation, unembedding_cosines
from gradroute_experiments.tinystories.data import TinyStoriesDataModule
from lightning_gradroute.steering import steer
from lightning_gradroute.text_labels import TokenSetLabels

VOCAB, HIDDEN = 40, 16


def llama(layers: int = 3, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=True,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def next_token_loss(model: nn.Module, ids: Tensor) -> Tensor:
    logits = model(input_ids=ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


# ------------------------------------------------------------------------------------------------- routing
def test_llama_and_qwen2_blocks_return_the_residual_stream_as_a_tensor() -> None:
    """The recipes route ``model.model.layers.*`` without ``output_index``: that needs tensor outputs."""
    for model_type in ("llama", "qwen2"):
        config = transformers.AutoConfig.for_model(
            model_type, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=32,
        )
        model = transformers.AutoModelForCausalLM.from_config(config)
        seen: list[Any] = []
        model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
        assert isinstance(seen[0], Tensor) and seen[0].shape == (1, 3, HIDDEN), model_type


def test_residual_dimension_routing_at_block_outputs_equals_an_independent_computation() -> None:
    """The steering-scalar route: positions predicting the target learn through residual dim 0 only, at the outputs
    of blocks 1-2; compared with the delta form ``a.detach() + m * (a - a.detach())`` and a hand-built mask."""
    model = llama()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    target = int(ids[0, 3])
    labels = TokenSetLabels([target], label=1, other=0)({"input_ids": ids})  # (3, 8): keyed by the next token
    assert labels.sum() >= 1 and labels.shape == (3, 8)
    router = GradientRouter(
        targets={"residual": Target("model.layers.[1-2]")},
        routes=[Route("target", "residual", {"1:": 0.0})],
        labels=["other", "target"],
    )
    with router.attached(model):
        with router.route(labels):
            next_token_loss(model, ids).backward()
    routed = {n: p.grad.clone() for n, p in model.named_parameters()}

    mask = torch.ones(3, 8, HIDDEN)
    mask[labels == 1] = torch.nn.functional.one_hot(torch.tensor(0), HIDDEN).float()

    def delta(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return out.detach() + mask * (out - out.detach())

    handles = [model.model.layers[i].register_forward_hook(delta) for i in (1, 2)]
    params = dict(model.named_parameters())
    expected = dict(zip(params, torch.autograd.grad(next_token_loss(model, ids), list(params.values()))))
    for handle in handles:
        handle.remove()
    unrouted = dict(zip(params, torch.autograd.grad(next_token_loss(model, ids), list(params.values()))))
    for name in params:
        torch.testing.assert_close(routed[name], expected[name], msg=name)
    differs = [n for n in params if not torch.allclose(routed[n], unrouted[n])]
    assert "model.layers.0.mlp.down_proj.weight" in differs and "model.layers.1.mlp.down_proj.weight" in differs
    # Above the routed blocks nothing changes: block 2's output is routed, the final norm and head are not.
    torch.testing.assert_close(routed["model.norm.weight"], unrouted["model.norm.weight"])


def test_block_routing_keeps_only_dim_0_of_the_residual_gradient() -> None:
    """At a routed position the gradient leaving a routed block output has dims 1: zeroed; elsewhere it is kept."""
    model = llama(layers=2)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[0, 2] = labels[1, 4] = 1
    grads: list[Tensor] = []
    # registered before the router's hook, so it sees the block's own output: its gradient is the routed one
    def capture(module: nn.Module, args: Any, out: Tensor) -> None:
        out.register_hook(grads.append)

    model.model.layers[1].register_forward_hook(capture)
    router = GradientRouter({"r": Target("model.layers.1")}, [Route("target", "r", {"1:": 0.0})], ["other", "target"])
    with router.attached(model), router.route(labels):
        next_token_loss(model, ids).backward()
    (grad,) = grads
    assert grad[0, 2, 1:].abs().sum() == 0 and grad[1, 4, 1:].abs().sum() == 0
    assert grad[0, 2, 0] != 0 and grad[1, 4, 0] != 0
    assert (grad[0, :2, 1:] != 0).all() and (grad[1, :4, 1:] != 0).all()


# --------------------------------------------------------------------------------------------- steering
def test_steer_adds_the_value_to_one_dimension_at_every_position_and_removes_its_hook() -> None:
    model = llama()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    seen: list[Tensor] = []
    model.model.layers[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids)
        with steer(model, "model.layers.1", dim=0, value=-3.5) as hook:
            steered_logits = model(input_ids=ids).logits
        plain_logits = model(input_ids=ids).logits
    plain, steered = seen[0], seen[1]
    expected = plain.clone()
    expected[..., 0] += -3.5
    assert torch.equal(steered, expected)  # the same float addition: bit for bit
    assert hook.calls == 1 and hook_count(model) == 1  # only the test's own pre-hook is left
    assert not torch.equal(steered_logits, plain_logits)
    torch.testing.assert_close(seen[2], plain)


def test_steer_runs_at_every_generation_step_and_on_plain_modules() -> None:
    model = llama().eval()
    prompt = torch.zeros(2, 1, dtype=torch.long)
    config = transformers.GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    with steer(model, "model.layers.2", dim=3, value=50.0) as hook:
        steered = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    assert hook.calls == 5  # one forward per new token (KV cache): every position is steered
    plain = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    assert not torch.equal(steered, plain)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    with steer(net, "1", dim=-1, value=2.0):
        out = net(x)
    torch.testing.assert_close(out, net[2](net[1](net[0](x)) + torch.tensor([0, 0, 0, 0, 0, 2.0])))


def test_steer_structured_outputs_need_output_index() -> None:
    config = transformers.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
        max_position_embeddings=16,
    )
    neo = transformers.GPTNeoForCausalLM(config).eval()
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="is a tuple of 2; set output_index"):
        with steer(neo, "transformer.h.0", dim=0, value=1.0):
            neo(input_ids=ids)
    assert hook_count(neo) == 0  # removed although the block raised
    with torch.no_grad(), steer(neo, "transformer.h.0", dim=0, value=1.0, output_index=0) as hook:
        neo(input_ids=ids)
    assert hook.calls == 1
    model = llama()
    with pytest.raises(ValueError, match="is a tensor, not a tuple or dict; drop output_index"):
        with steer(model, "model.layers.0", dim=0, value=1.0, output_index=0):
            model(input_ids=ids)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"module": "model.layerz.0"}, "matches no module.*closest names: model.layers.0"),
        ({"module": "model.layers.*"}, "matches 3 modules"),
        ({"module": "model.layers"}, "container that is never called"),
        ({"dim": 16}, r"has 16 features \(shape \(1, 3, 16\)\); dim 16 is outside"),
        ({"value": float("nan")}, "finite number"),
        ({"dim": 1.0}, "dim must be an int"),
        ({"module": "lm_head", "output_index": "logits"}, "is a tensor, not a tuple or dict"),
    ],
)
def test_steer_errors_name_the_culprit(kwargs: dict[str, Any], match: str) -> None:
    model = llama()
    args = {"module": "model.layers.0", "dim": 0, "value": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        with steer(model, **args):
            model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert hook_count(model) == 0


def test_steer_raises_when_the_module_never_ran() -> None:
    model = llama()
    with pytest.raises(ValueError, match="never ran inside the block"):
        with steer(model, "model.layers.0", dim=0, value=1.0):
            pass


# ------------------------------------------------------------------------------------------- evaluation
def test_unembedding_cosines_read_component_dim_of_normalised_rows() -> None:
    lm = CausalLM(config={"model_type": "llama", "vocab_size": 5, "hidden_size": 4, "num_hidden_layers": 1,
                          "num_attention_heads": 1, "intermediate_size": 8, "tie_word_embeddings": True})
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.copy_(
            torch.tensor([[3.0, 4, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [-2, 0, 0, 2]])
        )
    torch.testing.assert_close(unembedding_cosines(lm, 0), torch.tensor([0.6, -1.0, 0.0, 0.5, -(0.5**0.5)]))


def tiny_lily_run(tmp_path: Path, **trainer_args: Any) -> tuple[dict[str, Any], CausalLM]:
    pl.seed_everything(0)
    data = TinyStoriesDataModule(
        tokenizer="bpe", bpe_vocab_size=512, truncate_chars=200, max_tokens=40, batch_size=8, labels="tokens",
        route_tokens=[" Lily"], forget_words=["Lily"], num_val_stories=8, num_attack_stories=1,
        num_coherence_stories=1, num_coherence_val_stories=1,
    )
    lm = CausalLM(
        config={"model_type": "llama", "vocab_size": 512, "hidden_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 40,
                "tie_word_embeddings": True},
        routing_labels=("other", "target"), lr=1e-2, warmup_steps=1,
    )
    routing = GradientRoutingCallback(
        targets={"residual": Target("model.model.layers.*")},
        routes=[Route("target", "residual", {"1:": 0.0})],
        labels=["other", "target"],
    )
    evaluation = SteeringEvaluation(
        target_token=" Lily", steer_module="model.model.layers.0", steer_values=[0, 6], related_tokens=[" she"],
        num_neighbours=5, num_samples=6, new_tokens=8, generation_batch=3, shown_samples=2,
    )
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=6, callbacks=[routing, evaluation], **trainer_args))
    trainer.fit(lm, data)
    return json.loads((tmp_path / "results.json").read_text()), lm


@pytest.mark.timeout(120)
def test_steering_evaluation_writes_neighbours_chart_samples_and_rates(tmp_path: Path) -> None:
    results, lm = tiny_lily_run(tmp_path)
    for name in ("neighbours.md", "neighbours.png", "samples.md"):
        assert (tmp_path / name).stat().st_size > 0
    cosines = unembedding_cosines(lm, 0)
    target = results["target"]
    assert target["token"] == " Lily" and target["cosine"] == pytest.approx(float(cosines[target["id"]]), abs=1e-4)
    sign = 1 if target["cosine"] >= 0 else -1
    assert results["target_side"] == ("+" if sign > 0 else "-")
    assert [e["id"] for e in results["neighbours"]["positive"]] == cosines.argsort(descending=True)[:5].tolist()
    assert [e["id"] for e in results["neighbours"]["negative"]] == cosines.argsort()[:5].tolist()
    assert target["rank_on_target_side"] == int((cosines * sign > cosines[target["id"]] * sign).sum()) + 1
    settings = results["steering"]["settings"]
    sigma = results["steering"]["sigma"]
    assert [s["amount_sd"] for s in settings] == [0, 6] and sigma > 0
    assert settings[1]["added"] == pytest.approx(sign * 6 * sigma, rel=1e-3)
    for setting in settings:
        assert 0 <= setting["target"]["share_of_samples"] <= 1 and "related" in setting
    assert results["routed"] is True and results["absorption"]["related"][0]["token"] == " she"
    assert set(results["held_out_loss"]) == {"target_token", "other_tokens"}


@pytest.mark.timeout(180)
def test_steering_fit_under_ddp_spawn_writes_rank_zero_results(tmp_path: Path) -> None:
    results, lm = tiny_lily_run(tmp_path, strategy="ddp_spawn", devices=2)
    # rank 0 evaluated the trained model and the main process received the same weights
    cosines = unembedding_cosines(lm, 0)
    assert results["target"]["cosine"] == pytest.approx(float(cosines[results["target"]["id"]]), abs=1e-4)
    assert results["steps_trained"] == 6 and len(results["steering"]["settings"]) == 2


def test_steering_evaluation_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        SteeringEvaluation(target_token=" Lily", steer_module="x", num_samples=0)
    with pytest.raises(ValueError, match="also among related_tokens"):
        SteeringEvaluation(target_token=" Lily", steer_module="x", related_tokens=[" Lily"])
    with pytest.raises(ValueError, match="steer_values"):
        SteeringEvaluation(target_token=" Lily", steer_module="x", steer_values=[float("inf")])
