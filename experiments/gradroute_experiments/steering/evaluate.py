"""Evaluate a steering-scalar model: which tokens live on residual dimension ``dim``, and does adding to it steer?

The paper (§4 of its reference implementation) routes the loss on one target token (``" California"``) through
residual dimension 0 only, then reads the result two ways; :class:`SteeringEvaluation` does both when ``fit``
ends, for a :class:`~gradroute_experiments.text.causal_lm.CausalLM`:

1. **Nearest unembeddings.** The cosine of every token's unembedding with ``e_dim`` (component ``dim`` of the
   L2-normalised row): the ``num_neighbours`` tokens most aligned with ``+e_dim`` and with ``-e_dim``, as a table
   (``neighbours.md``) and a bar chart (``neighbours.png``, also in TensorBoard; the target in red, related tokens
   in orange).
2. **Steering.** Samples generated from ``<|endoftext|>`` with :func:`~lightning_gradroute.steering.steer` adding
   ``amount * sigma`` to dimension ``dim`` after ``steer_module`` for each amount in ``steer_values`` (0 is the
   unsteered baseline), where ``sigma`` is the dimension's standard deviation there on held-out stories (its mean
   at positions that predict the target and elsewhere is reported too: the routed feature itself). The
   direction is the side the target token landed on (the sign of its cosine: a coin flip of training, as the
   paper's README warns). Measured over ``num_samples`` samples per amount: how many samples contain the target
   token and how often it occurs, the same for ``related_tokens``, and example samples (``samples.md``).

**Absorption** (the paper's finding that related concepts join the routed one): the cosines of ``related_tokens``
(tokens chosen beforehand, e.g. other first names for a name) on the target's side, their ranks among all tokens,
and their mean against the vocabulary's mean in units of its standard error; and whether steering raises their
frequency too. Run the same recipe without routing (the control) to see what chance gives.

Everything lands in ``results.json`` under the log dir, beside the figure and the markdown files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor
from transformers import GenerationConfig
from typing_extensions import override

from lightning_gradroute.callback import GradientRoutingCallback
from lightning_gradroute.evaluation.losses import evaluation_mode
from gradroute_experiments.text.causal_lm import CausalLM, CausalLMEvaluation, weighted_token_losses
from lightning_gradroute.steering import steer

__all__ = ["SteeringEvaluation", "plot_neighbours", "unembedding_cosines"]


def unembedding_cosines(model: CausalLM, dim: int) -> Tensor:
    """``(vocab_size,)``: the cosine of each token's unembedding (output embedding row) with ``e_dim``."""
    weight = model.model.get_output_embeddings().weight.detach().float()
    return weight[:, dim] / weight.norm(dim=1).clamp_min(1e-12)


def plot_neighbours(
    positive: Sequence[tuple[str, float]],
    negative: Sequence[tuple[str, float]],
    dim: int,
    colors: Mapping[str, str] | None = None,
) -> Figure:
    """Two bar charts: the tokens most aligned with ``+e_dim`` and with ``-e_dim``; ``colors`` picks bar colours
    by token (default blue)."""
    colors = colors or {}
    figure = Figure(figsize=(10, 0.22 * max(len(positive), len(negative)) + 1.2), layout="constrained")
    for ax, pairs, side in zip(figure.subplots(1, 2), (positive, negative), ("+", "−")):
        tokens = [repr(t) for t, _ in pairs][::-1]
        values = [v for _, v in pairs][::-1]
        ax.barh(tokens, values, color=[colors.get(t, "tab:blue") for t, _ in pairs][::-1])
        ax.set_title(f"closest to {side}e{dim}")
        ax.set_xlabel(f"cosine with e{dim}")
        ax.tick_params(axis="y", labelsize=8)
    return figure


class SteeringEvaluation(CausalLMEvaluation):
    """Nearest unembeddings of ``±e_dim`` and a steering measurement, when ``fit`` ends (see the module docstring).

    Needs a :class:`~gradroute_experiments.text.causal_lm.CausalLM` and a data module with ``tokenizer``,
    ``eos_id``, ``splits`` (held-out ``retain_val`` / ``forget_val`` stories) and ``batches``, such as
    :class:`~gradroute_experiments.tinystories.data.TinyStoriesDataModule`.

    Example (what ``recipes/steering/lily.yaml`` does)::

        SteeringEvaluation(target_token=" Lily", steer_module="model.model.layers.3", steer_values=[0, 4, 8],
                           related_tokens=[" Tom", " Ben", " Sue"], num_samples=300)

    Args:
        target_token: the routed token, as text (one token of the tokenizer).
        steer_module: the block after which to steer, named relative to the LightningModule.
        dim: the residual dimension the target was routed to.
        steer_values: amounts to add, in standard deviations of the dimension at ``steer_module``, towards the
            target's side; include 0 for the unsteered baseline.
        related_tokens: tokens (text, one token each) to test for absorption.
        output_index: for blocks returning a tuple (GPT-2, GPT-Neo), the position of the hidden states.
        num_neighbours: tokens listed per side.
        num_samples, new_tokens: samples per steering amount and tokens generated per sample.
        sample_top_k, temperature: sampling (the paper: 200, 1.0).
        generation_batch: samples generated at once.
        shown_samples: samples per amount written to ``samples.md``.
        eval_batch_size: batch size for the held-out statistics.
        seed: the sampling seed (the same for every amount).
    """

    def __init__(
        self,
        target_token: str,
        steer_module: str,
        dim: int = 0,
        steer_values: Sequence[float] = (0.0, 4.0, 8.0),
        related_tokens: Sequence[str] = (),
        output_index: int | None = None,
        num_neighbours: int = 20,
        num_samples: int = 200,
        new_tokens: int = 100,
        sample_top_k: int = 200,
        temperature: float = 1.0,
        generation_batch: int = 100,
        shown_samples: int = 5,
        eval_batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_neighbours", num_neighbours),
            ("num_samples", num_samples),
            ("new_tokens", new_tokens),
            ("sample_top_k", sample_top_k),
            ("generation_batch", generation_batch),
            ("eval_batch_size", eval_batch_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SteeringEvaluation: {name} must be a positive int, got {value!r}")
        if not list(steer_values) or not all(math.isfinite(v) for v in steer_values):
            raise ValueError(f"SteeringEvaluation: steer_values must be finite numbers, got {list(steer_values)}")
        if not temperature > 0:
            raise ValueError(f"SteeringEvaluation: temperature must be > 0, got {temperature!r}")
        if target_token in related_tokens:
            raise ValueError(f"SteeringEvaluation: the target {target_token!r} is also among related_tokens")
        self.target_token = target_token
        self.steer_module = steer_module
        self.dim = dim
        self.steer_values = [float(v) for v in steer_values]
        self.related_tokens = list(related_tokens)
        self.output_index = output_index
        self.num_neighbours = num_neighbours
        self.num_samples, self.new_tokens = num_samples, new_tokens
        self.sample_top_k, self.temperature = sample_top_k, temperature
        self.generation_batch, self.shown_samples = generation_batch, shown_samples
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    @override
    def check(self, trainer: pl.Trainer, pl_module: CausalLM) -> None:
        for attribute in ("tokenizer", "splits", "batches", "single_token"):
            if not hasattr(trainer.datamodule, attribute):
                raise ValueError(f"SteeringEvaluation: the data module has no {attribute!r} (see the docstring)")
        pl_module.get_submodule(self.steer_module)  # fail now on a wrong name

    # ------------------------------------------------------------------ pieces
    def _held_out(self, trainer: pl.Trainer) -> list[dict[str, Tensor]]:
        dm = trainer.datamodule
        if trainer.fast_dev_run:
            return list(dm.batches(dm.splits.retain_val[:2] + dm.splits.forget_val[:2], self.eval_batch_size))
        return list(dm.batches(dm.splits.retain_val + dm.splits.forget_val, self.eval_batch_size))

    def _dimension_stats(
        self, model: CausalLM, batches: list[dict[str, Tensor]], target: int
    ) -> dict[str, float | None]:
        """Feature ``dim`` at ``steer_module``'s output over the real positions of ``batches``: its standard
        deviation, and its mean where the next token is the target and where it is not."""
        values: list[Tensor] = []
        at_target: list[Tensor] = []

        def record(module: Any, args: Any, output: Any) -> None:
            hidden = output if self.output_index is None else output[self.output_index]
            values.append(hidden[..., self.dim][real].float().cpu())

        handle = model.get_submodule(self.steer_module).register_forward_hook(record)
        try:
            with evaluation_mode(model):
                for batch in batches:
                    batch = move_data_to_device(batch, model.device)
                    real = (batch["attention_mask"][:, :-1] * batch["attention_mask"][:, 1:]).bool()
                    at_target.append((batch["input_ids"][:, 1:] == target)[real].cpu())
                    model.token_losses(batch)
        finally:
            handle.remove()
        value, hit = torch.cat(values), torch.cat(at_target)
        return {
            "sigma": round(float(value.std()), 4),
            "mean_before_target": round(float(value[hit].mean()), 4) if hit.any() else None,
            "mean_elsewhere": round(float(value[~hit].mean()), 4),
        }

    def _generate(self, model: CausalLM, eos_id: int, value: float, quick: bool) -> Tensor:
        """``num_samples`` samples of ``new_tokens`` tokens from ``<|endoftext|>``, steered by ``value`` (two samples
        of four tokens when ``quick``)."""
        num_samples = 2 if quick else self.num_samples
        config = GenerationConfig(
            do_sample=True,
            top_k=self.sample_top_k,
            temperature=self.temperature,
            max_new_tokens=4 if quick else self.new_tokens,
            eos_token_id=None,  # never stop early: every sample has new_tokens tokens
            pad_token_id=eos_id,
            bos_token_id=None,
        )
        torch.manual_seed(self.seed)
        chunks = []
        with evaluation_mode(model), steer(model, self.steer_module, self.dim, value, self.output_index):
            for start in range(0, num_samples, self.generation_batch):
                rows = min(self.generation_batch, num_samples - start)
                prompt = torch.full((rows, 1), eos_id, dtype=torch.long, device=model.device)
                out = model.model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config
                )
                chunks.append(out[:, 1:].cpu())
        return torch.cat(chunks)

    @staticmethod
    def _occurrences(samples: Tensor, token_ids: list[int]) -> dict[str, float]:
        """Share of samples containing any of ``token_ids`` and their mean count per sample, with standard errors."""
        counts = torch.isin(samples, torch.tensor(token_ids)).sum(dim=1).double()
        present = (counts > 0).double()
        n = counts.numel()
        return {
            "share_of_samples": float(present.mean()),
            "share_of_samples_se": float(present.std() / math.sqrt(n)) if n > 1 else 0.0,
            "per_sample": float(counts.mean()),
            "per_sample_se": float(counts.std() / math.sqrt(n)) if n > 1 else 0.0,
        }

    # --------------------------------------------------------------- the stage
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        assert isinstance(pl_module, CausalLM)
        started = time.perf_counter()
        dm = trainer.datamodule
        tokenizer = dm.tokenizer
        target = dm.single_token(self.target_token, "SteeringEvaluation target_token")
        related = {text: dm.single_token(text, "SteeringEvaluation related token") for text in self.related_tokens}
        cosines = unembedding_cosines(pl_module, self.dim)
        sign = 1.0 if cosines[target] >= 0 else -1.0
        on_side = cosines * sign  # the target's side is positive
        order = on_side.argsort(descending=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(1, order.numel() + 1)

        def entry(token: int) -> dict[str, Any]:
            return {
                "token": tokenizer.decode([token]),
                "id": token,
                "cosine": round(float(cosines[token]), 4),
                "rank_on_target_side": int(rank[token]),
            }

        positive = cosines.argsort(descending=True)[: self.num_neighbours].tolist()
        negative = cosines.argsort()[: self.num_neighbours].tolist()
        neighbours = {"positive": [entry(t) for t in positive], "negative": [entry(t) for t in negative]}
        absorption: dict[str, Any] = {}
        if related:
            ids = torch.tensor(list(related.values()))
            others = torch.cat([on_side[:target], on_side[target + 1 :]])
            mean, std, related_mean = float(others.mean()), float(others.std()), float(on_side[ids].mean())
            absorption = {
                "related": [entry(t) for t in related.values()],
                "related_mean_cosine_on_target_side": round(related_mean, 4),
                "vocab_mean_cosine_on_target_side": round(mean, 4),
                "z_score_of_related_mean": round((related_mean - mean) / (std / math.sqrt(len(ids))), 2),
                "related_in_top_neighbours": sum(int(rank[t]) <= self.num_neighbours for t in related.values()),
                "median_rank_of_related": float(rank[ids].double().median()),
            }

        held_out = self._held_out(trainer)
        stats = self._dimension_stats(pl_module, held_out, target)
        sigma = float(stats["sigma"])  # type: ignore[arg-type]
        only_target = torch.zeros(cosines.numel())
        only_target[target] = 1.0
        tables = {"other_tokens": 1 - only_target}
        if any(bool((batch["input_ids"][:, 1:] == target).any()) for batch in held_out):
            tables["target_token"] = only_target
        else:
            rank_zero_warn(f"SteeringEvaluation: {self.target_token!r} never occurs in the held-out documents")
        losses = weighted_token_losses(pl_module, held_out, tables)
        quick = bool(trainer.fast_dev_run)
        settings, shown = [], {}
        for amount in self.steer_values[:1] if quick else self.steer_values:
            added = sign * amount * sigma + 0.0  # no -0.0
            samples = self._generate(pl_module, dm.eos_id, added, quick)
            setting = {"amount_sd": amount, "added": round(added, 4), "target": self._occurrences(samples, [target])}
            if related:
                setting["related"] = self._occurrences(samples, list(related.values()))
            settings.append(setting)
            shown[amount] = [tokenizer.decode(row.tolist()) for row in samples[: self.shown_samples]]
        results = {
            "target": entry(target),
            "dim": self.dim,
            "target_side": "+" if sign > 0 else "-",
            "neighbours": neighbours,
            "absorption": absorption,
            "held_out_loss": losses,  # target_token is absent when the target never occurs there
            "steering": {
                "module": self.steer_module,
                **stats,
                "num_samples": self.num_samples,
                "new_tokens": self.new_tokens,
                "settings": settings,
            },
            "routed": any(isinstance(cb, GradientRoutingCallback) for cb in trainer.callbacks),
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "steps_trained": trainer.global_step,
            "evaluation_seconds": round(time.perf_counter() - started, 1),
        }
        self.write_results(results)
        self._write(trainer, neighbours, dict.fromkeys(related, "tab:orange") | {self.target_token: "tab:red"}, shown)

    def _write(
        self,
        trainer: pl.Trainer,
        neighbours: dict[str, list[dict[str, Any]]],
        colors: dict[str, str],
        shown: dict[float, list[str]],
    ) -> None:
        out = self.out_dir
        pairs = {side: [(e["token"], e["cosine"]) for e in entries] for side, entries in neighbours.items()}
        figure = plot_neighbours(pairs["positive"], pairs["negative"], self.dim, colors)
        figure.savefig(out / "neighbours.png", dpi=120)
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_figure("steering/neighbours", figure, trainer.global_step)
        e = f"e{self.dim}"
        rows = [f"| rank | closest to +{e} | cosine | closest to −{e} | cosine |", "|---|---|---|---|---|"]
        for i, (pos, neg) in enumerate(zip(neighbours["positive"], neighbours["negative"]), start=1):
            cells = [f"`{pos['token']!r}`", f"{pos['cosine']:+.3f}", f"`{neg['token']!r}`", f"{neg['cosine']:+.3f}"]
            rows.append(f"| {i} | " + " | ".join(cells) + " |")
        (out / "neighbours.md").write_text("\n".join(rows) + "\n")
        sections = []
        for setting in self.results["steering"]["settings"]:
            amount = setting["amount_sd"]
            title = f"## {amount:g} standard deviations added to dim {self.dim} after {self.steer_module}"
            body = "\n\n".join(f"{i + 1}. {text.strip()}" for i, text in enumerate(shown[amount]))
            sections.append(f"{title} ({setting['added']:+.3f})\n\n{body}\n")
        (out / "samples.md").write_text("\n".join(sections))
        target = self.results["target"]
        settings = self.results["steering"]["settings"]
        rates = [f"{s['amount_sd']:g} sd: {s['target']['per_sample']:.3f}" for s in settings]
        rank_zero_info(
            f"steering results: {out / 'results.json'}; target {target['token']!r} cosine {target['cosine']:+.3f} "
            f"(rank {target['rank_on_target_side']}); target tokens per sample: {', '.join(rates)}"
        )

