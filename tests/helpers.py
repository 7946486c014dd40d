"""Tiny, picklable (module-level) LightningModules and data for the tests, with routing labels in the batch.

Batches are dicts: ``{"x": inputs, "y": targets, "route_labels": labels}``, optionally ``"valid"``. Per-example
data has ``x`` ``(B, FEATURES)`` and labels ``(B,)``; per-token data has ``x`` token ids ``(B, T)`` and labels
``(B, T)``. :func:`hand_masked_grads` computes routed gradients independently of the library (the delta form
``a.detach() + m * (a - a.detach())`` with a fully materialised mask), for exactness tests.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_gradroute import GradientRoutingCallback, GradientRoutingMixin

FEATURES = 8
HIDDEN = 16
CLASSES = 4
VOCAB = 11
SEQ = 5


class EndCleanly:
    """A ``ddp_spawn`` worker that, once its work is done, waits for every rank and destroys the gloo process group.

    Lightning destroys it at exit only for NCCL. Left to interpreter shutdown, a rank that exits while its peer
    still holds the group has aborted now and then ("terminate called without an active exception", SIGABRT),
    after all of its work had finished.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> None:
        self.fn(*args)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


#: ``Trainer`` arguments of the 2-process CPU DDP tests (each rank gets its own slice of every global batch).
DDP = dict(accelerator="cpu", devices=2, strategy="ddp_spawn", use_distributed_sampler=False)


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    """Quiet single-process CPU ``Trainer`` arguments, as in Lightning's own callback tests."""
    kwargs: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_epochs=1,
    )
    kwargs.update(overrides)
    return kwargs


# ------------------------------------------------------------------------------------------------- data
class DictDataset(Dataset):
    """Rows of a dict of equally long tensors; the default collate stacks them back into a dict batch."""

    def __init__(self, columns: Mapping[str, Tensor]) -> None:
        lengths = {len(v) for v in columns.values()}
        assert len(lengths) == 1, f"columns of different lengths: {lengths}"
        self.columns = dict(columns)
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def example_data(n: int, forget: list[int] | Tensor, seed: int = 0) -> dict[str, Tensor]:
    """``n`` per-example rows; ``forget`` is the label of each row (ints, or floats for soft labels)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(forget)
    assert len(labels) == n
    return {
        "x": torch.randn(n, FEATURES, generator=gen),
        "y": torch.randint(0, CLASSES, (n,), generator=gen),
        "route_labels": labels,
    }


def token_data(n: int, labels: Tensor, valid: Tensor | None = None, seed: int = 0) -> dict[str, Tensor]:
    """``n`` sequences of ``SEQ`` tokens with per-token ``labels`` ``(n, SEQ)`` and optional ``valid`` mask."""
    gen = torch.Generator().manual_seed(seed)
    assert labels.shape == (n, SEQ)
    data = {
        "x": torch.randint(0, VOCAB, (n, SEQ), generator=gen),
        "y": torch.randint(0, VOCAB, (n, SEQ), generator=gen),
        "route_labels": labels,
    }
    if valid is not None:
        data["valid"] = valid
    return data


def token_columns() -> dict[str, torch.Tensor]:
    """Four global batches of 4 sequences (2 per rank). Rank 0's rows carry all the forget tokens and most of
    the padding, so per-rank item counts are uneven and rank 1 never sees forget data."""
    labels = torch.zeros(16, SEQ, dtype=torch.long)
    valid = torch.ones(16, SEQ)
    for start in range(0, 16, 4):  # rows start, start+1 go to rank 0; start+2, start+3 to rank 1
        labels[start, : 1 + start // 4] = 1
        labels[start + 1, 2] = 1
        valid[start, 3:] = 0
        valid[start + 2, start // 4 + 1 :] = 0
    return token_data(16, labels, valid, seed=3)


class RoutedDataModule(pl.LightningDataModule):
    """Serves ``columns`` in order (no shuffling) as training (and validation / test) batches.

    With ``shard_global_batches=True`` (use with ``Trainer(use_distributed_sampler=False)``), every consecutive
    ``batch_size * world_size`` rows form one *global* batch and rank ``r`` gets its ``r``-th slice, so a
    multi-process run sees exactly the global batches a single process with ``batch_size * world_size`` sees.
    """

    def __init__(self, columns: Mapping[str, Tensor], batch_size: int, shard_global_batches: bool = False) -> None:
        super().__init__()
        self.columns = dict(columns)
        self.batch_size = batch_size
        self.shard_global_batches = shard_global_batches

    def _loader(self) -> DataLoader:
        columns = self.columns
        if self.shard_global_batches:
            world, rank, b = self.trainer.world_size, self.trainer.global_rank, self.batch_size
            n = len(next(iter(columns.values())))
            rows = [i for start in range(0, n, b * world) for i in range(start + rank * b, start + (rank + 1) * b)]
            columns = {k: v[rows] for k, v in columns.items()}
        return DataLoader(DictDataset(columns), batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


# ----------------------------------------------------------------------------------------------- models
class TinyClassifier(pl.LightningModule):
    """``x (B, 8) -> encoder Linear(8, 16) -> act -> head Linear(16, 4)``; cross-entropy, plain SGD.

    Route on ``"encoder"`` (its output, ``(B, 16)``). ``inplace_act`` uses ``ReLU(inplace=True)`` right after
    the routed module, as torchvision-style CNNs do. ``checkpoint_encoder`` runs encoder and act under
    non-reentrant activation checkpointing, which re-runs the routing hook during backward.
    """

    def __init__(self, lr: float = 0.1, inplace_act: bool = False, checkpoint_encoder: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.checkpoint_encoder = checkpoint_encoder
        self.encoder = nn.Linear(FEATURES, HIDDEN)
        self.act = nn.ReLU(inplace=inplace_act)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def _hidden(self, x: Tensor) -> Tensor:
        return self.act(self.encoder(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpoint_encoder:
            return self.head(torch.utils.checkpoint.checkpoint(self._hidden, x, use_reentrant=False))
        return self.head(self._hidden(x))

    def compute_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TokenModel(pl.LightningModule):
    """Per-token: ``ids (B, T) -> embed (B, T, 8) -> encoder Linear(8, 16) -> GELU -> head Linear(16, 11)``.

    Route on ``"encoder"`` (output ``(B, T, 16)``) with per-token labels ``(B, T)``. ``item_losses`` gives the
    unreduced ``(B, T)`` cross-entropy; the loss is their mean over ``batch["valid"]`` (all tokens if absent).
    """

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(VOCAB, FEATURES)
        self.encoder = nn.Linear(FEATURES, HIDDEN)
        self.act = nn.GELU()
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.act(self.encoder(self.embed(ids))))

    def item_losses(self, batch: Mapping[str, Tensor]) -> Tensor:
        logits = self(batch["x"])
        return F.cross_entropy(logits.transpose(1, 2), batch["y"], reduction="none")

    def compute_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        losses = self.item_losses(batch)
        valid = batch.get("valid")
        if valid is None:
            return losses.mean()
        return (losses * valid).sum() / valid.sum()

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self.compute_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MixinTokenModel(GradientRoutingMixin, TokenModel):
    """:class:`TokenModel` whose loss comes from :meth:`GradientRoutingMixin.routed_loss` (logged per label).

    ``record`` keeps every step's ``(stage, item_losses, labels, valid)`` (detached) so tests can hand-compute
    what was logged; ``normalization`` sets ``loss_normalization``.
    """

    def __init__(self, lr: float = 0.1, normalization: str = "local") -> None:
        super().__init__(lr=lr)
        self.loss_normalization = normalization  # type: ignore[assignment]
        self.record: list[tuple[str, Tensor, Tensor, Tensor | None]] = []

    def _routed(self, batch: Mapping[str, Tensor]) -> Tensor:
        losses = self.item_losses(batch)
        labels, valid = batch["route_labels"], batch.get("valid")
        stage = "train" if self.trainer.training else "val"
        self.record.append((stage, losses.detach().clone(), labels.clone(), None if valid is None else valid.clone()))
        return self.routed_loss(losses, labels, valid=valid)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._routed(batch)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._routed(batch)


# ---------------------------------------------------------------------------------------------- probes
class GradCapture(Callback):
    """Copies every parameter's gradient in ``on_before_optimizer_step`` (after accumulation and all-reduce)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


def hook_count(module: nn.Module) -> int:
    """Forward and forward-pre hooks registered anywhere in ``module``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def soft_or_hard_mask(labels: Tensor, table: Tensor) -> Tensor:
    """The mask by definition: row ``labels`` of ``table`` for ints; ``(1-s) row0 + s row1`` for floats."""
    if labels.is_floating_point():
        s = labels.unsqueeze(-1)
        return (1 - s) * table[0] + s * table[1]
    return table[labels]


def hand_masked_grads(
    model: nn.Module,
    module_name: str,
    mask: Tensor,
    loss_fn: Callable[[], Tensor],
) -> dict[str, Tensor]:
    """Gradients of ``loss_fn()`` w.r.t. ``model``'s parameters, ``module_name``'s output hand-routed by ``mask``.

    ``model`` is a hook-free copy (:func:`fresh_copy`); ``mask`` must broadcast against the routed output. The
    delta form with a materialised mask is an implementation independent of ``lightning_gradroute``.
    """

    def delta(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        m = mask.to(out.dtype)
        return out.detach() + m * (out - out.detach())

    handle = model.get_submodule(module_name).register_forward_hook(delta)
    try:
        loss = loss_fn()
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
    finally:
        handle.remove()
    return dict(zip(params, grads))


def fresh_copy(model: nn.Module) -> nn.Module:
    """A deep copy taken before ``fit`` (so it carries no routing hooks)."""
    assert hook_count(model) == 0, "copy the model before the routing callback registers hooks"
    return copy.deepcopy(model)


# ------------------------------------------------------------------------------- DDP and recipe helpers
class SaveRankState(Callback):
    """Each rank writes its parameters and its routing callback's label counts to ``<dir>/rank<r>.pt``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        routing_callback = next(c for c in trainer.callbacks if isinstance(c, GradientRoutingCallback))
        state = {
            "params": {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()},
            "label_totals": routing_callback.label_totals,
        }
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def rank_states(directory: Path) -> list[dict[str, Any]]:
    return [torch.load(directory / f"rank{r}.pt") for r in range(2)]


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe_cli_args(path: Path) -> list[str]:
    """The CLI arguments a recipe's smoke test runs with: its ``# base:`` recipes' first, then the recipe, then
    its ``# smoke-args:``."""
    header = path.read_text()
    args: list[str] = []
    for base in re.findall(r"^# base: (\S+)", header, flags=re.M):
        base_path = (path.parent / base) if (path.parent / base).exists() else RECIPES / base
        args += recipe_cli_args(base_path)
    args += ["--config", str(path)]
    for line in re.findall(r"^# smoke-args: (.+)$", header, flags=re.M):
        args += shlex.split(line)
    return args
