"""Forward latency of decomposed SmolLM2: layouts, latency cut per parameter cut, per-module speedup.

Latency does not depend on the factor values, so decomposed models are built from the
plan with random factors (no SVD to wait for). Every figure is a ratio of timings taken in
this one run with the configurations interleaved and the median kept.

  python benchmarks/forward.py                  # CPU, batch 16 x 256 tokens
  python benchmarks/forward.py --device cuda    # bf16 on the GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
import torch.nn as nn

from lm_eval_lowrank.decompose import _set_submodule, count_parameters
from lm_eval_lowrank.modules import LowRankLinear
from lm_eval_lowrank.plan import make_plan
from lm_eval_lowrank.spec import DecompositionSpec
from _timing import timed  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SHAPES = ((576, 576), (1536, 576), (576, 1536))  # (out, in): q/o, gate/up, down




def lowrank_copy(dense: nn.Module, rank: int, layers: list[int], layout: str) -> nn.Module:
    """``dense`` with the planned linears of ``layers`` replaced by random-factor LowRankLinear."""
    model = copy.deepcopy(dense)
    spec = DecompositionSpec.from_args({"rank": rank, "layers": "|".join(map(str, layers)), "layout": layout, "cache": False})
    plan = make_plan(spec, model.config)
    g = torch.Generator().manual_seed(0)
    p = next(dense.parameters())
    for t in plan.targets:
        old = model.get_submodule(t.path)
        new = LowRankLinear(t.in_features, t.out_features, t.rank, layout=layout, bias=old.bias is not None, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            for prm in (new.first, new.last, new.core):
                if prm is not None:
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
        _set_submodule(model, t.path, new)
    return model


def layers_for_cut(dense: nn.Module, rank: int, cut: float) -> list[int]:
    """The fewest whole layers (spread over the depth) at ``rank`` removing >= ``cut`` of all parameters."""
    total = count_parameters(dense)
    n = dense.config.num_hidden_layers
    for k in range(1, n + 1):
        layers = sorted({round(1 + i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else [n // 2]
        spec = DecompositionSpec.from_args({"rank": rank, "layers": "|".join(map(str, layers)), "cache": False})
        if make_plan(spec, dense.config).params_removed / total >= cut:
            return layers
    return list(range(1, n + 1))


def bench_models(args: argparse.Namespace, dense: nn.Module, ids: torch.Tensor, device: torch.device) -> None:
    total = count_parameters(dense)
    configs: list[tuple[str, nn.Module, float]] = [("dense", dense, 0.0)]
    for rank in args.ranks:
        for cut in args.cuts:
            layers = layers_for_cut(dense, rank, cut)
            for layout in ("folded", "tucker"):
                m = lowrank_copy(dense, rank, layers, layout).eval()
                configs.append((f"rank={rank} layers={len(layers)} layout={layout}", m, 1 - count_parameters(m) / total))
    base = dense.model  # the decoder without lm_head: its share of the time
    run = {name: (lambda m=m: m(ids, use_cache=False)) for name, m, _ in configs}
    run["no-lm_head"] = lambda: base(ids, use_cache=False)
    times: dict[str, list[float]] = {k: [] for k in run}
    with torch.inference_mode():
        for f in run.values():  # warm-up
            f()
        for _ in range(args.reps):
            for name, f in run.items():
                times[name].append(timed(f, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    t_dense = med["dense"]
    print(f"forward dense: {t_dense * 1e3:.0f} ms per batch of {ids.shape[0]}x{ids.shape[1]} tokens, {total / 1e6:.1f} M params", flush=True)
    head = dense.lm_head.weight
    tied = head.data_ptr() == dense.get_input_embeddings().weight.data_ptr()
    print(f"forward breakdown: lm_head ({head.shape[0]}x{head.shape[1]}) {100 * (1 - med['no-lm_head'] / t_dense):.0f}% of dense time, {100 * head.numel() / total:.0f}% of unique params{' (tied with the embedding)' if tied else ''}", flush=True)
    for name, _, pcut in configs[1:]:
        lcut = 1 - med[name] / t_dense
        ratio = lcut / pcut if pcut > 0 else float("nan")
        print(f"forward {name}: param cut {100 * pcut:.1f}%, latency cut {100 * lcut:.1f}%, latency/param {ratio:.2f} (target >= 0.9) {'PASS' if ratio >= 0.9 else 'FAIL'}", flush=True)
    for rank in args.ranks:
        for cut in args.cuts:
            layers = layers_for_cut(dense, rank, cut)
            f, t = (med[f"rank={rank} layers={len(layers)} layout={lay}"] for lay in ("folded", "tucker"))
            print(f"layout rank={rank} layers={len(layers)}: folded {f * 1e3:.0f} ms, tucker {t * 1e3:.0f} ms, tucker/folded {t / f:.2f} ({'folded' if f <= t else 'tucker'} faster)", flush=True)


def bench_modules(args: argparse.Namespace, tokens: int, dtype: torch.dtype, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        x = (torch.randn(tokens, in_f, generator=g)).to(device=device, dtype=dtype)
        dense = nn.Linear(in_f, out_f, bias=False).to(device=device, dtype=dtype)
        mods = {"dense": dense}
        for r in args.module_ranks:
            if r < min(out_f, in_f):
                for layout in ("folded", "tucker"):
                    mods[f"{layout} rank={r}"] = LowRankLinear(in_f, out_f, r, layout=layout, bias=False, dtype=dtype, device=device).apply(_rand_init)
        times: dict[str, list[float]] = {k: [] for k in mods}
        with torch.inference_mode():
            for m in mods.values():
                m(x)
            for _ in range(args.module_reps):
                for k, m in mods.items():
                    times[k].append(timed(lambda m=m: [m(x) for _ in range(args.inner)], device) / args.inner)
        td = statistics.median(times["dense"])
        for k in mods:
            if k == "dense":
                continue
            t = statistics.median(times[k])
            r = int(k.split("=")[1])
            bk = out_f * in_f / (out_f + in_f)
            print(f"module {out_f}x{in_f} {k}: {t * 1e6:.0f} us vs dense {td * 1e6:.0f} us, speedup {td / t:.2f}x (param ratio {bk / r:.2f}x)", flush=True)


def _rand_init(m: nn.Module) -> None:
    if isinstance(m, LowRankLinear):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="SmolLM2 folder (default: lm-eval-lowrank fetch-model)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    p.add_argument("--cuts", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--module-ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--module-reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="module calls per timing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-modules", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"# device {device}, dtype {dtype}, torch threads {torch.get_num_threads()}, batch {args.batch}x{args.seq}", flush=True)
    if not args.skip_models:
        from transformers import AutoModelForCausalLM

        from lm_eval_lowrank.assets import smollm2_path

        try:
            dense = AutoModelForCausalLM.from_pretrained(str(args.model or smollm2_path()), dtype=dtype)
        except Exception as exc:  # e.g. a GPU machine without the weights: same architecture, random values
            from transformers import LlamaConfig, LlamaForCausalLM

            print(f"# SmolLM2 weights unavailable ({type(exc).__name__}): random weights, SmolLM2-135M config", flush=True)
            cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0)
            dense = LlamaForCausalLM(cfg).to(dtype)
        # A private copy: from_pretrained leaves the weights file-mapped, and under memory pressure
        # the kernel drops those pages and re-reads them from disk inside the timed forward, while
        # the decomposed copies below live in anonymous memory (seen here: dense 32 s vs 18 s).
        dense = copy.deepcopy(dense).to(device).eval()
        ids = torch.randint(0, dense.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
        bench_models(args, dense, ids, device)
    if not args.skip_modules:
        bench_modules(args, args.batch * args.seq, dtype, device)


if __name__ == "__main__":
    sys.exit(main())
