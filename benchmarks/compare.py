"""A small harness shared by the comparison benchmarks: train several variants of one model in one process on
the same batches, interleaved in rotating order, and report paired step-time ratios, peak memory and
saved-for-backward bytes (measured as in ``overhead.py``, whose helpers it uses)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from overhead import Variant, cpu_peak_bytes, make_batch, saved_activation_bytes, summary, timed_step

__all__ = ["common_arguments", "measure", "report", "write"]


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """Repeats, warm-up, threads, seed and output folder."""
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")


def measure(
    variants: dict[str, Variant],
    args: argparse.Namespace,
    ratios: Sequence[tuple[str, str]],
    check: Callable[[dict[str, Variant], Any], dict[str, float]],
) -> dict[str, Any]:
    """Check the variants with ``check(variants, batch)`` (it raises if they do not compute what they should),
    then measure them; ratios ``a/b`` are paired within each repeat (one step each; process CPU time on the CPU,
    wall-clock time with synchronisation on CUDA, where the peak memory comes from the CUDA allocator)."""
    device = torch.device(getattr(args, "device", "cpu"))
    on_cpu = device.type == "cpu"
    generator = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
            "parameters": {n: sum(p.numel() for p in v.model.parameters()) for n, v in variants.items()},
        },
        "check": check(variants, make_batch(args, device, generator)),
    }
    batch = make_batch(args, device, generator)
    for _ in range(args.warmup):
        for variant in variants.values():
            variant.step(*batch)
    results["saved_bytes"] = {n: saved_activation_bytes(v, batch) for n, v in variants.items()}
    if on_cpu:
        results["peak_bytes"] = {n: statistics.median(cpu_peak_bytes(v, batch) for _ in range(3))
                                 for n, v in variants.items()}  # fmt: skip
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[int]] = {name: [] for name in names}
    for r in range(args.repeats):
        batch = make_batch(args, device, generator)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu, peak = timed_step(variants[name], batch, device)
            seconds[name].append(cpu if on_cpu else wall)
            if peak is not None:
                peaks[name].append(peak)
    if not on_cpu:
        results["peak_bytes"] = {name: max(values) for name, values in peaks.items()}
    results["cpu_seconds"] = seconds
    results["ratios"] = (
        {f"cpu time {a}/{b}": summary([x / y for x, y in zip(seconds[a], seconds[b])]) for a, b in ratios}
        | {f"peak memory {a}/{b}": results["peak_bytes"][a] / results["peak_bytes"][b] for a, b in ratios}
        | {f"saved activations {a}/{b}": results["saved_bytes"][a] / results["saved_bytes"][b] for a, b in ratios}
    )
    results["environment"]["loadavg_end"] = os.getloadavg()
    results["wall_seconds"] = time.perf_counter() - start
    return results


def report(title: str, script: str, description: Sequence[str], results: dict[str, Any]) -> str:
    """Markdown: the command, the description, the ratio table and the absolute numbers."""
    env = results["environment"]
    mib = 2**20
    lines = [f"# {title}", "", f"Reproduce: `{' '.join([f'python benchmarks/{script}', *sys.argv[1:]])}`", "",
             *description, "", "| ratio | median | IQR (q1 - q3) |", "|---|---|---|"]  # fmt: skip
    for key, value in results["ratios"].items():
        if isinstance(value, dict):
            lines.append(f"| {key} | **{value['median']:.3f}** | {value['q1']:.3f} - {value['q3']:.3f} |")
        else:
            lines.append(f"| {key} | **{value:.3f}** | (deterministic) |")
    lines += ["", "| variant | cpu step median ms | peak memory above pre-step MiB | saved activations MiB |",
              "|---|---|---|---|"]  # fmt: skip
    for name, seconds in results["cpu_seconds"].items():
        lines.append(f"| {name} | {statistics.median(seconds) * 1e3:.1f} | {results['peak_bytes'][name] / mib:.2f} | "
                     f"{results['saved_bytes'][name] / mib:.2f} |")  # fmt: skip
    lines += [
        "",
        f"{results['config'].get('device', 'cpu')} ({env['cpu_capability']}, {env['threads']} thread(s)), torch "
        f"{env['torch']}. Step = forward + backward + optimizer step + zero_grad; step time is process CPU time on "
        "the CPU (wall-clock with synchronisation on CUDA), paired within each of "
        f"{results['config']['repeats']} repeats (rotating order), as in `overhead.md`; memory as measured there "
        f"(allocator events for the peak, unique saved storages). Load average {env['loadavg_start'][0]:.1f} at "
        f"start, {env['loadavg_end'][0]:.1f} at end; total wall time {results['wall_seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], markdown: str, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
