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
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from overhead import (
    GPT,
    MLP,
    Variant,
    add_model_arguments,
    cpu_peak_bytes,
    make_batch,
    saved_activation_bytes,
    summary,
    timed_step,
)
from torch import Tensor

from lightning_gradroute import Expansion, expand

VARIANTS = ("original", "branches", "widened")
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


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device("cpu")
    variants = build(args)
    generator = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    results: dict = {
        "config": vars(args),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
            "parameters": {n: sum(p.numel() for p in v.model.parameters()) for n, v in variants.items()},
        },
        "same_function": check_same_function(variants, make_batch(args, device, generator)),
    }
    batch = make_batch(args, device, generator)
    for _ in range(args.warmup):
        for variant in variants.values():
            variant.step(*batch)
    results["saved_bytes"] = {n: saved_activation_bytes(v, batch) for n, v in variants.items()}
    results["peak_bytes"] = {
        name: statistics.median(cpu_peak_bytes(variant, batch) for _ in range(3)) for name, variant in variants.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.repeats):
        batch = make_batch(args, device, generator)
        for name in VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]:
            seconds[name].append(timed_step(variants[name], batch, device)[1])  # process CPU time
    results["cpu_seconds"] = seconds
    results["ratios"] = {
        f"cpu time {a}/{b}": summary([x / y for x, y in zip(seconds[a], seconds[b])]) for a, b in RATIOS
    } | {f"peak memory {a}/{b}": results["peak_bytes"][a] / results["peak_bytes"][b] for a, b in RATIOS} | {
        f"saved activations {a}/{b}": results["saved_bytes"][a] / results["saved_bytes"][b] for a, b in RATIOS
    }
    results["environment"]["loadavg_end"] = os.getloadavg()
    results["wall_seconds"] = time.perf_counter() - start
    return results


def markdown(results: dict) -> str:
    cfg, env, r = results["config"], results["environment"], results["ratios"]
    mib = 2**20
    lines = [
        "# ERA expansion overhead: new units as branches vs widened weights",
        "",
        f"Reproduce: `{' '.join(['python benchmarks/expansion_overhead.py', *sys.argv[1:]])}`",
        "",
        f"Model: the GPT of `overhead.py`, {cfg['layers']} layers, d_model {cfg['d_model']}, MLP {4 * cfg['d_model']}; "
        f"every MLP expanded by {cfg['add']} units; batch {cfg['batch_size']} x seq {cfg['seq_len']}; AdamW; fp32 "
        f"on CPU ({env['cpu_capability']}, {env['threads']} thread(s)); torch {env['torch']}. Parameters: "
        + ", ".join(f"{n} {p / 1e6:.2f} M" for n, p in env["parameters"].items()) + ".",
        "",
        "Same function check before timing (branches vs widened): |loss difference| "
        f"{results['same_function']['loss']:.1e}, max |fc weight grad difference| "
        f"{results['same_function']['fc_grad']:.1e}.",
        "",
        "| ratio | median | IQR (q1 - q3) |",
        "|---|---|---|",
    ]
    for key, value in r.items():
        if isinstance(value, dict):
            lines.append(f"| {key} | **{value['median']:.3f}** | {value['q1']:.3f} - {value['q3']:.3f} |")
        else:
            lines.append(f"| {key} | **{value:.3f}** | (deterministic) |")
    lines += [
        "",
        "| model | cpu step median ms | peak memory above pre-step MiB | saved activations MiB |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        lines.append(
            f"| {name} | {statistics.median(results['cpu_seconds'][name]) * 1e3:.1f} | "
            f"{results['peak_bytes'][name] / mib:.2f} | {results['saved_bytes'][name] / mib:.2f} |"
        )
    lines += [
        "",
        f"Step time is process CPU time, paired within each of {cfg['repeats']} repeats (rotating order), as in "
        "`overhead.md`; memory as measured there (allocator events for the peak, unique saved storages). Load "
        f"average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end; total wall time "
        f"{results['wall_seconds']:.0f} s. Raw numbers: `expansion_overhead.json`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)  # --forget-fraction only shapes the (unused) labels of make_batch
    parser.add_argument("--add", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "expansion_overhead.json").write_text(json.dumps(results, indent=1))
    (args.out / "expansion_overhead.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
