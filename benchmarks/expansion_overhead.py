"""What an ERA expansion costs per training step: new units as branches (the library) vs widened weights.

The library adds new units *beside* each layer (``lightning_gradroute.new_units``): the up projection computes
its original outputs and the new ones separately and concatenates them, the activation runs on the two parts
separately, the down projection reads a contiguous copy of the original units and adds the new units'
contribution. That keeps every original layer on its original shapes (so the expanded model is bit-identical
on any BLAS), at the price of a few copies. The alternative it replaced widened the weights in place (one wider
matmul per layer, but a different kernel and different rounding). Three models, one process, same batches,
interleaved in rotating order each repeat:

* ``original``: the GPT of ``overhead.py`` (6 layers, d_model 256, MLP 1024);
* ``branches``: the same model after ``expand(..., add=64)`` on every MLP (``linear_pair``: fc, act, proj);
* ``widened``: a model with MLP 1088 holding exactly the branches model's weights (the old in-place growth).

Before timing, the script checks that ``branches`` and ``widened`` compute the same loss and gradients, so the
timings compare the same function. Measured: step time (forward + backward + AdamW + zero_grad; process CPU
time on CPU, see ``overhead.py``), peak memory of a step and saved-for-backward bytes.

Usage::

    python benchmarks/expansion_overhead.py          # CPU; writes benchmarks/results/expansion_overhead.{md,json}
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from compare import common_arguments, measure, report, write
from overhead import GPT, MLP, Variant, add_model_arguments
from torch import Tensor

from lightning_gradroute import Expansion, expand

RATIOS = (("branches", "original"), ("widened", "original"), ("branches", "widened"))


def widened_copy(expanded: GPT, d_model: int, added: int) -> GPT:
    """A GPT with MLPs ``added`` units wider that computes exactly what ``expanded`` (branches) computes."""
    wide = copy.deepcopy(expanded)
    for block, source in zip(wide.blocks, expanded.blocks):
        mlp = MLP(d_model, 4 * d_model + added)
        fc, proj = source.mlp.fc, source.mlp.proj
        with torch.no_grad():
            mlp.fc.weight.copy_(torch.cat([fc.weight, fc.new_units.weight]))
            mlp.fc.bias.copy_(torch.cat([fc.bias, fc.new_units.bias]))
            mlp.proj.weight.copy_(torch.cat([proj.weight, proj.new_units.weight], dim=1))
            mlp.proj.bias.copy_(proj.bias)
        block.mlp = mlp
    return wide


def build(args: argparse.Namespace) -> dict[str, Variant]:
    torch.manual_seed(args.seed)
    original = GPT(args.vocab, args.seq_len, args.d_model, args.layers, args.heads)
    branches = copy.deepcopy(original)
    spec = Expansion("blocks.*.mlp", preset="linear_pair", add=args.add, up=("fc",), down=("proj",),
                     between=("act",), output_init="match")  # fmt: skip
    expand(branches, [spec])
    models = {"original": original, "branches": branches, "widened": widened_copy(branches, args.d_model, args.add)}
    return {
        name: Variant(name, model, torch.optim.AdamW(model.parameters(), lr=1e-4), lambda _: contextlib.nullcontext())
        for name, model in models.items()
    }


def check_same_function(variants: dict[str, Variant], batch: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Branches and widened: same loss and gradients (the new units' parameters map onto the wide weights)."""
    out = {}
    for name in ("branches", "widened"):
        loss = variants[name].loss(*batch)
        grads = {n: p.grad.clone() for n, p in variants[name].model.named_parameters()}
        variants[name].optimizer.zero_grad(set_to_none=True)
        out[name] = (loss.item(), grads)
    (loss_b, g_b), (loss_w, g_w) = out["branches"], out["widened"]
    fc = torch.cat([g_b["blocks.0.mlp.fc.weight"], g_b["blocks.0.mlp.fc.new_units.weight"]])
    diff = {"loss": abs(loss_b - loss_w), "fc_grad": (fc - g_w["blocks.0.mlp.fc.weight"]).abs().max().item()}
    if diff["loss"] > 1e-4 or diff["fc_grad"] > 1e-4 * g_w["blocks.0.mlp.fc.weight"].abs().max().item():
        raise AssertionError(f"branches and widened compute different functions: {diff}")
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)  # --forget-fraction only shapes the (unused) labels of make_batch
    parser.add_argument("--add", type=int, default=64)
    common_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    results = measure(build(args), args, RATIOS, check_same_function)
    same = results["check"]
    description = [
        f"Model: the GPT of `overhead.py`, {args.layers} layers, d_model {args.d_model}, MLP {4 * args.d_model}; every "
        f"MLP expanded by {args.add} units; batch {args.batch_size} x seq {args.seq_len}; AdamW; fp32. Variants: "
        "`original` (unexpanded), `branches` (the library's `expand`: new units beside each layer, bit-identical on "
        "any BLAS), `widened` (the same function with the weights widened in place, as the library did before).",
        "",
        f"Same function check before timing (branches vs widened): |loss difference| {same['loss']:.1e}, max |fc "
        f"weight grad difference| {same['fc_grad']:.1e}.",
    ]
    markdown = report("ERA expansion overhead: new units as branches vs widened weights", "expansion_overhead.py",
                      description, results)  # fmt: skip
    write(results, markdown, args.out, "expansion_overhead")


if __name__ == "__main__":
    main()
