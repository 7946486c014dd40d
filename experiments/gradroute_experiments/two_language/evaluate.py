"""The v2 two-language evaluation: the core :class:`~lightning_gradroute.evaluation.UnlearningEvaluation` (measure,
ablate, coherence fine-tune, retraining attack, ``results.json``) with what the benchmark adds:

* **Attack budgets.** The retraining attack runs once per budget of English stories (``attack_budgets``, e.g.
  16 / 64 / 256), each with every learning rate and seed; ``attacks`` holds each budget's result, ``attack`` the
  first budget's (what the core reports).
* **Learning curves.** Every validation's ``val/loss_retain`` and ``val/loss_forget`` (``curves``), so a plain
  run shows whether training has flattened.
* **From scratch** (``method="scratch"``): the model is re-initialised before the measurements, so the attack
  measures how far the attack data alone takes an untrained model (the token-filtering paper's reference point);
  train it for one step.
* **SGTM's ablation.** SGTM's forget units are the ones its retain mode keeps out of the forward (and that the
  forget mode may change); its default mode updates them too, so they are not "units only forget data may
  change" (the core's ``ablate="dedicated"``). The evaluation finds them in the routes' tables (forget weight
  nonzero, ``retain_masked`` weight zero) and zeroes them (:func:`~lightning_gradroute.era.zero_units`), which
  removes each exactly (a neuron with zero input weights and bias outputs GELU(0) = 0; a head with zero q/k/v/out
  weights adds nothing).
* **Shared-rows control** (``reset_forget_rows=True``): after the method's ablation, the embedding and unembedding
  rows of the tokens that occur mostly in English (token-frequency retain weight below 0.5) are re-drawn from the
  model's initialisation, which removes whatever those rows learned about English.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from gradroute_experiments.text.causal_lm import CausalLM, token_mean_loss
from gradroute_experiments.two_language.bilingual import BilingualDataModule
from lightning_gradroute.era import zero_units
from lightning_gradroute.evaluation import UnlearningEvaluation
from lightning_gradroute.router import GradientRouter

__all__ = ["METHODS", "BilingualEvaluation", "sgtm_forget_units"]

METHODS = ("plain", "data_filtering", "token_filtering", "sgtm", "era", "scratch")
Method = Literal["plain", "data_filtering", "token_filtering", "sgtm", "era", "scratch"]


def sgtm_forget_units(
    router: GradientRouter, forget: str = "forget", retain_mode: str = "retain_masked"
) -> dict[str, tuple[int, list[int]]]:
    """``{parameter name: (dim, units)}``: the units of each routed parameter that ``forget`` may change and
    ``retain_mode`` may not (SGTM's forget units; the default mode may change every unit), from an attached
    ``router`` (:meth:`~lightning_gradroute.GradientRouter.dedicated_units` against the retain mode).

    Raises:
        ValueError: an unknown label, or no such unit.
    """
    return router.dedicated_units(forget, against=[retain_mode])


class BilingualEvaluation(UnlearningEvaluation):
    """Evaluate a v2 two-language run when ``fit`` ends (module docstring); list it after the routing callback.

    Args:
        method: one of :data:`METHODS`; checked against the trainer (SGTM needs a routing callback with the
            labels ``forget`` and ``retain_masked`` and no ablation of its own, ERA one with an expansion and
            ``ablate: contract``, token filtering a model with ``token_filter_threshold``).
        attack_budgets: English stories per attack, one attack per budget (each at most the attack pool).
        reset_forget_rows: the shared-rows control (module docstring).
        coherence_steps, coherence_lr, attack_steps, attack_lr, attack_batch_size, attack_seeds,
            attack_eval_every, eval_batch_size, results_file: as in
            :class:`~lightning_gradroute.evaluation.UnlearningEvaluation`.
    """

    def __init__(
        self,
        method: Method = "plain",
        attack_budgets: list[int] | tuple[int, ...] = (16, 64, 256),
        reset_forget_rows: bool = False,
        coherence_steps: int = 0,
        coherence_lr: float = 5e-5,
        attack_steps: int = 64,
        attack_lr: float | list[float] = 1e-3,
        attack_batch_size: int | None = 16,
        attack_seeds: int = 2,
        attack_eval_every: int = 8,
        eval_batch_size: int = 64,
        results_file: str = "results.json",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"BilingualEvaluation: method must be one of {METHODS}, got {method!r}")
        budgets = list(attack_budgets)
        if not budgets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
            raise ValueError(f"BilingualEvaluation: attack_budgets must be positive ints, got {attack_budgets!r}")
        if coherence_steps and method != "era":
            raise ValueError(f"BilingualEvaluation: coherence_steps is ERA's fine-tune, not {method!r}'s")
        super().__init__(
            loss_fn=token_mean_loss,
            coherence_steps=coherence_steps,
            coherence_lr=coherence_lr,
            attack_steps=attack_steps,
            attack_lr=attack_lr,
            attack_examples=budgets,
            attack_batch_size=attack_batch_size,
            attack_seeds=attack_seeds,
            attack_eval_every=attack_eval_every,
            attack_metrics=["forget"],
            eval_batch_size=eval_batch_size,
            results_file=results_file,
        )
        self.method, self.reset_forget_rows = method, reset_forget_rows
        self.curves: dict[str, list[float]] = {"step": [], "retain": [], "forget": []}
        self._forget_units: dict[str, tuple[int, list[int]]] = {}

    @override
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        who = f"BilingualEvaluation(method={self.method!r})"
        if not isinstance(pl_module, CausalLM):
            raise ValueError(f"{who}: the model must be a CausalLM, got {type(pl_module).__name__}")
        dm = trainer.datamodule
        if not isinstance(dm, BilingualDataModule):
            raise ValueError(f"{who}: fit with a BilingualDataModule (it provides the held-out sets)")
        routing = self.routing
        wanted = {
            "sgtm": routing is not None
            and routing.ablate != "dedicated"
            and not routing.expansions
            and {"forget", "retain_masked"} <= set(routing.router.label_names),
            "era": routing is not None and bool(routing.expansions) and routing.ablate == "contract",
        }.get(self.method, routing is None)
        if not wanted:
            raise ValueError(
                f"{who}: SGTM needs a GradientRoutingCallback with labels forget and retain_masked, no expansion "
                "and not ablate='dedicated' (this evaluation zeroes its forget units), ERA one with expansions and "
                "ablate='contract', the other methods none"
            )
        if (self.method == "token_filtering") != (pl_module.token_filter_threshold is not None):
            raise ValueError(f"{who}: token filtering, and only it, sets the model's token_filter_threshold")
        if (self.method == "data_filtering") != dm.hparams.drop_labelled_forget:
            raise ValueError(f"{who}: data filtering, and only it, sets the data's drop_labelled_forget")
        if self.method != "sgtm" and dm.hparams.retain_masked_fraction:
            raise ValueError(f"{who}: only SGTM has a retain mode (the data's retain_masked_fraction)")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/loss_forget" not in metrics:
            return
        self.curves["step"].append(trainer.global_step)
        for name in ("retain", "forget"):
            self.curves[name].append(round(float(metrics[f"val/loss_{name}"]), 4))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.method == "sgtm":  # while the router is attached (the routing callback detaches it at fit end)
            assert self.routing is not None
            self._forget_units = sgtm_forget_units(self.routing.router)
        super().on_train_end(trainer, pl_module)

    @override
    def ablate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        assert isinstance(pl_module, CausalLM)
        done: dict[str, Any] = {}
        if self.method == "scratch":
            torch.manual_seed(trainer.datamodule.hparams.seed)
            pl_module.model.apply(pl_module.model._init_weights)  # the model's own initialisation
            done["reinitialised"] = True
        if self.method == "sgtm":
            done["units_zeroed"] = zero_units(pl_module, self._forget_units)
        if self.reset_forget_rows:
            done["rows_reset"] = self._reset_forget_rows(trainer.datamodule, pl_module)
        return done

    @staticmethod
    def _reset_forget_rows(dm: BilingualDataModule, pl_module: CausalLM) -> int:
        """Re-draw the embedding and unembedding rows of the mostly-English tokens from the initialisation."""
        assert dm.token_weights is not None
        rows = (dm.token_weights < 0.5).nonzero().flatten()
        std = pl_module.model.config.initializer_range
        generator = torch.Generator().manual_seed(dm.hparams.seed)
        with torch.no_grad():
            model = pl_module.model
            for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
                fresh = torch.randn((len(rows), matrix.shape[1]), generator=generator) * std
                matrix[rows] = fresh.to(matrix)
        return len(rows)

    @override
    def metadata(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        dm = trainer.datamodule
        assert isinstance(dm, BilingualDataModule) and isinstance(pl_module, CausalLM)
        config = pl_module.model.config
        embeddings = sum(
            m.weight.numel()
            for m in (pl_module.model.get_input_embeddings(), pl_module.model.get_output_embeddings(),
                      pl_module.model.transformer.wpe)
        )  # fmt: skip
        return {
            "method": self.method,
            "recall": dm.hparams.recall,
            "reset_forget_rows": self.reset_forget_rows,
            "curves": self.curves,
            "data": dm.summary(),
            "model": {
                "hidden_size": config.hidden_size,
                "num_layers": config.num_layers,
                "num_heads": config.num_heads,
                "intermediate_size": config.intermediate_size,
                "vocab_size": config.vocab_size,
                "non_embedding_parameters": sum(p.numel() for p in pl_module.parameters()) - embeddings,
                "peak_lr": pl_module.lr,
            },
            "tokens_trained": trainer.global_step * dm.hparams.batch_size * (dm.hparams.max_tokens - 1),
        }
