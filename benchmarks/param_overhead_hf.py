"""What SGTM-style parameter routing costs on an HF model with every block routed, next to unrouted training.

An HF GPT-Neo or Llama built from a config (no hub) trains on random tokens with random per-token labels (25%
forget). Routing, on every block: ``ParameterTarget(modules=blocks, component="neurons")`` (MLP up/gate rows and
biases, down columns) and ``component="heads"`` (q/k/v rows, out-projection columns); forget tokens may change
only the last ``--dedicated`` neurons and the last head, retain tokens everything else. Three variants in one
process, on the same batches, in rotating order:

* ``unrouted``: no routing, ``torch.optim.AdamW``;
* ``parameter``: parameter routing, ``torch.optim.AdamW``;
* ``parameter_routed_adamw``: parameter routing with :class:`~lightning_gradroute.RoutedAdamW` (what SGTM
  trains with: blocked units keep their value and moments).

Before timing, the script checks that routing changed every routed parameter's gradient and no other.
Target (CPU): ``parameter_routed_adamw / unrouted`` <= 1.03 step time, <= 1.01 peak memory.

Usage::

    python benchmarks/param_overhead_hf.py --model gpt_neo --batch-size 8 --seq-len 128
    python benchmarks/param_overhead_hf.py --model llama --batch-size 32 --seq-len 256 --repeats 16
    python benchmarks/param_overhead_hf.py --model llama --freeze-gc --name param_overhead_hf_llama_8x128_gc_frozen

``--freeze-gc`` collects and freezes Python's garbage collector's heap once the variants are built
(``gc.collect(); gc.freeze()``), to see how much of a difference comes from the Python heap rather than from
the arithmetic.
"""

from __future__ import annotations

import argparse
import gc

import torch
from compare import common_arguments, measure, report, write
from overhead import Variant, add_model_arguments
from overhead_hf import hf_model
from param_overhead import check, make_variant

from lightning_gradroute import GradientRouter, ParameterTarget, Route, RoutedAdamW

BLOCKS = {"gpt_neo": "model.transformer.h.*", "llama": "model.model.layers.*"}
RATIOS = (
    ("parameter_routed_adamw", "unrouted"),
    ("parameter", "unrouted"),
    ("parameter_routed_adamw", "parameter"),
)


def sgtm_router(args: argparse.Namespace) -> GradientRouter:
    blocks, k = BLOCKS[args.model], args.dedicated
    targets = {"mlp": ParameterTarget(modules=blocks, component="neurons"),
               "heads": ParameterTarget(modules=blocks, component="heads")}  # fmt: skip
    dedicated, shared = {"mlp": f"-{k}:", "heads": "-1:"}, {"mlp": f":-{k}", "heads": ":-1"}
    return GradientRouter(targets, [Route("forget", t, {shared[t]: 0.0}) for t in targets]
                          + [Route("retain", t, {dedicated[t]: 0.0}) for t in targets])  # fmt: skip


def build(args: argparse.Namespace) -> dict[str, Variant]:
    torch.manual_seed(args.seed)
    base, _ = hf_model(args)
    plan = (("unrouted", None, torch.optim.AdamW), ("parameter", sgtm_router(args), torch.optim.AdamW),
            ("parameter_routed_adamw", sgtm_router(args), RoutedAdamW))  # fmt: skip
    return {name: make_variant(name, base, router, optimizer) for name, router, optimizer in plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--model", choices=sorted(BLOCKS), default="gpt_neo")
    parser.add_argument("--dedicated", type=int, default=64, help="the last N MLP neurons are forget's")
    parser.add_argument("--name", default=None, help="results file name (default param_overhead_hf_<model>_<B>x<T>)")
    parser.add_argument("--freeze-gc", action="store_true", help="gc.collect(); gc.freeze() before measuring")
    common_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    variants = build(args)
    if args.freeze_gc:
        gc.collect()
        gc.freeze()
    results = measure(variants, args, RATIOS, check)
    c = results["check"]
    heap = "; the Python heap collected and frozen before measuring" if args.freeze_gc else ""
    description = [
        f"Model: HF {args.model} built from a config, {args.layers} layers, d_model {args.d_model}, {args.heads} "
        f"heads, vocab {args.vocab}; batch {args.batch_size} x seq {args.seq_len}; fp32; per-token labels "
        f"({args.forget_fraction:.0%} forget){heap}. SGTM-style parameter routing on every block: MLP neurons and "
        f"attention heads (`component='neurons'` / `'heads'`); forget tokens change only the last {args.dedicated} "
        "neurons and the last head, retain tokens the rest.",
        "",
        f"Check before timing: routing changed the gradient of all {c['routed_parameters']} routed parameters "
        f"(smallest max change {c['min_change_routed']:.1e}) and no other (largest relative difference "
        f"{c['max_relative_change_others']:.1e}).",
    ]
    name = args.name or f"param_overhead_hf_{args.model}_{args.batch_size}x{args.seq_len}"
    write(results, report(f"Parameter-routing overhead: {args.model}, every block routed SGTM-style",
                          "param_overhead_hf.py", description, results), args.out, name)  # fmt: skip


if __name__ == "__main__":
    main()
