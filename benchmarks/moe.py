"""Mixture-of-experts block: decomposed experts against the dense ones, side by side in one run.

A Mixtral-shaped experts module (random weights; timings do not depend on the values) runs a batch of routed
tokens. Printed, each a ratio of medians over interleaved repetitions:

- the factored forward at ranks that cut the experts' parameters by about 10-50 %: latency cut / parameter cut,
  against the dense module under transformers' default implementation (``grouped_mm``) and under ``eager``;
- the factored forward's own loop on the dense weights against ``eager``, and its grouped GEMMs against
  ``grouped_mm``: what each path costs of its own;
- per rank, the factored forward as grouped GEMMs over its loop over the experts: the evidence for which one
  ``use_grouped_experts`` picks on this device;
- with ``--decompose-ranks``: decomposing every expert's two projections (as on load, seeded per expert, in
  parallel threads where those pay) against the full SVD of the same matrices.

    python benchmarks/moe.py [--hidden 1024 --inter 3584 --experts 8 --top-k 2 --tokens 2048] [--threads 1]
                             [--decompose-ranks 8 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _timing import timed  # noqa: E402


def build(hidden: int, inter: int, experts: int, top_k: int, device: torch.device, dtype: torch.dtype):
    import transformers

    config = transformers.MixtralConfig(
        hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=1, vocab_size=32
    )
    config._experts_implementation = "grouped_mm"  # transformers default for a model
    module = transformers.models.mixtral.modeling_mixtral.MixtralExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, hidden**-0.5)
    return module.to(device=device, dtype=dtype).eval(), config


def decompose_block(module, rank: int, h: int, i: int, e: int) -> dict[str, int]:
    """Replace the block's two stacked projections by rank-``rank`` factors, as decompose-on-load does."""
    from lm_eval_lowrank.decompose import _decompose_experts, _PageReleaser
    from lm_eval_lowrank.methods import get_method
    from lm_eval_lowrank.plan import Plan, Target
    from lm_eval_lowrank.spec import DecompositionSpec

    spec, plan, solvers = DecompositionSpec.from_args({"rank": rank}), Plan("bench", 1, "folded"), {}
    for name, (out_f, in_f) in (("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
        _decompose_experts(module, spec, plan, get_method("tucker"), Target(1, name, name, out_f, in_f, rank, experts=e), None, solvers, [], _PageReleaser())
    return solvers


def decomposition_figures(dense, ranks: list[int], reps: int, h: int, i: int, e: int, device: torch.device) -> None:
    def full_svds() -> None:
        for w in (dense.gate_up_proj, dense.down_proj):
            for m in range(e):
                torch.linalg.svd(w[m].float(), full_matrices=False)

    torch.linalg.svd(dense.down_proj[0].float(), full_matrices=False)  # warm-up: a GPU's one-time solver start-up
    full: list[float] = []
    for r in ranks:
        times, solvers = [], {}
        for _ in range(reps):  # interleaved with the full SVD, as many samples of each
            module = copy.deepcopy(dense)
            times.append(timed(lambda: solvers.update(decompose_block(module, r, h, i, e)), device))
            full.append(timed(full_svds, device))
        dec, svd = statistics.median(times), statistics.median(full)
        print(f"decompose {2 * e} expert matrices at rank {r}: {dec:.3f} s, full SVD of the same {svd:.3f} s: {svd / dec:.1f}x faster ({solvers})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--cuts", default="0.1,0.3,0.5", help="parameter cuts of the experts to test")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--decompose-ranks", type=int, nargs="*", default=[], help="also time the decomposition at these ranks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval_lowrank.modules import experts_forward, use_grouped_experts

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dense, config = build(args.hidden, args.inter, args.experts, args.top_k, device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype)
    logits = torch.randn(args.tokens, args.experts, generator=g)
    weights, index = torch.topk(torch.softmax(logits, -1), args.top_k, dim=-1)
    weights, index = weights.to(device, dtype), index.to(device)
    h, i, e = args.hidden, args.inter, args.experts
    dense_params = e * 3 * h * i

    def implementation(name: str):
        def run() -> torch.Tensor:
            config._experts_implementation = name
            return dense(x, index, weights)

        return run

    if args.decompose_ranks:
        decomposition_figures(dense, args.decompose_ranks, args.reps, h, i, e, device)
    candidates = {"dense grouped_mm": implementation("grouped_mm"), "dense eager": implementation("eager"), "our loop, dense weights": lambda: experts_forward(dense, x, index, weights, grouped=False)}
    candidates["our grouped, dense weights"] = lambda: experts_forward(dense, x, index, weights, grouped=True)
    params = {}
    for cut in (float(c) for c in args.cuts.split(",")):
        # rank r on gate_up (2i x h) and down (h x i): e * r * (2i + h + h + i) parameters
        r = max(1, round((1 - cut) * 3 * h * i / (3 * i + 2 * h)))
        module = copy.deepcopy(dense)
        decompose_block(module, r, h, i, e)
        params[f"rank {r}"] = sum(p.numel() for p in module.parameters())
        candidates[f"rank {r}"] = (lambda m: lambda: m(x, index, weights))(module)
        for grouped in (True, False):
            candidates[f"rank {r} {'grouped' if grouped else 'loop'}"] = (lambda m, g: lambda: experts_forward(m, x, index, weights, grouped=g))(module, grouped)
    with torch.no_grad():
        for fn in candidates.values():
            fn()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in candidates}
        for _ in range(args.reps):
            for k, fn in candidates.items():  # interleaved: a slow moment hits every candidate alike
                times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# {args.experts} experts, hidden {h}, intermediate {i}, top-{args.top_k}, {args.tokens} tokens, {args.dtype} on {device}, {torch.get_num_threads()} threads")
    print(f"dense eager / dense grouped_mm: {med['dense eager'] / med['dense grouped_mm']:.3f}")
    print(f"our loop on dense weights / dense eager: {med['our loop, dense weights'] / med['dense eager']:.3f}")
    print(f"our grouped on dense weights / dense grouped_mm: {med['our grouped, dense weights'] / med['dense grouped_mm']:.3f}")
    config._experts_implementation = "grouped_mm"  # the rounds left it at the last one timed ("eager")
    with torch.no_grad():  # as the harness runs it: with grad enabled it always takes the loop
        picks = use_grouped_experts(dense, x)
    print(f"use_grouped_experts picks {'grouped GEMMs' if picks else 'the loop'} here")
    for k, n in params.items():
        print(f"{k}: factored grouped GEMMs / factored loop: {med[k + ' grouped'] / med[k + ' loop']:.3f}")
        cut = 1 - n / dense_params
        for base in ("dense grouped_mm", "dense eager"):
            lat = 1 - med[k] / med[base]
            print(f"{k}: parameter cut {cut:.3f}, latency cut vs {base} {lat:.3f}, ratio {lat / cut:.2f}")


if __name__ == "__main__":
    main()
