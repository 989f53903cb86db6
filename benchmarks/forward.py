"""Forward latency of decomposed SmolLM2: layouts, latency cut per parameter cut, per-module speedup.

Latency does not depend on the factor values, so decomposed models are built from the
plan with random factors (no SVD to wait for). Every figure is a ratio of timings taken in
this one run with the configurations interleaved; latency/param is computed per round (each
configuration against the dense forward of the same round) and printed as median [range].
The time inside each linear module is clocked too, which splits the dense forward into
decoder linears / lm_head / the rest and gives the ceiling of latency/param.

  python benchmarks/forward.py                  # CPU, batch 16 x 256 tokens
  python benchmarks/forward.py --device cuda    # bf16 on the GPU
  python benchmarks/forward.py --synthetic llama-2-7b --layers 4 --batch 4 --ranks 8 --cuts 0.1 0.3 --layouts folded --skip-modules
                                                # random weights with Llama-2-7B's shapes (fewer layers on a CPU)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn as nn

from lm_eval_lowrank.decompose import _set_submodule, count_parameters
from lm_eval_lowrank.modules import LowRankLinear
from lm_eval_lowrank.plan import make_plan
from lm_eval_lowrank.spec import DecompositionSpec
from _timing import sync, timed  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

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
        layers = sorted({round(1 + i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else [(n + 1) // 2]
        spec = DecompositionSpec.from_args({"rank": rank, "layers": "|".join(map(str, layers)), "cache": False})
        if make_plan(spec, dense.config).params_removed / total >= cut:
            return layers
    return list(range(1, n + 1))


class LinearClock:
    """Seconds spent inside each linear module (``nn.Linear``, ``LowRankLinear``) of ``model``, by path.

    Hooks on the modules, not a profiler: on a CPU they cost microseconds per call against
    milliseconds of GEMM, so they stay on in the timed forwards; on a GPU each hook has to
    synchronise, so :func:`bench_models` runs them in separate, untimed forwards there.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.spent: dict[str, float] = {}
        self._t0: dict[str, float] = {}
        self._handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, LowRankLinear)):
                self._handles.append(mod.register_forward_pre_hook(lambda *_, n=name: self._start(n, device)))
                self._handles.append(mod.register_forward_hook(lambda *_, n=name: self._stop(n, device)))

    def _start(self, name: str, device: torch.device) -> None:
        sync(device)
        self._t0[name] = time.perf_counter()

    def _stop(self, name: str, device: torch.device) -> None:
        sync(device)
        self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - self._t0.pop(name)

    def take(self) -> dict[str, float]:
        """The times since the last call, and a fresh start."""
        spent, self.spent = self.spent, {}
        return spent

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}..{max(xs):.2f}]"


def bench_models(args: argparse.Namespace, dense: nn.Module, ids: torch.Tensor, device: torch.device) -> None:
    total = count_parameters(dense)
    configs: list[tuple[str, nn.Module, float]] = [("dense", dense, 0.0)]
    for rank in args.ranks:
        for cut in args.cuts:
            layers = layers_for_cut(dense, rank, cut)
            for layout in args.layouts:
                m = lowrank_copy(dense, rank, layers, layout).eval()
                configs.append((f"rank={rank} layers={len(layers)} layout={layout}", m, 1 - count_parameters(m) / total))
    # The decomposed modules of each config: the dense time they replace is what its latency cut can be.
    targets = {name: [n for n, mod in m.named_modules() if isinstance(mod, LowRankLinear)] for name, m, _ in configs}
    run = {name: (lambda m=m: m(ids, use_cache=False)) for name, m, _ in configs}
    times: dict[str, list[float]] = {k: [] for k in run}
    parts: dict[str, list[dict[str, float]]] = {k: [] for k in run}  # per round: seconds per linear module
    clock_in_timing = device.type == "cpu"
    clocks = {name: LinearClock(m, device) for name, m, _ in configs} if clock_in_timing else {}
    with torch.inference_mode():
        for f in run.values():  # warm-up
            f()
        for c in clocks.values():
            c.take()
        names = list(run)
        for i in range(args.reps):
            # Interleaved, and every other round in reverse order, so that no configuration always
            # follows the same neighbour (caches, allocator state, a co-tenant's load pattern).
            for name in names if i % 2 == 0 else names[::-1]:
                times[name].append(timed(run[name], device, collect=True))
                if clock_in_timing:
                    parts[name].append(clocks[name].take())
        if not clock_in_timing:  # separate forwards: synchronising hooks would distort the timings above
            for name, m, _ in configs:
                clock = LinearClock(m, device)
                for _ in range(args.reps):
                    run[name]()
                    parts[name].append(clock.take())
                clock.remove()
    for c in clocks.values():
        c.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    t_dense = med["dense"]
    spread = 100 * (max(times["dense"]) - min(times["dense"])) / t_dense
    print(f"forward dense: {t_dense * 1e3:.0f} ms per batch of {ids.shape[0]}x{ids.shape[1]} tokens (median of {args.reps}, range {spread:.0f}% of it), {total / 1e6:.1f} M params", flush=True)
    head = dense.lm_head.weight
    tied = head.data_ptr() == dense.get_input_embeddings().weight.data_ptr()
    # Shares of the dense forward, each round's parts over that round's total (the parts come from
    # the timed forwards on a CPU, from separate ones on a GPU).
    n_rounds = len(parts["dense"])
    dense_total = times["dense"] if clock_in_timing else [t_dense] * n_rounds
    head_share = [p["lm_head"] / t for p, t in zip(parts["dense"], dense_total)]
    dec_share = [sum(v for k, v in p.items() if k != "lm_head") / t for p, t in zip(parts["dense"], dense_total)]
    dec_params = sum(m.weight.numel() for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    print(f"forward breakdown: lm_head ({head.shape[0]}x{head.shape[1]}) {100 * statistics.median(head_share):.0f}% of dense time, {100 * head.numel() / total:.0f}% of unique params{' (tied with the embedding)' if tied else ''}", flush=True)
    print(
        f"forward breakdown: decoder linears {100 * statistics.median(dec_share):.0f}% of dense time, {100 * dec_params / total:.0f}% of params; "
        f"the rest (attention, norms, activations, RoPE, embedding) {100 * (1 - statistics.median(head_share) - statistics.median(dec_share)):.0f}% of the time, no params",
        flush=True,
    )
    print(
        f"forward ceiling: decomposing decoder linears for free gives latency/param <= {statistics.median(dec_share) * total / dec_params:.2f} "
        "(time share over param share of the decoder linears), times targeted/removed params",
        flush=True,
    )
    for name, _, pcut in configs[1:]:
        tg = targets[name]
        paired = [(1 - t / td) / pcut for t, td in zip(times[name], times["dense"])]  # same round
        # Free factors: the dense time of the replaced modules is all the forward can lose.
        ceiling = [sum(pd[k] for k in tg) / td / pcut for pd, td in zip(parts["dense"], dense_total)]
        # Measured factor time, everything else assumed equal: the ratio without the noise outside the linears.
        linear_only = [(sum(pd[k] for k in tg) - sum(pc[k] for k in tg)) / td / pcut for pd, pc, td in zip(parts["dense"], parts[name], dense_total)]
        ratio = statistics.median(paired)
        by_min = (1 - min(times[name]) / min(times["dense"])) / pcut
        print(
            f"forward {name}: param cut {100 * pcut:.1f}%, latency cut {100 * (1 - med[name] / t_dense):.1f}%, "
            f"latency/param {_spread(paired)} (median [range] of {args.reps} paired rounds; {by_min:.2f} from min times), "
            f"linears-only {_spread(linear_only)}, ceiling {_spread(ceiling)} (target >= 0.9) {'PASS' if ratio >= 0.9 else 'FAIL'}",
            flush=True,
        )
    for rank in args.ranks if len(args.layouts) == 2 else []:
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
            ratio = sum(p.numel() for p in mods["dense"].parameters()) / sum(p.numel() for p in mods[k].parameters())  # the tucker core too
            print(f"module {out_f}x{in_f} {k}: {t * 1e6:.0f} us vs dense {td * 1e6:.0f} us, speedup {td / t:.2f}x (param ratio {ratio:.2f}x)", flush=True)


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
    p.add_argument("--layouts", nargs="+", choices=["folded", "tucker"], default=["folded", "tucker"])
    p.add_argument("--synthetic", choices=["llama-2-7b"], help="random weights with these shapes instead of SmolLM2")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the synthetic model (default: all 32)")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-modules", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"# device {device}, dtype {dtype}, torch threads {torch.get_num_threads()}, batch {args.batch}x{args.seq}", flush=True)
    if not args.skip_models and args.synthetic:
        from transformers import LlamaConfig, LlamaForCausalLM

        # Llama-2-7B's shapes (untied 32000-token embedding and head); --layers trims the depth to fit a CPU.
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers or 32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
        torch.manual_seed(0)
        dense = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()  # anonymous memory: no copy needed
        print(f"# synthetic llama-2-7b shapes: {cfg.num_hidden_layers} layers, random weights", flush=True)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
        bench_models(args, dense, ids, device)
    elif not args.skip_models:
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
