"""The GPU suite: unrouted vs activation vs parameter routing on an HF causal LM, eager and compiled, activation
checkpointing off and on, in one process.

For each cell (compile x checkpointing) three variants of one model train on the same batches, one step each
per repeat in rotating order, after warm-up:

* ``unrouted``: ``torch.optim.AdamW``, no routing;
* ``activation``: the MLP neurons of every block routed (``Target(blocks, component="neurons")``, forget tokens
  -0.75 on the original neurons and 1 on the last ``--dedicated``), AdamW;
* ``parameter``: SGTM-style parameter routing of every block's MLP neurons and attention heads
  (``ParameterTarget(modules=blocks, component=...)``: forget tokens change only the last ``--dedicated`` neurons
  and the last head, retain tokens everything else) with ``RoutedAdamW``.

Reported per variant: tokens/s, MFU (model FLOPs ``6 N + 12 L d T`` per token over the card's dense bf16 peak,
``--peak-tflops``), peak reserved memory (CUDA), the step time's median and quartiles, and graphs compiled; per
cell, the paired step-time ratios against ``unrouted``. A variant that fails (an error at its first step) is
recorded with its error instead of numbers. Results: ``benchmarks/results/<name>.{md,json}``.

Usage::

    python benchmarks/gpu_suite.py                          # a GPU: ~124M-parameter Llama, bf16, 8 x 1024
    python benchmarks/gpu_suite.py --model gpt_neo
    python benchmarks/gpu_suite.py --device cpu --tiny --backend aot_eager --repeats 3 --name gpu_suite_cpu_tiny
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers
from compare import common_arguments, write
from overhead import Variant, make_batch, summary, timed_step
from overhead_hf import Logits
from torch import Tensor, nn

from lightning_gradroute import GradientRouter, ParameterTarget, Route, RoutedAdamW, Target

VARIANTS = ("unrouted", "activation", "parameter")
BLOCKS = {"llama": "model.model.layers.*", "gpt_neo": "model.transformer.h.*"}
#: dense bf16 peak TFLOP/s by device name fragment (SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def build_model(args: argparse.Namespace) -> nn.Module:
    if args.model == "llama":
        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=args.seq_len, tie_word_embeddings=False,
        )  # fmt: skip
        return Logits(transformers.LlamaForCausalLM(config))
    config = transformers.GPTNeoConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff, num_layers=args.layers,
        num_heads=args.heads, attention_types=[[["global"], args.layers]], max_position_embeddings=args.seq_len,
        embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
    )  # fmt: skip
    return Logits(transformers.GPTNeoForCausalLM(config))


def routing(name: str, args: argparse.Namespace) -> GradientRouter | None:
    blocks, k = BLOCKS[args.model], args.dedicated
    if name == "activation":
        return GradientRouter({"mlp": Target(blocks, component="neurons")},
                              [Route("forget", "mlp", {f":-{k}": -0.75, f"-{k}:": 1.0})])  # fmt: skip
    if name == "parameter":
        targets = {"mlp": ParameterTarget(modules=blocks, component="neurons"),
                   "heads": ParameterTarget(modules=blocks, component="heads")}  # fmt: skip
        dedicated = {"mlp": f"-{k}:", "heads": f"-{args.dedicated_heads}:"}
        shared = {"mlp": f":-{k}", "heads": f":-{args.dedicated_heads}"}
        return GradientRouter(targets, [Route("forget", t, {shared[t]: 0.0}) for t in targets]
                              + [Route("retain", t, {dedicated[t]: 0.0}) for t in targets])  # fmt: skip
    return None


def build_variants(args: argparse.Namespace, compiled: bool, checkpointing: bool) -> dict[str, Variant]:
    torch.manual_seed(args.seed)
    base = build_model(args).to(args.device)
    variants = {}
    for name in VARIANTS:
        model = copy.deepcopy(base)
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        router = routing(name, args)
        route: Callable[[Tensor], Any] = lambda labels: contextlib.nullcontext()  # noqa: E731
        if router is not None:
            route = router.attach(model).route
        optimizer_class = RoutedAdamW if name == "parameter" else torch.optim.AdamW
        optimizer = optimizer_class(model.parameters(), lr=1e-4, weight_decay=0.1)
        runnable = torch.compile(model, backend=args.backend) if compiled else model
        variants[name] = Variant(name, runnable, optimizer, _in_dtype(route, args))
    return variants


def _in_dtype(route: Callable[[Tensor], Any], args: argparse.Namespace) -> Callable[[Tensor], Any]:
    @contextlib.contextmanager
    def routed(labels: Tensor) -> Any:
        with route(labels), torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                                           enabled=args.dtype == "bf16"):  # fmt: skip
            yield

    return routed


def flops_per_token(args: argparse.Namespace, parameters: int) -> float:
    """``6 N + 12 L d T``: N the parameters outside the input embedding, plus attention's score and value matmuls."""
    return 6.0 * (parameters - args.vocab * args.d_model) + 12.0 * args.layers * args.d_model * args.seq_len


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (recompilations included)."""
    from torch._dynamo.utils import counters  # benchmark-only read of dynamo's public-in-practice counters

    return int(counters["stats"]["unique_graphs"])


def run_cell(args: argparse.Namespace, compiled: bool, checkpointing: bool) -> dict[str, Any]:
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    variants = build_variants(args, compiled, checkpointing)
    cell: dict[str, Any] = {"compile": compiled, "checkpointing": checkpointing, "variants": {}}
    alive = {}
    batch = make_batch(args, device, generator)
    for name, variant in variants.items():
        before = compiled_graphs()
        try:
            for _ in range(args.warmup):
                variant.step(*batch)
        except Exception as err:  # a configuration the library refuses or cannot run: recorded, not hidden
            cell["variants"][name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            continue
        cell["variants"][name] = {"graphs_warmup": compiled_graphs() - before}
        alive[name] = variant
    seconds: dict[str, list[float]] = {name: [] for name in alive}
    reserved: dict[str, int] = dict.fromkeys(alive, 0)
    graphs = compiled_graphs()
    names = list(alive)
    for r in range(args.repeats):
        batch = make_batch(args, device, generator)  # new labels every step: recompiling on them would show here
        for name in names[r % len(names) :] + names[: r % len(names)] if names else []:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            wall, _, _ = timed_step(alive[name], batch, device)
            seconds[name].append(wall)
            if device.type == "cuda":
                reserved[name] = max(reserved[name], torch.cuda.max_memory_reserved(device))
    cell["graphs_after_warmup"] = compiled_graphs() - graphs
    flops = flops_per_token(args, sum(p.numel() for p in variants["unrouted"].optimizer.param_groups[0]["params"]))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    tokens = args.batch_size * args.seq_len
    for name in alive:
        step = summary(seconds[name])
        tokens_per_s = tokens / step["median"]
        cell["variants"][name] |= {
            "step_seconds": step,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops / peak if peak else None,
            "peak_reserved_bytes": reserved[name] if device.type == "cuda" else None,
        }
        if name != "unrouted" and "unrouted" in alive:
            cell["variants"][name]["step_ratio_vs_unrouted"] = summary(
                [a / b for a, b in zip(seconds[name], seconds["unrouted"])]
            )
            if device.type == "cuda":
                cell["variants"][name]["reserved_ratio_vs_unrouted"] = reserved[name] / reserved["unrouted"]
    del variants, alive
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cell


def report(results: dict[str, Any]) -> str:
    env, config = results["environment"], results["config"]
    lines = [
        "# GPU suite: routing in a training stack",
        "",
        f"Reproduce: `{' '.join(['python benchmarks/gpu_suite.py', *sys.argv[1:]])}`",
        "",
        f"Device: {env['device_name']}; torch {env['torch']}. Model: HF {config['model']} from a config, "
        f"{env['parameters'] / 1e6:.1f}M parameters ({config['layers']} layers, d_model {config['d_model']}, "
        f"{config['heads']} heads), {config['dtype']}, batch {config['batch_size']} x {config['seq_len']}, "
        f"per-token labels ({config['forget_fraction']:.0%} forget); {config['warmup']} warm-up steps, "
        f"{config['repeats']} timed steps per variant (rotating order). MFU against "
        + (f"{config['peak_tflops']:.0f} TFLOP/s" if config["peak_tflops"] else "no known peak (not reported)")
        + ".",
        "",
        "| compile | checkpointing | variant | tokens/s | MFU | peak reserved GiB | step ms (median, q1-q3) "
        "| step / unrouted (median, q1-q3) | graphs (warm-up / after) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in results["cells"]:
        for name, v in cell["variants"].items():
            head = f"| {'on' if cell['compile'] else 'off'} | {'on' if cell['checkpointing'] else 'off'} | {name} |"
            if "error" in v:
                lines.append(f"{head} fails: `{v['error']}` | | | | | |")
                continue
            s, ratio = v["step_seconds"], v.get("step_ratio_vs_unrouted")
            mfu = "-" if v["mfu"] is None else f"{v['mfu']:.1%}"
            gib = "-" if v["peak_reserved_bytes"] is None else f"{v['peak_reserved_bytes'] / 2**30:.2f}"
            versus = "-" if ratio is None else f"**{ratio['median']:.3f}** ({ratio['q1']:.3f}-{ratio['q3']:.3f})"
            lines.append(
                f"{head} {v['tokens_per_s']:,.0f} | {mfu} | {gib} | {s['median'] * 1e3:.1f} "
                f"({s['q1'] * 1e3:.1f}-{s['q3'] * 1e3:.1f}) | {versus} | {v['graphs_warmup']} / "
                f"{cell['graphs_after_warmup']} |"
            )
    lines += ["", f"Total wall time {results['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(BLOCKS), default="llama")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="bf16: autocast")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4, help="Llama's key/value heads (grouped KV)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--forget-fraction", type=float, default=0.25)
    parser.add_argument("--dedicated", type=int, default=64, help="MLP neurons per block dedicated to forget data")
    parser.add_argument("--dedicated-heads", type=int, default=None,
                        help="query heads per block dedicated to forget data (default: one KV group on Llama, 1)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer d_model-64 model (the CPU test of the suite)")
    parser.add_argument("--compile", default="off,on", help="cells: compile off, on or both")
    parser.add_argument("--checkpointing", default="off,on", help="cells: HF gradient checkpointing off, on or both")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: by device name (H100/H200/A100)")
    parser.add_argument("--name", default="gpu_suite")
    common_arguments(parser)
    parser.set_defaults(repeats=20, warmup=5)
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.d_model, args.d_ff, args.heads, args.kv_heads, args.vocab = 2, 64, 128, 4, 2, 256
        args.seq_len, args.batch_size, args.dedicated = 32, 2, 16
    if args.dedicated_heads is None:  # grouped KV: a key/value head is dedicated with all its query heads
        args.dedicated_heads = args.heads // args.kv_heads if args.model == "llama" else 1
    return args


def _switches(value: str, flag: str) -> list[bool]:
    choices = {"off": False, "on": True}
    try:
        return [choices[v] for v in value.split(",")]
    except KeyError:
        raise SystemExit(f"gpu_suite: {flag} takes 'off', 'on' or 'off,on', got {value!r}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.peak_tflops is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "config": {k: str(v) for k, v in vars(args).items()} | {k: getattr(args, k) for k in (
            "model", "layers", "d_model", "heads", "dtype", "batch_size", "seq_len", "forget_fraction", "warmup",
            "repeats", "peak_tflops")},  # fmt: skip
        "environment": {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} "
            f"thread(s), {torch.backends.cpu.get_cpu_capability()})",
            "torch": torch.__version__,
            "parameters": sum(p.numel() for p in build_model(args).parameters()),
        },
        "cells": [],
    }
    # Variants are instances of one class: without hook guards a routed one would reuse an unrouted graph.
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        for compiled in _switches(args.compile, "--compile"):
            for checkpointing in _switches(args.checkpointing, "--checkpointing"):
                results["cells"].append(run_cell(args, compiled, checkpointing))
                torch._dynamo.reset()
    results["wall_seconds"] = time.perf_counter() - start
    write(results, report(results), args.out, args.name)
    return results


if __name__ == "__main__":
    main()
