"""Routing in a real training stack: under activation checkpointing (HF and ``torch.utils.checkpoint``,
reentrant or not) and ``torch.compile``, parameter routing (and activation routing beside it) gives the gradients
of the plain eager run, and compiled training does not recompile as labels change. (FSDP2 with checkpointing:
``tests/test_scale_out.py``.)"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from era_models import SEQ, VOCAB, NeoLM, gpt2, gpt_neo, llama, token_batch
from helpers import GradCapture, RoutedDataModule, trainer_kwargs
from torch import Tensor, nn

from lightning_gradroute import GradientRouter, GradientRoutingCallback, ParameterTarget, Route, RoutedAdamW, Target

#: name -> (factory, blocks, heads dedicated to forget: the last of 2, or the last KV group of Llama's 4 heads)
MODELS = {"gpt_neo": (gpt_neo, "transformer.h.*", 1), "llama": (llama, "model.layers.*", 2),
          "gpt2": (gpt2, "transformer.h.*", 1)}  # fmt: skip


def sgtm_targets(blocks: str, heads: int = 1) -> tuple[dict[str, ParameterTarget], list[Route]]:
    """SGTM-style: forget tokens change only the last 8 neurons and the last ``heads`` heads of every block,
    retain tokens the rest."""
    targets = {"mlp": ParameterTarget(modules=blocks, component="neurons"),
               "heads": ParameterTarget(modules=blocks, component="heads")}  # fmt: skip
    routes = [Route("forget", "mlp", {":-8": 0.0}), Route("forget", "heads", {f":-{heads}": 0.0}),
              Route("retain", "mlp", {"-8:": 0.0}), Route("retain", "heads", {f"-{heads}:": 0.0})]  # fmt: skip
    return targets, routes


def sgtm_router(blocks: str, heads: int = 1, telemetry: bool = False, kind: str = "parameter") -> GradientRouter:
    """SGTM-style parameter routing, or (``kind="activation"``) the same neurons blocked for forget tokens at
    their activations."""
    if kind == "activation":
        return GradientRouter({"mlp": Target(blocks, component="neurons")}, [Route("forget", "mlp", {":-8": 0.0})],
                              telemetry=telemetry)  # fmt: skip
    return GradientRouter(*sgtm_targets(blocks, heads), telemetry=telemetry)


def batches(steps: int, n: int = 3) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (n, SEQ), generator=gen), torch.randint(0, 2, (n, SEQ), generator=gen))
            for _ in range(steps)]  # fmt: skip


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, labels=ids).loss


def routed_grads(
    model: nn.Module, blocks: str | None, ids: Tensor, labels: Tensor, heads: int = 1, kind: str = "parameter"
) -> dict[str, Tensor]:
    """The gradients of one routed (``blocks``) or plain (``None``) backward of a copy of ``model``."""
    model = copy.deepcopy(model).train()
    if blocks is None:
        lm_loss(model, ids).backward()
    else:
        with sgtm_router(blocks, heads, kind=kind).attached(model) as router, router.route(labels):
            lm_loss(model, ids).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def assert_routing_mattered(routed: dict[str, Tensor], plain: dict[str, Tensor], attention: bool = True) -> None:
    differs = [n for n in routed if not torch.allclose(routed[n], plain[n], rtol=1e-3, atol=1e-6)]
    assert any(".mlp." in n for n in differs) and (not attention or any("attn" in n for n in differs)), differs


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kind", ["parameter", "activation"])
def test_hf_gradient_checkpointing_routes_exactly(kind: str, name: str, reentrant: bool) -> None:
    factory, blocks, heads = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    ids, labels = batches(1)[0]
    expected = routed_grads(model, blocks, ids, labels, heads, kind)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert_same_grads(routed_grads(checkpointed, blocks, ids, labels, heads, kind), expected)
    assert_routing_mattered(expected, routed_grads(model, None, ids, labels), attention=kind == "parameter")


class CheckpointedLM(nn.Module):
    """An embedding whose rows are routed and a tied head, recomputed in backward with the block (the embedding
    only without reentrancy)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.recompute: bool | None = None  # None: no checkpointing; else use_reentrant

    def rest(self, x: Tensor) -> Tensor:
        return self.head(self.block(x))

    def body(self, ids: Tensor) -> Tensor:
        return self.rest(self.embed(ids))

    def forward(self, ids: Tensor) -> Tensor:
        if self.recompute is None:
            return self.body(ids)
        if self.recompute:  # reentrant checkpointing needs an input that requires grad
            return torch.utils.checkpoint.checkpoint(self.rest, self.embed(ids), use_reentrant=True)
        return torch.utils.checkpoint.checkpoint(self.body, ids, use_reentrant=False)


def checkpointed_router() -> GradientRouter:
    targets = {"up": ParameterTarget("block.0.weight", dim="out"), "rows": ParameterTarget("embed.weight", dim=0)}
    return GradientRouter(targets, [Route("forget", "up", {":8": 0.0}), Route("forget", "rows", {":5": 0.25}),
                                    Route("retain", "up", {"8:": 0.0})])  # fmt: skip


def checkpointed_grads(recompute: bool | None, step: Callable[[GradientRouter, nn.Module], None]) -> list[Tensor]:
    torch.manual_seed(0)
    model = CheckpointedLM()
    model.recompute = recompute
    with checkpointed_router().attached(model) as router:
        step(router, model)
    return [p.grad.clone() for p in model.parameters()]


def test_torch_checkpoint_replays_routed_embeddings_and_tied_weights_and_keeps_each_forwards_labels() -> None:
    ids, labels = batches(1, n=4)[0]

    def inside(router: GradientRouter, model: nn.Module) -> None:
        with router.route(labels):
            model(ids).logsumexp(-1).mean().backward()

    def later(router: GradientRouter, model: nn.Module) -> None:
        """Backward after the labels changed (another batch's, of another shape): its own forward's count."""
        router.coverage_checked = True  # the check at the block's exit would come before backward
        with router.route(labels):
            loss = model(ids).logsumexp(-1).mean()
        router.set_labels(torch.zeros(2, dtype=torch.long))
        loss.backward()
        router.clear_labels()

    expected = checkpointed_grads(None, inside)
    for recompute, step in ((False, inside), (True, inside), (False, later)):
        got = checkpointed_grads(recompute, step)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    plain = checkpointed_grads(None, lambda r, m: m(ids).logsumexp(-1).mean().backward())
    assert not torch.allclose(expected[0], plain[0]) and not torch.allclose(expected[1], plain[1])


def test_reentrant_recomputation_without_labels_is_refused_with_what_to_set() -> None:
    ids, labels = batches(1, n=4)[0]

    def outside(router: GradientRouter, model: nn.Module) -> None:
        router.coverage_checked = True  # the check would stop the block first; this is about backward
        with router.route(labels):
            loss = model(ids).logsumexp(-1).mean()
        loss.backward()

    refused = r"recomputed in backward by reentrant activation checkpointing \(use_reentrant=True\) while no labels"
    with pytest.raises(RuntimeError, match=refused + r" were held.*use_reentrant=False"):
        checkpointed_grads(True, outside)
    checkpointed_grads(False, outside)  # non-reentrant: the forward's own labels, none needed at backward


@pytest.mark.timeout(120)
def test_checkpointed_hf_model_under_the_callback_equals_the_unchecked_fit(tmp_path: Path) -> None:
    """Reentrant HF checkpointing in a Lightning fit: the coverage check passes and the gradients are exact."""
    data = token_batch(8, torch.randint(0, 2, (8, SEQ), generator=torch.Generator().manual_seed(3)))
    grads = []
    for reentrant in (None, True):
        module, capture = NeoLM(), GradCapture()
        if reentrant is not None:
            module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        routing = GradientRoutingCallback(*sgtm_targets("model.transformer.h.*"))
        pl.Trainer(callbacks=[routing, capture], **trainer_kwargs(tmp_path, max_steps=2)).fit(
            module, RoutedDataModule(data, batch_size=4)
        )
        grads.append(capture.grads)
    assert len(grads[0]) == len(grads[1]) == 2
    for got, expected in zip(grads[1], grads[0]):
        assert_same_grads(got, expected)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits


@pytest.mark.timeout(240)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "hf_checkpointing"])
@pytest.mark.parametrize("kind", ["parameter", "activation"])
def test_compiled_routing_compiles_once_and_trains_as_eager(kind: str, checkpointing: bool) -> None:
    """Six steps of changing per-token labels, RoutedAdamW (with split moments for parameter routing) and
    telemetry: no graph after the first step, and the compiled run's gradients, gradient norms and weights equal
    eager's at every step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = Logits(gpt_neo())
    if checkpointing:
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.model.config.use_cache = False
    runs = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        router = sgtm_router("model.transformer.h.*", telemetry=True, kind=kind).attach(model)
        optimizer = RoutedAdamW(model.parameters(), lr=1e-2, split_moments=kind == "parameter")
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        steps, graphs = [], []
        for ids, labels in batches(6):
            with router.route(labels):
                F.cross_entropy(forward(ids).transpose(1, 2), ids).backward()
            norms = router.pop_grad_norms()
            steps.append(({n: p.grad.clone() for n, p in model.named_parameters()}, norms))
            optimizer.step()
            optimizer.zero_grad()
            graphs.append(compiled_graphs())
        runs.append((steps, {n: p.detach().clone() for n, p in model.named_parameters()}, graphs))
        router.detach()
    (eager, eager_final, _), (compiled_steps, compiled_final, graphs) = runs
    # No recompilation as the labels change, after one step (parameter routing) or two (activation routing,
    # whose hooks break the graph, compiles once more at its second step).
    warmup = 1 if kind == "parameter" else 2
    assert graphs[0] > 0 and graphs[warmup:] == [graphs[warmup - 1]] * (6 - warmup), graphs
    for (grads, norms), (expected_grads, expected_norms) in zip(compiled_steps, eager):
        assert_same_grads(grads, expected_grads)
        assert sorted(norms) == sorted(expected_norms)
        for key, value in expected_norms.items():
            torch.testing.assert_close(norms[key], value, rtol=1e-4, atol=1e-8)
    assert_same_grads(compiled_final, eager_final)
    torch._dynamo.reset()
