"""Gradient routing as a Lightning callback: add it to a ``Trainer`` and put routing labels in the batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_gradroute._compat import state_key, strategy_family, tensor_parallel_size
from lightning_gradroute.era import Ablation, AblationMode, EraLifecycle, Phase, restore_checkpoint, write_checkpoint
from lightning_gradroute.expansion import Expansion
from lightning_gradroute.labels import BatchKey, LabelSource, label_counts
from lightning_gradroute.mixin import GradientRoutingMixin
from lightning_gradroute.router import GradientRouter
from lightning_gradroute.targets import ForwardMask, ParameterTarget, Route, Target

__all__ = ["GradientRoutingCallback", "routing_callback_before"]


class GradientRoutingCallback(Callback):
    r"""Route the gradients of chosen activations by per-example or per-token labels during ``fit``.

    The forward pass is untouched (bit for bit), unless you ask for forward ``masks``. In backward, the gradient
    flowing through each routed activation is multiplied, per data item, by the weight its label's
    :class:`~lightning_gradroute.Route` gives those units: 1 lets learning through, 0 stops it, a fraction damps
    it, a negative value reverses it. Validation, test and predict run unrouted (and unmasked).

    Every configuration routes exactly what it says or stops with a one-line error: patterns, units and route
    sets are checked in the constructor and in ``setup``, labels at every batch, and after the first routed
    batch the callback proves that every matched site was called, routed and reached by a gradient.

    Lifecycle (the order of ``Trainer.fit``'s hooks decides each place; see ``docs/era.md``):

    * ``setup("fit")``: calls the module's ``configure_model`` if it is overridden (so lazily built layers
      exist), expands the model if asked, resolves the target patterns and registers the hooks: before
      checkpoint restore, DDP wrapping, ``configure_optimizers``, ``torch.compile`` tracing and the sanity check.
    * ``on_train_batch_start``: reads the labels from the batch and holds them until ``on_train_batch_end``
      (after backward, so activation checkpointing's recomputation sees the same labels).
    * ``on_fit_end`` (model unwrapped, after the last ``ModelCheckpoint`` save): ablates an expanded model, or
      (``ablate="dedicated"``) zeroes the units parameter routes dedicate to ``ablate_label``.
    * ``teardown("fit")``: removes the hooks; nothing leaks into a later ``validate`` / ``test``.

    Expand-Route-Ablate (ERA): with ``expansions``, ``setup("fit")`` first adds new units beside the model's
    own, and routes may use the units ``"expanded"`` / ``"original"``. At fit end ``"contract"`` removes them
    (the original architecture), ``"zero"`` zeroes them keeping the shapes; the ablated weights are then saved
    to ``<log_dir>/ablated/`` (``model.safetensors``, plus ``save_pretrained`` output for each HF model
    inside). Checkpoints carry the ERA state (:mod:`lightning_gradroute.era`, whose
    :class:`~lightning_gradroute.era.EraLifecycle` runs these steps).

    Several routing callbacks may share a ``Trainer`` (e.g. one per label source), each with its own target
    names and sites; at most one may expand or ablate. Each checkpoints its own state (a trainer's only routing
    callback under the key ``"GradientRoutingCallback"``, as before, so earlier checkpoints resume).

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
        targets: named :class:`~lightning_gradroute.Target` s (activations: patterns match
            ``pl_module.named_modules()``) and :class:`~lightning_gradroute.ParameterTarget` s (parameters:
            ``pl_module.named_parameters()``; pair them with :class:`~lightning_gradroute.RoutedAdamW` in
            ``configure_optimizers`` so that blocked units keep their optimizer state).
        routes: :class:`~lightning_gradroute.Route` s (what, per label), at most one per (label, target).
        labels: the label names; integer labels in the batch index this list. Float labels in [0, 1] are soft
            labels between the first and second name. A :class:`~lightning_gradroute.GradientRoutingMixin`
            module must declare the same ``routing_labels`` (checked in ``setup``).
        label_key: where the batch carries the labels: a dict key or a tuple position (``2`` for batches
            ``(x, y, labels)``). Ignored when ``label_source`` is given.
        label_source: a :class:`~lightning_gradroute.LabelSource` that computes labels from the batch (its
            example: labels from the targets of a tuple batch).
        remove_labels_from_batch: pop ``label_key`` out of a dict batch before ``training_step`` sees it.
        expansions: :class:`~lightning_gradroute.Expansion` s applied in ``setup("fit")``.
        ablate: what ``on_fit_end`` does: to an expanded model ``"contract"`` (original shapes; required by
            ``strategy="ddp_spawn"``, whose main process reloads rank 0's weights into the unexpanded model) or
            ``"zero"`` (keep shapes, zero the new units), nothing to a model without an expansion; ``"dedicated"``
            (parameter routing without an expansion, SGTM's ablation) zeroes, on every rank, the units of each
            routed parameter that only ``ablate_label`` may change (weight nonzero for it, zero for every label of
            ``ablate_against``; :meth:`~lightning_gradroute.GradientRouter.dedicated_units`) and records them in
            :attr:`ablated_units`; ``None`` keeps the trained model. ``"dedicated"`` needs parameter targets and no
            expansion (with one, the new units are what to remove: ``"contract"``).
        ablate_label: the label whose dedicated units ``ablate="dedicated"`` zeroes (required there, refused
            with the other modes).
        ablate_against: the labels that may not change a dedicated unit (default: every other label). SGTM with
            a default mode that may change everything: ``["retain_masked"]``, its retain mode.
        save_ablated: save the ablated weights: ``True`` under ``trainer.log_dir`` (or ``default_root_dir``),
            a path for another directory, ``False`` not at all.
        allow_noop: accept routes that route nothing (none at all, a target without a route, all weights 1),
            for control runs and sweeps through weight 1.
        check_coverage: after the first routed batch, raise unless every matched site was called, routed and
            reached by a gradient. Turn off only for models whose step uses some targets conditionally (sparse
            mixtures of experts).
        log_grad_norms: log ``gradroute/grad_norm/<target>/<label>/<units>`` at every step: the norm of the
            routed gradient that the batch's items of each label send into each unit group (``"all"`` and every
            selection a route names), over all ranks' items and divided by the world size as DDP averages, so it
            equals one process on the global batch. A forget label's norm into ``"original"`` units shows leakage
            directly. For a parameter target it is the norm of each label's items' share of the parameter's
            gradient per unit group (computed per label: the summed gradient may differ in float rounding);
            under DDP the ranks' shares land in the same entries, so there the logged value is the root sum of
            the ranks' squared norms over the world size: zero exactly where one process gives zero, but not
            one process's value otherwise. Costs one small all-reduce per step under DDP. A mask's units are a
            unit group too: ``gradroute/grad_norm/mlp/retain/192:`` is 0 where retain items do not see them.
        masks: :class:`~lightning_gradroute.ForwardMask` s (SGTM's retain mode): in training steps, items of a
            mask's label see its units of an activation target as 0 (``x * mask``, so no gradient flows through
            them either); every other item's value is bit for bit unmasked, and validation runs unmasked. A target
            may carry routes, masks or both. Labels must then be integers. Coverage covers masks (every matched
            masked site must be called in the first routed batch), ``describe()`` and the ``setup`` log list them,
            and the state's config holds them (a resume with other masks is named). SGTM masks only a fraction of
            its retain data (25%); to match it, give that fraction its own label and mask that label::

                masks=[ForwardMask(label="retain_masked", target="mlp", units="expanded")]

    Raises:
        ValueError: in the constructor for malformed targets, routes, masks, labels or expansions and route sets
            that route nothing; in ``setup`` for a pattern that matches no module (with the closest names), units out
            of range, ``"expanded"`` units on a module no expansion covers, a module an expansion preset does not
            fit, label names that differ from the module's ``routing_labels``, ``ablate`` other than
            ``"contract"`` with an expansion under ``ddp_spawn``, or ``"dedicated"`` with no unit dedicated to
            ``ablate_label`` or on an expanded model, and for a target name or site another routing callback
            of the trainer has, or a second one that expands or ablates; at checkpoint restore for a checkpoint
            of another routing config (naming the fields that differ), expansion or set of routing callbacks; at
            the first batch for labels of the wrong shape, dtype or range, and for a site that routed nothing.
    """

    def __init__(
        self,
        targets: Mapping[str, Target | ParameterTarget],
        routes: Sequence[Route],
        labels: Sequence[str] = ("retain", "forget"),
        label_key: str | int = "route_labels",
        label_source: LabelSource | None = None,
        remove_labels_from_batch: bool = False,
        expansions: Sequence[Expansion] = (),
        ablate: AblationMode | None = "contract",
        ablate_label: str | None = None,
        ablate_against: Sequence[str] | None = None,
        save_ablated: bool | str = True,
        allow_noop: bool = False,
        check_coverage: bool = True,
        log_grad_norms: bool = False,
        masks: Sequence[ForwardMask] = (),
    ) -> None:
        self.router = GradientRouter(
            targets, routes, labels, allow_noop=allow_noop, telemetry=log_grad_norms, masks=masks
        )
        #: The ERA lifecycle: expansion, ablation, what was ablated (:class:`~lightning_gradroute.era.EraLifecycle`).
        self.era = EraLifecycle(self.router, expansions, ablate, ablate_label, save_ablated,
                                ablate_against=ablate_against)  # fmt: skip
        if label_source is not None and not callable(label_source):
            raise ValueError(f"GradientRoutingCallback: label_source {label_source!r} is not callable")
        self.check_coverage = check_coverage
        self.label_source: LabelSource = label_source or BatchKey(label_key, remove=remove_labels_from_batch)
        self.steps_routed = 0
        # Items (examples or tokens) seen per label; a tensor on the batch's device so counting never syncs.
        self._label_totals = torch.zeros(len(self.router.label_names), dtype=torch.float64)
        self._backward_seen = False
        # The state key beside other routing callbacks (derived from the targets, as ModelCheckpoint's from its
        # arguments); alone in a trainer (found in setup) the class name, the key of every earlier checkpoint.
        self._key, self._alone = state_key(self, targets=self.router.config()["targets"]), False
        self._ablated_elsewhere = False  # another routing callback of the trainer expands or ablates

    @property
    def expansions(self) -> list[Expansion]:
        return self.era.expansions

    @property
    def ablate(self) -> Ablation | None:
        return self.era.ablate

    @property
    def phase(self) -> Phase | None:
        """The ERA phase of the module (``None`` if it was not expanded)."""
        return self.era.state.phase if self.era.state is not None else None

    @property
    def ablated_units(self) -> dict[str, int]:
        """``{parameter name: units zeroed}`` by ``ablate="dedicated"`` at fit end (empty before, and in the main
        process of ``ddp_spawn``, whose workers ran the fit)."""
        return self.era.ablated_units

    @property
    def label_totals(self) -> list[float]:
        """How many items (examples or tokens, soft labels counted fractionally) of each label were routed."""
        return self._label_totals.tolist()

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        """The class name for a trainer's only routing callback (the key of every checkpoint before several were
        allowed), else derived from the targets, as ``ModelCheckpoint`` derives its own: each restores its state."""
        return super().state_key if self._alone else self._key

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.router.config(), "steps_routed": self.steps_routed, "label_totals": self.label_totals}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_config(state_dict.get("config", {}))
        self.steps_routed = int(state_dict["steps_routed"])
        self._label_totals = torch.tensor(state_dict["label_totals"], dtype=torch.float64)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        write_checkpoint(checkpoint, pl_module)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        restore_checkpoint(checkpoint, pl_module, "GradientRoutingCallback", resume=True)
        kind = super().state_key
        saved = {k: v for k, v in (checkpoint.get("callbacks") or {}).items() if str(k).split("{")[0] == kind}
        if saved and self.state_key not in saved:  # saved alone and resumed beside another, or vice versa
            names = sorted(self.router.targets)
            same = [state for state in saved.values() if sorted(state["config"]["targets"]) == names]
            if not same:
                raise ValueError(
                    f"GradientRoutingCallback: the checkpoint holds no state of a routing callback with targets "
                    f"{names}, only of ones with targets {[sorted(s['config']['targets']) for s in saved.values()]}; "
                    "resume with the same routing callbacks"
                )
            self.load_state_dict(same[0])  # raises, naming the fields, if its config differs

    def _check_config(self, saved: dict[str, Any]) -> None:
        changed = _differences(saved, self.router.config())
        if changed:
            more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
            raise ValueError(
                "GradientRoutingCallback: the checkpoint was trained with another routing config: "
                f"{'; '.join(changed[:4])}{more}; resume with the same targets, routes and labels"
            )

    # ---------------------------------------------------------------- lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.router.is_attached:
            return
        others = [cb for cb in _routing_callbacks(trainer) if cb is not self]
        self._alone, self._ablated_elsewhere = not others, any(other._ablates for other in others)
        self._check_others(others, attached=False)
        if isinstance(pl_module, GradientRoutingMixin) and list(pl_module.routing_labels) != self.router.label_names:
            raise ValueError(
                f"GradientRoutingCallback: labels {self.router.label_names} differ from "
                f"{type(pl_module).__name__}.routing_labels {list(pl_module.routing_labels)}; the logged per-label "
                "losses would be mislabelled, declare the same names in the same order"
            )
        self._check_strategy(trainer)
        self.era.setup(trainer, pl_module)  # expands around configure_model, attaches the router
        self._check_others(others, attached=True)
        where = f"{len(self.router.sites)} sites and {len(self.router.parameters)} parameters"
        rank_zero_info(f"gradient routing on {where}:\n{self.router.describe()}")

    def _check_others(self, others: list[GradientRoutingCallback], attached: bool) -> None:
        """Refuse what two routing callbacks in one trainer cannot share: a target name, the ERA lifecycle (before
        expanding) or, once attached, a hooked site (with those set up before this one)."""
        merge = "merge the two GradientRoutingCallbacks into one (one targets dict, one routes list)"
        for other in others:
            shared = sorted(set(self.router.targets) & set(other.router.targets))
            if not attached and shared:
                raise ValueError(
                    f"GradientRoutingCallback: two routing callbacks name a target {shared[0]!r}, which would mix "
                    f"their logged metrics and messages; rename it in one of them, or {merge}"
                )
            if not attached and self._ablates and other._ablates:
                raise ValueError(
                    f"GradientRoutingCallback: the routing callbacks of targets {sorted(self.router.targets)} and "
                    f"{sorted(other.router.targets)} both expand or ablate the model, which only one may; {merge}"
                )
            mine, theirs = _sites(self.router), _sites(other.router)
            both = sorted(mine.keys() & theirs.keys())
            if attached and both:
                where = both[0]
                raise ValueError(
                    f"GradientRoutingCallback: targets {theirs[where]!r} and {mine[where]!r} of two routing "
                    f"callbacks both route {where}; {merge}"
                )

    @property
    def _ablates(self) -> bool:
        return bool(self.expansions) or self.ablate is Ablation.DEDICATED

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        """Refuse, with why and what to use, the strategies this configuration cannot route exactly under."""
        family, name = strategy_family(trainer.strategy), type(trainer.strategy).__name__
        if family == "model_parallel" and tensor_parallel_size(trainer.strategy) > 1:
            raise ValueError(
                f"GradientRoutingCallback: {name} with tensor parallelism shards activations and weights across "
                "ranks, so unit indices would address local shards; use data_parallel_size only (FSDP2) or DDP"
            )
        needs = [what for what, used in (("parameter targets", self.router.parameter_targets),
                                         ("expansions", self.expansions)) if used]  # fmt: skip
        if needs and family in ("fsdp", "deepspeed", "other"):
            why = {
                "fsdp": "FSDPStrategy (FSDP1) flattens parameters into shards",
                "deepspeed": "DeepSpeed ZeRO partitions parameters and gradients (.grad is absent)",
                "other": f"{name} is not one of the strategies they are tested under",
            }[family]
            raise ValueError(
                f"GradientRoutingCallback: {' and '.join(needs)} are not supported under {name}: {why}; use "
                "ModelParallelStrategy (FSDP2, fully_shard in configure_model), DDP or one device (activation "
                "targets alone work under any strategy)"
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        labels = self.router.set_labels(self.label_source(batch))
        self.steps_routed += 1
        counts = label_counts(labels, len(self.router.label_names))
        self._label_totals = self._label_totals.to(counts.device) + counts

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backward_seen = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.router.clear_labels()
        # A skipped step (training_step returned None) runs no backward: judge coverage at the first that does.
        if self.check_coverage and self._backward_seen and not self.router.coverage_checked:
            self.router.check_coverage()
        if self.router.telemetry:
            self._log_grad_norms(trainer, pl_module)

    def _log_grad_norms(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sums = self.router.pop_grad_norms()
        if not sums:
            return
        squares = torch.stack([v.to(pl_module.device) for v in sums.values()])
        # Summed over ranks, divided by the world size as DDP averages gradients: DDP equals one process.
        norms = trainer.strategy.reduce(squares, reduce_op="sum").sqrt() / trainer.world_size
        for (target, label, units), norm in zip(sums, norms):
            pl_module.log(f"gradroute/grad_norm/{target}/{label}/{units}", norm, on_step=True, batch_size=1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ablated_elsewhere:  # or it would remove the other's expansion, unsaved
            self.era.fit_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: remove the hooks (and labels) here, or they leak.
        self.router.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.router.detach()


def routing_callback_before(trainer: pl.Trainer, callback: Callback, who: str) -> GradientRoutingCallback | None:
    """The trainer's :class:`GradientRoutingCallback` (``None`` without one; of several, the one that expands or
    ablates the model, at most one may, else the first), for a callback whose ``on_fit_end`` must see the model
    after every routing callback's ablation (they run in list order).

    Raises:
        ValueError: a routing callback is listed after ``callback``.
    """
    mine = trainer.callbacks.index(callback)
    routing = _routing_callbacks(trainer)
    if any(trainer.callbacks.index(cb) > mine for cb in routing):
        raise ValueError(f"{who}: list it after the GradientRoutingCallback, whose ablation comes first")
    return next((cb for cb in routing if cb._ablates), routing[0] if routing else None)


def _routing_callbacks(trainer: pl.Trainer) -> list[GradientRoutingCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, GradientRoutingCallback)]


def _sites(router: GradientRouter) -> dict[str, str]:
    """``{hooked site: target name}`` of an attached router (a parameter routed twice fails in ``attach``)."""
    return {f"{s.module_name!r} ({s.target.site})": s.target_name for s in router.sites}


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """``path: saved -> current`` for every leaf where two plain-data configs differ."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in list(saved) + [k for k in current if k not in saved]:
            where = f"{path}.{key}" if path else str(key)
            if key not in current:
                out.append(f"{where}: {saved[key]!r} -> absent")
            elif key not in saved:
                out.append(f"{where}: absent -> {current[key]!r}")
            else:
                out += _differences(saved[key], current[key], where)
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if saved == current else [f"{path}: {saved!r} -> {current!r}"]
