"""Gradient routing as a Lightning callback: add it to a ``Trainer`` and put routing labels in the batch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_gradroute.expansion import (
    Expansion,
    ExpansionRecord,
    check_same_expansion,
    contract,
    expand,
    expansion_record,
    save_ablated,
    zero_expanded,
)
from lightning_gradroute.labels import BatchKey, LabelSource
from lightning_gradroute.router import GradientRouter
from lightning_gradroute.targets import Route, Target, UnitGroups

__all__ = ["GradientRoutingCallback"]


class GradientRoutingCallback(Callback):
    r"""Route the gradients of chosen activations by per-example or per-token labels during ``fit``.

    The forward pass is untouched (bit for bit). In backward, the gradient flowing through each routed
    activation is multiplied, per data item, by the weight its label's :class:`~lightning_gradroute.Route`
    gives those units: 1 lets learning through, 0 stops it, a fraction damps it, a negative value reverses it.
    Validation, test and predict run unrouted.

    Lifecycle (see ``shared/reference/lightning-integration.md`` for why each hook):

    * ``setup("fit")``: calls the module's ``configure_model`` if it is overridden (so lazily built layers
      exist), resolves the target patterns and registers the hooks, before checkpoint restore, DDP wrapping,
      ``torch.compile`` tracing and the sanity check.
    * ``on_train_batch_start``: reads the labels from the batch and holds them until ``on_train_batch_end``
      (after backward, so activation checkpointing's recomputation sees the same labels).
    * ``teardown("fit")``: removes the hooks; nothing leaks into a later ``validate`` / ``test``.

    Expand-Route-Ablate (ERA): with ``expansions``, ``setup("fit")`` first grows the model (new parameters
    exist before checkpoint restore, DDP wrapping and ``configure_optimizers``), and routes may use the units
    ``"expanded"`` / ``"original"``. ``on_fit_end`` (model unwrapped, after the last ``ModelCheckpoint`` save)
    ablates: ``"contract"`` slices the model back to its original architecture, ``"zero"`` zeroes the new
    units keeping the shapes; the ablated weights are then saved to ``<log_dir>/ablated/``
    (``model.safetensors``, plus ``save_pretrained`` output for each HF model inside). Checkpoints carry the
    expansion under ``checkpoint["gradroute"]``.

    Example::

        import lightning.pytorch as pl
        from lightning_gradroute import GradientRoutingCallback, Route, Target

        routing = GradientRoutingCallback(
            targets={"code": Target("encoder.2")},                       # a module of your LightningModule
            routes=[Route(label="forget", target="code", weights={"0:16": 0.0})],
            labels=["retain", "forget"],                                  # batch["route_labels"] indexes this
        )
        trainer = pl.Trainer(callbacks=[routing])
        trainer.fit(my_module, my_datamodule)   # batches are dicts with a "route_labels" tensor

    ERA on an HF GPT-Neo held as ``self.model``::

        GradientRoutingCallback(
            targets={"mlp": Target("model.transformer.h.[0-4].mlp.act")},
            routes=[Route(label="forget", target="mlp", weights={"original": -0.75, "expanded": 1.0})],
            expansions=[Expansion("model.transformer.h.*.mlp", preset="gpt_neo_mlp", add=64)],
            ablate="contract",
        )

    Args:
        targets: named :class:`~lightning_gradroute.Target` s (where). Patterns match
            ``pl_module.named_modules()``.
        routes: :class:`~lightning_gradroute.Route` s (what, per label).
        labels: the label names; integer labels in the batch index this list. Float labels in [0, 1] are soft
            labels between the first and second name.
        label_key: where the batch carries the labels: a dict key or a tuple position. Ignored when
            ``label_source`` is given.
        label_source: a :class:`~lightning_gradroute.LabelSource` that computes labels from the batch.
        remove_labels_from_batch: pop ``label_key`` out of a dict batch before ``training_step`` sees it.
        expansions: :class:`~lightning_gradroute.Expansion` s applied in ``setup("fit")``.
        ablate: what ``on_fit_end`` does to an expanded model: ``"contract"`` (original shapes; required by
            ``strategy="ddp_spawn"``, whose main process reloads rank 0's weights into the unexpanded model),
            ``"zero"`` (keep shapes, zero the new units) or ``None`` (keep the trained expanded model).
        save_ablated: save the ablated weights: ``True`` under ``trainer.log_dir`` (or ``default_root_dir``),
            a path for another directory, ``False`` not at all.

    Raises:
        ValueError: in the constructor for malformed targets, routes, labels or expansions; in ``setup`` for a
            pattern that matches no module (with the closest names), units out of range, ``"expanded"`` units
            on a module no expansion covers, a module an expansion preset does not fit, or ``ablate`` other than
            ``"contract"`` under ``ddp_spawn``; at checkpoint restore for a checkpoint of another expansion;
            at the first batch for labels of the wrong shape, dtype or range.
    """

    def __init__(
        self,
        targets: Mapping[str, Target],
        routes: Sequence[Route],
        labels: Sequence[str] = ("retain", "forget"),
        label_key: str | int = "route_labels",
        label_source: LabelSource | None = None,
        remove_labels_from_batch: bool = False,
        expansions: Sequence[Expansion] = (),
        ablate: Literal["contract", "zero"] | None = "contract",
        save_ablated: bool | str = True,
    ) -> None:
        self.router = GradientRouter(targets, routes, labels)
        if ablate not in ("contract", "zero", None):
            raise ValueError(f"GradientRoutingCallback: ablate must be 'contract', 'zero' or None, got {ablate!r}")
        for expansion in expansions:
            if not isinstance(expansion, Expansion):
                raise ValueError(f"GradientRoutingCallback: expansions must be Expansion objects, got {expansion!r}")
        self.expansions = list(expansions)
        self.ablate = ablate
        self.save_ablated = save_ablated
        #: ``"none"`` (never expanded), ``"expanded"``, or after ``on_fit_end`` ``"zeroed"`` / ``"contracted"``.
        self.phase = "none"
        self.record: ExpansionRecord | None = None  # the model's expansion, kept after contraction
        self.ablated_dir: Path | None = None
        if label_source is not None and not callable(label_source):
            raise ValueError(f"GradientRoutingCallback: label_source {label_source!r} is not callable")
        self.label_source: LabelSource = label_source or BatchKey(label_key, remove=remove_labels_from_batch)
        self.steps_routed = 0
        # Items (examples or tokens) seen per label; a tensor on the batch's device so counting never syncs.
        self._label_totals = torch.zeros(len(self.router.label_names), dtype=torch.float64)

    @property
    def label_totals(self) -> list[float]:
        """How many items (examples or tokens, soft labels counted fractionally) of each label were routed."""
        return self._label_totals.tolist()

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(config=self.config_hash)

    @property
    def config_hash(self) -> str:
        """A short hash of the routing configuration, compared on resume."""
        config = {
            "targets": {k: repr(v) for k, v in sorted(self.router.targets.items())},
            "routes": [repr(r) for r in self.router.routes],
            "labels": self.router.label_names,
        }
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "config_hash": self.config_hash,
            "steps_routed": self.steps_routed,
            "label_totals": self.label_totals,
            "phase": self.phase,
        }

    def _check_config(self, saved_hash: object) -> None:
        if saved_hash != self.config_hash:
            raise ValueError(
                f"GradientRoutingCallback: the checkpoint was trained with routing config {saved_hash}"
                f", this callback has {self.config_hash}; resume with the same targets, routes and labels"
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_config(state_dict.get("config_hash"))
        self.steps_routed = int(state_dict["steps_routed"])
        self._label_totals = torch.tensor(state_dict["label_totals"], dtype=torch.float64)
        self.phase = state_dict.get("phase", self.phase)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.record is not None:
            checkpoint["gradroute"] = {"phase": self.phase, "expansion": self.record.to_dict()}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning finds this callback's state by state_key, which contains the config hash: the state of another
        # routing config would silently not be loaded at all. Fail instead.
        states = checkpoint.get("callbacks", {})
        saved = [s.get("config_hash") for k, s in states.items() if k.startswith(f"{type(self).__qualname__}{{")]
        if saved and self.state_key not in states:
            self._check_config(", ".join(map(str, saved)))
        if checkpoint.get("gradroute", {}).get("phase") == "contracted":
            raise ValueError(
                "GradientRoutingCallback: the checkpoint holds already-ablated (contracted) weights, nothing to "
                "resume; load them into the model and start a new fit without ckpt_path"
            )
        expansion = checkpoint.get("gradroute", {}).get("expansion")
        saved_record = ExpansionRecord.from_dict(expansion) if expansion else None
        check_same_expansion(saved_record, expansion_record(pl_module), "GradientRoutingCallback")

    # ---------------------------------------------------------------- lifecycle
    def unit_groups(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> UnitGroups:
        """Symbolic unit groups (``"expanded"`` / ``"original"``) per hook site; none without an expansion."""
        record = expansion_record(pl_module)
        return record.unit_groups if record else {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.router.is_attached:
            return
        if is_overridden("configure_model", pl_module):
            # Lightning calls configure_model only after Callback.setup; layers it builds must exist before
            # the patterns are resolved. configure_model is required to be idempotent.
            pl_module.configure_model()
        if self.expansions:
            if self.ablate != "contract" and isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
                raise ValueError(
                    f"GradientRoutingCallback: ablate={self.ablate!r} keeps the expanded shapes, which a "
                    f"{type(trainer.strategy).__name__} launched by multiprocessing (ddp_spawn, ddp_fork) cannot "
                    "hand back to the main process's unexpanded model; use ablate='contract' or strategy='ddp'"
                )
            expand(pl_module, self.expansions)
        self.record = expansion_record(pl_module)
        if self.record is not None:
            self.phase = "expanded"
            if self.ablate and self.save_ablated:
                # Resolved here on every rank: trainer.log_dir broadcasts, which must not run on rank 0 alone.
                root = self.save_ablated if isinstance(self.save_ablated, str) else trainer.log_dir
                self.ablated_dir = Path(root or trainer.default_root_dir) / "ablated"
        self.router.attach(pl_module, self.unit_groups(trainer, pl_module))
        rank_zero_info(f"gradient routing on {len(self.router.sites)} sites:\n{self.router.describe()}")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        labels = self.router.set_labels(self.label_source(batch))
        self.steps_routed += 1
        if labels.is_floating_point():
            second = labels.sum(dtype=torch.float64)
            counts = torch.stack([labels.numel() - second, second])
        else:
            counts = torch.bincount(labels.flatten(), minlength=len(self.router.label_names)).double()
        self._label_totals = self._label_totals.to(counts.device) + counts

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.router.clear_labels()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ablate is None or expansion_record(pl_module) is None:
            return
        if self.ablate == "contract":
            contract(pl_module)
            self.phase = "contracted"
        else:
            zero_expanded(pl_module)
            self.phase = "zeroed"
        if self.ablated_dir is not None and trainer.is_global_zero:
            save_ablated(pl_module, self.ablated_dir, hf=self.phase == "contracted")
            rank_zero_info(f"ablated ({self.phase}) weights saved to {self.ablated_dir}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: remove the hooks (and labels) here, or they leak.
        self.router.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.router.detach()
