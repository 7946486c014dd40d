"""Routing overhead at the limit: HF models with every block's MLP activation routed.

An HF GPT-2 or Llama built from a config (no hub) trains on random tokens with random per-token labels; the MLP
activation of *every* block is routed with non-trivial weights on both unit groups (forget tokens: -0.75 on the
original units, 0.5 on the last ``--expanded``). Three variants in one process, same batches, rotating order:

* ``unrouted``: no hooks;
* ``library``: :class:`~lightning_gradroute.GradientRouter` (what the callback runs);
* ``paper``: the paper's ``m * a + (1 - m) * a.detach()`` with a materialised ``(B, T, D)`` mask.

Before timing, the script checks that ``library`` and ``paper`` give the same gradients. Targets (CPU): step time
library/unrouted <= 1.02, peak memory <= 1.01.

Usage::

    python benchmarks/overhead_hf.py --model gpt2 --batch-size 8 --seq-len 128
    python benchmarks/overhead_hf.py --model llama --batch-size 32 --seq-len 256 --repeats 20
    python benchmarks/overhead_hf.py --device cuda --dtype bf16 --compile --batch-size 32 --seq-len 256   # a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
import transformers
from compare import common_arguments, measure, report, write
from overhead import MaterialisedMaskRouting, Variant, add_model_arguments
from torch import Tensor, nn

from lightning_gradroute import GradientRouter, Route, Target

ROUTED = {"gpt2": "model.transformer.h.*.mlp.act", "gpt_neo": "model.transformer.h.*.mlp.act",
          "llama": "model.model.layers.*.mlp.act_fn"}  # fmt: skip
RATIOS = (("library", "unrouted"), ("library", "paper"), ("paper", "unrouted"))


class Logits(nn.Module):
    """An HF causal LM as ``tokens -> logits`` (what ``overhead.Variant`` trains)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens).logits


def hf_model(args: argparse.Namespace) -> tuple[nn.Module, int]:
    """The model and its MLP width."""
    hidden = 4 * args.d_model
    if args.model == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.layers,
            n_head=args.heads, n_inner=hidden, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
        )  # fmt: skip
        return Logits(transformers.GPT2LMHeadModel(config)), hidden
    if args.model == "gpt_neo":
        config = transformers.GPTNeoConfig(
            vocab_size=args.vocab, max_position_embeddings=args.seq_len, hidden_size=args.d_model,
            num_layers=args.layers, num_heads=args.heads, intermediate_size=hidden,
            attention_types=[[["global"], args.layers]], embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0,
        )  # fmt: skip
        return Logits(transformers.GPTNeoForCausalLM(config)), hidden
    hidden = 8 * args.d_model // 3  # Llama's gated MLP keeps the parameter count of a 4x MLP
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
    )  # fmt: skip
    return Logits(transformers.LlamaForCausalLM(config)), hidden


def build(args: argparse.Namespace) -> dict[str, Variant]:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    base, hidden = hf_model(args)
    base = base.to(device)
    table = torch.ones(2, hidden, device=device)
    table[1, : hidden - args.expanded] = -0.75
    table[1, hidden - args.expanded :] = 0.5
    pattern = ROUTED[args.model]
    variants = {}
    for name in ("unrouted", "library", "paper"):
        model = copy.deepcopy(base)
        route: Callable[[Tensor], Any] = lambda labels: contextlib.nullcontext()  # noqa: E731
        if name == "library":
            weights = {f":-{args.expanded}": -0.75, f"-{args.expanded}:": 0.5}
            route = GradientRouter({"mlp": Target(pattern)}, [Route("forget", "mlp", weights)]).attach(model).route
        elif name == "paper":
            route = MaterialisedMaskRouting(model, table, "paper", pattern).route
        compiled = torch.compile(model) if args.compile else model  # hooks registered first, so they are traced
        variants[name] = Variant(name, compiled, torch.optim.AdamW(model.parameters(), lr=1e-4), _autocast(route, args))
    return variants


def _autocast(route: Callable[[Tensor], Any], args: argparse.Namespace) -> Callable[[Tensor], Any]:
    if args.dtype == "fp32":
        return route

    @contextlib.contextmanager
    def routed_in_bf16(labels: Tensor) -> Any:
        with route(labels), torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            yield

    return routed_in_bf16


def check(variants: dict[str, Variant], batch: Any) -> dict[str, float]:
    """Library and paper routing give the same gradients, and they differ from unrouted training's."""
    grads = {}
    for name, variant in variants.items():
        variant.loss(*batch)
        grads[name] = torch.cat([p.grad.flatten().float() for p in variant.model.parameters()])
        variant.optimizer.zero_grad(set_to_none=True)
    scale = grads["library"].abs().max().item()
    out = {f"{n}_vs_library": (grads[n] - grads["library"]).abs().max().item() / scale for n in grads}
    if out["paper_vs_library"] > 1e-2 or out["unrouted_vs_library"] < 1e-3:
        raise AssertionError(f"the variants do not compute what they should: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--model", choices=sorted(ROUTED), default="gpt2")
    parser.add_argument("--expanded", type=int, default=64, help="the last N MLP units play the 'expanded' units")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--name", default=None, help="results file name (default overhead_hf_<model>_<B>x<T>)")
    common_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.compile:
        # The variants are instances of one class: without hook guards, the routed one would reuse the unrouted
        # one's compiled graph and skip its hooks (the router's coverage check would stop the run).
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    results = measure(build(args), args, RATIOS, check)
    description = [
        f"Model: HF {args.model} built from a config, {args.layers} layers, d_model {args.d_model}, {args.heads} "
        f"heads, vocab {args.vocab}; batch {args.batch_size} x seq {args.seq_len}; {args.dtype}"
        + (", torch.compile" if args.compile else "") + f". Routed: `{ROUTED[args.model]}` (every block), "
        f"per-token labels ({args.forget_fraction:.0%} forget), forget weights -0.75 on the original units and 0.5 "
        f"on the last {args.expanded}.",
        "",
        "Gradient check before timing (max |grad difference| / max |grad| against library): "
        + ", ".join(f"{k.removesuffix('_vs_library')} {v:.1e}" for k, v in results["check"].items()) + ".",
    ]  # fmt: skip
    name = args.name or f"overhead_hf_{args.model}_{args.batch_size}x{args.seq_len}"
    write(results, report(f"Routing overhead at the limit: {args.model}, every block routed", "overhead_hf.py",
                          description, results), args.out, name)  # fmt: skip


if __name__ == "__main__":
    main()
