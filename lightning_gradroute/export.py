"""Keep what a fit trained: :class:`SaveFinalModel` writes the final model at the end of ``fit``.

"Final" is the model as its ``on_fit_end`` finds it, after the callbacks before it (the ``gradroute`` CLI appends
it after the config's): after the routing callback's ablation and what evaluation callbacks do to the model in
place (a coherence fine-tune, DEMix keeping the retain experts); retraining attacks restore the weights.
``<log_dir>/final/`` (or ``directory``) holds:

    model.ckpt          weights-only Lightning checkpoint: ``MyModule.load_from_checkpoint(path)`` (a contracted ERA
                        model loads into the unexpanded module; a ``GradientRoutingMixin`` contracts itself)
    model.safetensors   the state dict, as :func:`~lightning_gradroute.save_ablated` writes it
    hf/<name>/          each outermost HF ``PreTrainedModel`` (not for a still expanded model) with the data module's
                        ``tokenizer``: ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_gradroute._compat import strategy_family, dump_weights
from lightning_gradroute.callback import routing_callback_before
from lightning_gradroute.era import expansion_record, hf_folders, save_ablated

__all__ = ["SaveFinalModel"]


class SaveFinalModel(Callback):
    """Save the final model of ``fit`` (layout and loaders: the module docstring), e.g.
    ``Trainer(callbacks=[GradientRoutingCallback(...), SaveFinalModel()])``.

    Under DDP (or one device) rank 0 writes alone, so ranks 1.. need not wait for rank-0-only evaluation
    callbacks; a sharded model (FSDP2) is gathered, and its ``model.ckpt`` is a distributed checkpoint folder.

    Args:
        enabled: write anything at all.
        directory: where to write; default ``<trainer.log_dir or default_root_dir>/final``.
        checkpoint: also write ``model.ckpt`` (``model.safetensors`` and ``hf/`` are always written).
    """

    def __init__(self, enabled: bool = True, directory: str | None = None, checkpoint: bool = True) -> None:
        self.enabled, self.checkpoint, self._directory = enabled, checkpoint, directory
        #: Where the final model goes, resolved (absolute) in ``setup("fit")``; ``None`` when disabled.
        self.directory: Path | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        routing_callback_before(trainer, self, "SaveFinalModel")
        root = Path(trainer.log_dir or trainer.default_root_dir) / "final"  # log_dir broadcasts: every rank, here
        self.directory = Path(self._directory or root).resolve()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.directory is None:
            return
        hf = expansion_record(pl_module) is None  # an expanded model's shapes do not fit its HF config
        collective = strategy_family(trainer.strategy) not in ("single", "ddp")
        if collective or trainer.is_global_zero:
            save_ablated(pl_module, self.directory, hf=hf, write=trainer.is_global_zero)
        if trainer.is_global_zero and hf:
            self._save_tokenizers(trainer, pl_module)
        if self.checkpoint and collective:
            trainer.save_checkpoint(self.directory / "model.ckpt", weights_only=True)
        elif self.checkpoint and trainer.is_global_zero:
            trainer.strategy.save_checkpoint(dump_weights(trainer), self.directory / "model.ckpt")
        rank_zero_info(f"final model saved to {self.directory}")

    def _save_tokenizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Next to every HF model: the data module's ``tokenizer`` (a ``tokenizers.Tokenizer`` is wrapped with
        the data module's ``eos_id``, or the model config's, as eos and pad token)."""
        datamodule = getattr(trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        folders = hf_folders(pl_module, self.directory)  # type: ignore[arg-type]
        if tokenizer is None or not folders:
            return
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

        for name, folder in folders:
            if isinstance(tokenizer, Tokenizer):
                eos_id = getattr(datamodule, "eos_id", None)
                eos_id = eos_id if isinstance(eos_id, int) else pl_module.get_submodule(name).config.eos_token_id
                eos = tokenizer.id_to_token(eos_id) if isinstance(eos_id, int) else None
                wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos)
                wrapped.save_pretrained(folder)
            elif isinstance(tokenizer, PreTrainedTokenizerBase):
                tokenizer.save_pretrained(folder)
            else:
                rank_zero_warn(
                    f"SaveFinalModel: the data module's tokenizer is a {type(tokenizer).__name__}, neither a "
                    f"tokenizers.Tokenizer nor a transformers tokenizer; {folder} has the model without it"
                )
