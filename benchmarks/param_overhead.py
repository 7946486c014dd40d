"""What parameter-level routing costs per training step, next to activation routing, and what the routed
optimizer costs next to AdamW.

The GPT of ``overhead.py`` (per-token labels, 25% forget) trains in five variants, in one process, on the same
batches, interleaved in rotating order each repeat:

* ``unrouted``: plain AdamW, no routing;
* ``activation``: the library's activation routing of ``overhead.py`` (the post-GELU MLP activations of blocks
  0-4; forget tokens: -0.75 on the original units, 1.0 on the last 64);
* ``parameter``: parameter routing on the MLP weights of the same blocks (``fc.weight`` rows and ``proj.weight``
  columns: forget tokens may change only the last 64 neurons), AdamW;
* ``parameter_routed_adamw``: the same with :class:`~lightning_gradroute.RoutedAdamW` (blocked neurons keep their
  value and optimizer state);
* ``unrouted_routed_adamw``: no routing, ``RoutedAdamW`` (its plain path) instead of ``torch.optim.AdamW``.

Before timing, the script checks that parameter routing changed the routed weights' gradients and left every
other gradient (embeddings, attention, the unrouted blocks' inputs) as unrouted training has it.

Usage::

    python benchmarks/param_overhead.py        # CPU; writes benchmarks/results/param_overhead.{md,json}
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from typing import Any

import torch
from compare import common_arguments, measure, report, write
from overhead import GPT, ROUTED_MODULES, Variant, add_model_arguments

from torch import nn

from lightning_gradroute import GradientRouter, ParameterTarget, Route, RoutedAdamW, Target
from lightning_gradroute.param_routing import routed_parameter

RATIOS = (
    ("activation", "unrouted"),
    ("parameter", "unrouted"),
    ("parameter", "activation"),
    ("parameter_routed_adamw", "parameter"),
    ("unrouted_routed_adamw", "unrouted"),
)
BLOCKS = "blocks.[0-4].mlp"


def build(args: argparse.Namespace) -> dict[str, Variant]:
    torch.manual_seed(args.seed)
    base = GPT(args.vocab, args.seq_len, args.d_model, args.layers, args.heads)
    new = f"-{args.expanded}:"
    original = f":-{args.expanded}"
    routers = {
        "activation": lambda: GradientRouter(
            {"mlp": Target(ROUTED_MODULES)}, [Route("forget", "mlp", {original: -0.75, new: 1.0})]
        ),
        "parameter": lambda: GradientRouter(
            {
                "up": ParameterTarget(f"{BLOCKS}.fc.weight", dim=0),
                "down": ParameterTarget(f"{BLOCKS}.proj.weight", dim=1),
            },
            [Route("forget", "up", {original: 0.0}), Route("forget", "down", {original: 0.0})],
        ),
    }
    plan = {
        "unrouted": (None, torch.optim.AdamW),
        "activation": ("activation", torch.optim.AdamW),
        "parameter": ("parameter", torch.optim.AdamW),
        "parameter_routed_adamw": ("parameter", RoutedAdamW),
        "unrouted_routed_adamw": (None, RoutedAdamW),
    }
    return {name: make_variant(name, base, routers[routing]() if routing else None, optimizer)
            for name, (routing, optimizer) in plan.items()}  # fmt: skip


def make_variant(name: str, base: nn.Module, router: GradientRouter | None, optimizer: type) -> Variant:
    """A copy of ``base``, routed by ``router`` (``None``: unrouted), trained by ``optimizer`` (lr 1e-4)."""
    model = copy.deepcopy(base)
    route: Any = lambda labels: contextlib.nullcontext()  # noqa: E731
    if router is not None:
        route = router.attach(model).route
    return Variant(name, model, optimizer(model.parameters(), lr=1e-4), route)


def check(variants: dict[str, Variant], batch: Any) -> dict[str, float]:
    """Parameter routing changes every routed parameter's gradient and leaves the others as unrouted training has
    them."""
    grads = {}
    for name in ("unrouted", "parameter"):
        variants[name].loss(*batch)
        grads[name] = {n: p.grad.clone() for n, p in variants[name].model.named_parameters()}
        variants[name].optimizer.zero_grad(set_to_none=True)
    routed = {n for n, p in variants["parameter"].model.named_parameters() if routed_parameter(p) is not None}
    changed = min((grads["parameter"][n] - grads["unrouted"][n]).abs().max().item() for n in routed)
    others = max(
        (grads["parameter"][n] - grads["unrouted"][n]).abs().max().item() / grads["unrouted"][n].abs().max().item()
        for n in grads["unrouted"] if n not in routed
    )  # fmt: skip
    if changed == 0 or others > 1e-5:
        raise AssertionError(f"parameter routing: routed grads changed by {changed}, others by {others} (relative)")
    return {"routed_parameters": len(routed), "min_change_routed": changed, "max_relative_change_others": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--expanded", type=int, default=64, help="the last N neurons play the 'expanded' units")
    common_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    results = measure(build(args), args, RATIOS, check)
    description = [
        f"Model: the GPT of `overhead.py`, {args.layers} layers, d_model {args.d_model}, MLP {4 * args.d_model}; batch "
        f"{args.batch_size} x seq {args.seq_len}, per-token labels ({args.forget_fraction:.0%} forget, random); fp32. "
        f"Activation routing on `{ROUTED_MODULES}`; parameter routing on `{BLOCKS}.fc.weight` (dim 0) and "
        f"`{BLOCKS}.proj.weight` (dim 1), forget tokens blocked from all but the last {args.expanded} neurons.",
        "",
        f"Check before timing: the routed weights' gradients changed (smallest max change "
        f"{results['check']['min_change_routed']:.1e}); every other gradient unchanged (largest relative difference "
        f"{results['check']['max_relative_change_others']:.1e}).",
    ]
    markdown = report("Parameter-routing overhead", "param_overhead.py", description, results)
    write(results, markdown, args.out, "param_overhead")


if __name__ == "__main__":
    main()
