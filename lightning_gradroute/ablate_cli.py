"""``gradroute ablate``: remove the expanded units from a saved mid-ERA Lightning checkpoint, later, offline.

    gradroute ablate --checkpoint runs/era/checkpoints/last.ckpt --output ablated.ckpt
    gradroute ablate --checkpoint last.ckpt --output ablated.safetensors        # weights only
    gradroute ablate --checkpoint last.ckpt --output zeroed.ckpt --mode zero    # keep the expanded shapes

The checkpoint must come from a run with :class:`~lightning_gradroute.GradientRoutingCallback` expansions (or a
:class:`~lightning_gradroute.GradientRoutingMixin` module that expanded itself): its ``checkpoint["gradroute"]``
says which tensors were grown and how, so no model needs to be built. A ``.ckpt`` output keeps everything but
the optimizer and scheduler states (their shapes no longer fit) and records the new phase, so
``MyModule.load_from_checkpoint("ablated.ckpt")`` gives the ablated model. A ``.safetensors`` output holds the
state dict alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from safetensors.torch import save_file

from lightning_gradroute.era import CHECKPOINT_KEY, Ablation, EraState, Phase, ablate_state_dict, read_checkpoint

__all__ = ["ablate_checkpoint", "main"]

def ablate_checkpoint(*, checkpoint: str, output: str, mode: Literal["contract", "zero"] = "contract") -> Path:
    """Ablate the expanded units of a saved Lightning checkpoint.

    Args:
        checkpoint: a ``.ckpt`` saved while the model was expanded.
        output: where to write: ``*.safetensors`` for the state dict alone, anything else for a checkpoint.
        mode: ``contract`` slices the tensors back to the original shapes; ``zero`` zeroes the new units.

    Returns:
        The output path.
    """
    ablation = Ablation.parse(mode, "gradroute ablate", expansion=True)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved = read_checkpoint(ckpt, f"gradroute ablate: {checkpoint}") if isinstance(ckpt, dict) else None
    if saved is None or "state_dict" not in ckpt:
        raise ValueError(
            f"gradroute ablate: {checkpoint} has no checkpoint[{CHECKPOINT_KEY!r}]; it was not saved mid-ERA"
        )
    if saved.phase is not Phase.EXPANDED:
        raise ValueError(f"gradroute ablate: {checkpoint} is already ablated (phase {saved.phase.value!r})")
    state = ablate_state_dict(ckpt["state_dict"], saved.record, ablation)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        # Clone so tensors that shared storage in the checkpoint (tied embeddings) are saved separately.
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
        return path
    for key in ("optimizer_states", "lr_schedulers"):
        ckpt.pop(key, None)
    ckpt["state_dict"] = state
    ckpt[CHECKPOINT_KEY] = EraState(saved.record, ablation.phase).to_dict()  # type: ignore[arg-type]
    torch.save(ckpt, path)
    return path


def main(args: list[str] | None = None) -> None:
    path = CLI(ablate_checkpoint, args=args, prog="gradroute ablate")
    print(f"ablated weights written to {path}")
