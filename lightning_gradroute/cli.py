"""The ``gradroute`` console script: LightningCLI with any LightningModule / LightningDataModule by class path.

    gradroute fit --config recipes/toy/split.yaml
    gradroute fit --config recipes/toy/split.yaml --trainer.devices 8 --trainer.strategy ddp
    gradroute ablate --checkpoint last.ckpt --output ablated.ckpt     # see lightning_gradroute.ablate_cli

Every ``fit`` saves its final model under ``<log_dir>/final/`` (:class:`~lightning_gradroute.export.SaveFinalModel`,
configured as ``final_model``, appended after the config's callbacks; ``--final_model.enabled false`` turns it off).
"""

from __future__ import annotations

import sys

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_gradroute import ablate_cli
from lightning_gradroute.export import SaveFinalModel

__all__ = ["GradrouteCLI", "main"]


class GradrouteCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data; saves the resolved config and the final model."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: object) -> None:
        # Denormal floats slow CPU training by an order of magnitude once activations get tiny (L1 penalties);
        # flushing them changes no result that matters and keeps epoch times flat.
        torch.set_flush_denormal(True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,  # type: ignore[arg-type]
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``final_model``: :class:`SaveFinalModel`, after the config's callbacks (it saves what they leave)."""
        parser.add_lightning_class_args(SaveFinalModel, "final_model")


def main(args: list[str] | None = None) -> None:
    """``gradroute ablate ...`` ablates a saved checkpoint; every other subcommand is LightningCLI's."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["ablate"]:
        ablate_cli.main(argv[1:])
        return
    GradrouteCLI(args=args)


if __name__ == "__main__":
    main()
