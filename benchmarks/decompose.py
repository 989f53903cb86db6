"""Decomposition speed: our Tucker-2 (solver auto) against a full SVD, and the solver switch point.

Every figure is a ratio of two timings taken in this one run, repetitions interleaved and
the median kept, so a shared, noisy machine slows both sides alike.

  python benchmarks/decompose.py                       # SmolLM2: 7 tensors x 30 layers, ranks 1 8 64 128
  python benchmarks/decompose.py --serial-gram         # + the Gram solves one at a time against in parallel threads
  python benchmarks/decompose.py --floor               # + the passes alone at hindsight, certified and gap-certified Krylov dimensions
  python benchmarks/decompose.py --switch              # + krylov-vs-gram (CPU) / randomized-vs-exact (GPU) sweep
  python benchmarks/decompose.py --switch --large      # + 4096x4096 and 4096x11008 random matrices
  python benchmarks/decompose.py --device cuda --synthetic llama-2-7b --workdir /tmp/l2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from lm_eval_lowrank.architectures import adapter_for_config
from lm_eval_lowrank.methods import tucker as tk
from lm_eval_lowrank.methods.tucker import truncated_svd, tucker_method
from _timing import sync, timed  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

TENSORS = dict(adapter_for_config({"model_type": "llama"}).tensor_paths)  # SmolLM2 is a Llama
SMOLLM2_SHAPES = {"q": (576, 576), "k": (192, 576), "gate": (1536, 576), "down": (576, 1536)}
LLAMA2_7B = {"layers": 32, "shapes": {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096), "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}}




def verdict(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return f" (target >= {target:g}x) {'PASS' if value >= target else 'FAIL'}"


def load_smollm2(folder: Path, device: torch.device, layers: int | None) -> list[tuple[str, torch.Tensor]]:
    """The decoder's linear weights straight from the safetensors file, as fp32 (what decompose_model factors)."""
    from safetensors import safe_open

    out = []
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        n = 1 + max(int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers."))
        for i in range(n if layers is None else min(layers, n)):
            for t, sub in TENSORS.items():
                out.append((f"{i}.{t}", f.get_tensor(f"model.layers.{i}.{sub}.weight").float().to(device)))
    return out


def our_pass(mats: list[tuple[str, torch.Tensor]], rank: int, serial_gram: bool = False) -> dict[str, int]:
    """Every matrix as decompose-on-load does it: Krylov and GIL-free Gram solves in parallel threads when torch
    has more than one (decompose._solve_in_parallel), the others one at a time. ``serial_gram``: the Gram solves
    one at a time, as before they ran without the GIL (the comparison of --serial-gram)."""
    from unittest import mock

    import lm_eval_lowrank.decompose as dec
    from lm_eval_lowrank.plan import Target
    from lm_eval_lowrank.spec import DecompositionSpec

    def solve(t: Target, W: torch.Tensor):
        return tucker_method(W, t.rank)

    jobs = [(Target(layer=1, tensor=name, path=name, out_features=W.shape[0], in_features=W.shape[1], rank=min(rank, min(W.shape))), W) for name, W in mats]
    solvers: dict[str, int] = {}
    spec = DecompositionSpec.from_args({"rank": rank, "cache": False})
    with mock.patch.object(dec, "gram_solves_release_gil", lambda: False) if serial_gram else contextlib.nullcontext():
        for (t, W), f in zip(list(jobs), dec._solve_in_parallel(jobs, solve, spec, True, copy_budget=float("inf"))):
            f = f if f is not None else solve(t, W)
            solvers[f.info["solver"]] = solvers.get(f.info["solver"], 0) + 1
    return solvers


def full_svd_pass(mats: list[tuple[str, torch.Tensor]]) -> None:
    for _, W in mats:
        torch.linalg.svd(W, full_matrices=False)


def bench_smollm2(args: argparse.Namespace, device: torch.device) -> None:
    from lm_eval_lowrank.assets import smollm2_path

    mats = load_smollm2(Path(args.model or smollm2_path()), device, args.layers)
    print(f"# {len(mats)} matrices ({len(mats) // 7} layers x 7 tensors), device {device}, torch threads {torch.get_num_threads()}", flush=True)
    our_pass(mats[:7], 8)  # warm-up: lazy LAPACK/cuSOLVER initialisation is not part of either side
    full_svd_pass(mats[:7])
    full: list[float] = []
    ours: dict[int, list[float]] = {r: [] for r in args.ranks}
    serial: dict[int, list[float]] = {r: [] for r in args.ranks}
    solvers: dict[int, dict[str, int]] = {}
    for _ in range(args.reps):  # interleaved: full SVD, then ours at each rank, each repetition
        full.append(timed(lambda: full_svd_pass(mats), device))
        for r in args.ranks:
            box: dict[str, dict[str, int]] = {}
            ours[r].append(timed(lambda r=r: box.setdefault("s", our_pass(mats, r)), device))
            solvers[r] = box["s"]
            if args.serial_gram and "gram" in solvers[r]:
                serial[r].append(timed(lambda r=r: our_pass(mats, r, serial_gram=True), device))
    full_med = statistics.median(full)
    for r in args.ranks:
        med = statistics.median(ours[r])
        target = 20.0 if r <= 8 else 6.0 if r == 64 else None
        used = ",".join(f"{k}:{v}" for k, v in sorted(solvers[r].items()))
        print(f"decompose smollm2 rank={r}: ours {med:.2f} s, full SVD {full_med:.2f} s, speedup {full_med / med:.1f}x{verdict(full_med / med, target)} [solvers {used}]", flush=True)
        if serial[r]:
            one = statistics.median(serial[r])
            print(f"decompose smollm2 rank={r}: Gram solves in parallel threads {med:.2f} s, one at a time {one:.2f} s, speedup {one / med:.2f}x", flush=True)


def _gap_bound(theta: torch.Tensor, residual: torch.Tensor, R: torch.Tensor, rank: int) -> float:
    """The largest relative error bound of the top ``rank`` singular values when each takes the least of three
    bounds on lambda_i - theta_i for A^T A (each assuming, as the solver's own, that the Ritz values converged to
    the top eigenvalues in order, so that lambda_{i+1} <= theta_{i+1} + ||r_{i+1}||): the residual ||r_i||;
    Kato-Temple's ||r_i||^2 / (theta_i - theta_{i+1} - ||r_{i+1}||); and the cluster's ||R||^2 / (theta_r -
    theta_{r+1} - ||r_{r+1}||), R the residual block of the top r Ritz vectors (rows)."""
    best = residual[:rank].clone()
    for i in range(rank):
        gap = float(theta[i] - theta[i + 1] - residual[i + 1])
        if gap > 0:
            best[i] = min(float(best[i]), float(residual[i]) ** 2 / gap)
    delta = float(theta[rank - 1] - theta[rank] - residual[rank])
    if delta > 0:
        best = best.clamp_max(float(torch.linalg.matrix_norm(R[:rank], ord=2)) ** 2 / delta)
    return float((best / (2 * theta[:rank].clamp_min(1e-30))).max())


def _hindsight_dims(A: torch.Tensor, rank: int, block: int, exact: torch.Tensor, tol: float = 1e-2, seed: int = 0) -> tuple[int, int, int]:
    """Three block-Krylov dimensions for the top ``rank`` singular values: the fewest at which the Ritz values are
    within ``tol`` of ``exact`` (a stop that only knowing the answer allows); the fewest at which the residual
    certificate the solver stops on, ||r_i|| / (2 s_i^2) <= tol, holds (the solver's own stop, checked every block);
    and the fewest at which the gap-aware bounds of _gap_bound do (quadratic in the residual where the top values
    are apart)."""
    m, n = A.shape
    if m < n:
        A, (m, n) = A.mT, (n, m)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, block, generator=gen, dtype=A.dtype).to(A.device))[0].mT
    hindsight = certified = gap_certified = None
    while True:
        Y = (basis[-block:] @ A.mT) @ A
        for _ in range(2):
            Y -= (Y @ basis.mT) @ basis
        AV = A @ basis.mT
        theta, E = torch.linalg.eigh(AV.mT @ AV)
        theta, E = theta.flip(0)[: rank + 1].clamp_min(0), E.flip(1)[:, : rank + 1]
        s = theta[:rank].sqrt()
        d = basis.shape[0]
        if hindsight is None and len(s) == rank and float(((exact - s).abs() / exact).max()) < tol:
            hindsight = d
        X = E.mT @ basis  # Ritz vectors as rows
        R = (X @ A.mT) @ A - theta[:, None] * X
        residual = R.norm(dim=1)
        if certified is None and len(s) == rank and float((residual[:rank] / (2 * theta[:rank].clamp_min(1e-30))).max()) <= tol:
            certified = d
        if gap_certified is None and len(theta) > rank and _gap_bound(theta, residual, R, rank) <= tol:
            gap_certified = d
        if None not in (hindsight, certified, gap_certified) or d + block > n:
            return hindsight or d, certified or d, gap_certified or d
        basis = torch.cat([basis, torch.linalg.qr(Y.mT)[0].mT])


def bench_floor(args: argparse.Namespace, device: torch.device) -> None:
    """What no Krylov stopping rule can beat: the two passes over A per block alone, at the hindsight dimensions."""
    from lm_eval_lowrank.assets import smollm2_path

    mats = load_smollm2(Path(args.model or smollm2_path()), device, args.layers)
    full = timed(lambda: full_svd_pass(mats), device)
    exact = [torch.linalg.svdvals(W) for _, W in mats]
    for r in [r for r in args.ranks if r <= 16]:
        b = tk.krylov_block_size(r)
        found = [_hindsight_dims(W, r, b, s[:r]) for (_, W), s in zip(mats, exact)]
        tall = [(W if W.shape[0] >= W.shape[1] else W.mT, torch.randn(b, min(W.shape), device=device)) for _, W in mats]

        def passes(dims: list[int]) -> None:
            for (A, V), d in zip(tall, dims):
                for _ in range(d // b):
                    (V @ A.mT) @ A

        for label, dims in (("hindsight", [h for h, _, _ in found]), ("certified", [c for _, c, _ in found]), ("gap-certified", [g for _, _, g in found])):
            t = timed(lambda dims=dims: passes(dims), device)
            print(f"floor smollm2 rank={r}: passes alone at the {label} Krylov dimension (mean {sum(dims) / len(dims):.0f}) {t:.2f} s, full SVD {full:.2f} s, at most {full / t:.1f}x", flush=True)
    for r in [r for r in args.ranks if r > 16]:  # where auto takes the Gram solver: its syrk and partial eigensolve
        tall = [W if W.shape[0] >= W.shape[1] else W.mT for _, W in mats]
        grams = [tk._gram(A) for A in tall]
        t_syrk = timed(lambda: [tk._gram(A) for A in tall], device)
        t_eig = timed(lambda: [tk._top_eigh(G.clone(), min(r, G.shape[0]), triangle) for G, triangle in grams], device)
        print(f"floor smollm2 rank={r}: Gram solver's syrk {t_syrk:.2f} s + top-r eigensolve {t_eig:.2f} s alone, one at a time, full SVD {full:.2f} s, at most {full / (t_syrk + t_eig):.1f}x", flush=True)
        workers = torch.get_num_threads()
        if device.type == "cpu" and workers > 1 and tk.gram_solves_release_gil():  # as decompose-on-load runs them
            from concurrent.futures import ThreadPoolExecutor

            from lm_eval_lowrank.decompose import _torch_threads

            def gram_and_eigh(A: torch.Tensor) -> None:
                G, triangle = tk._gram(A)
                tk._top_eigh(G, min(r, G.shape[0]), triangle)

            with _torch_threads(1), tk.blas_single_threaded(), ThreadPoolExecutor(workers) as pool:
                t_both = timed(lambda: list(pool.map(gram_and_eigh, tall)), device)
            print(f"floor smollm2 rank={r}: the same in {workers} threads {t_both:.2f} s, at most {full / t_both:.1f}x", flush=True)


def _sweep_shape(W: torch.Tensor, ranks: list[int], reps: int, device: torch.device, label: str, solver: str, baseline: str) -> float | None:
    """Time ``baseline`` and ``solver`` at each rank; return the first r/min(m,n) where ``solver`` stops winning."""
    n_min = min(W.shape)
    truncated_svd(W, 1, solver="exact")  # warm-up
    exact = statistics.median(timed(lambda: truncated_svd(W, 1, solver="exact"), device) for _ in range(reps))  # rank-independent
    switch = None
    frac = 0.0
    for r in ranks:
        if r > n_min:
            continue
        t_fast = statistics.median(timed(lambda: truncated_svd(W, r, solver=solver), device) for _ in range(reps))
        t_base = exact if baseline == "exact" else statistics.median(timed(lambda: truncated_svd(W, r, solver=baseline), device) for _ in range(reps))
        used = truncated_svd(W, r, solver=solver).solver  # krylov gives up past its dimension cap
        frac = r / n_min
        if solver == "krylov":  # auto's rule is in r m / n^2 (Krylov ~ m n r, Gram ~ n^3)
            frac = r * max(W.shape) / n_min**2
        print(
            f"switch {label} rank={r} r/min={r / n_min:.3f} (r*m/n^2={r * max(W.shape) / n_min**2:.3f}): exact {exact * 1e3:.1f} ms, {baseline} {t_base * 1e3:.1f} ms, "
            f"{solver} {t_fast * 1e3:.1f} ms ({used}), {solver}/{baseline} {t_fast / t_base:.2f}, exact/{baseline} {exact / t_base:.1f}x",
            flush=True,
        )
        if switch is None and t_fast >= t_base:
            switch = frac
    unit = "r*m/n^2" if solver == "krylov" else "r/min(m,n)"
    print(f"switch point {label}: {solver} slower than {baseline} from {unit} = {switch if switch is not None else '>' + f'{frac:.3f}'}", flush=True)
    return switch


def bench_switch(args: argparse.Namespace, device: torch.device) -> None:
    from lm_eval_lowrank.assets import smollm2_path

    try:
        mats = dict(load_smollm2(Path(args.model or smollm2_path()), device, 1))
        kind = "smollm2"
    except Exception as exc:  # e.g. a GPU machine without the model: same shapes, random values
        print(f"# SmolLM2 weights unavailable ({type(exc).__name__}); random matrices of its shapes", flush=True)
        g = torch.Generator(device="cpu").manual_seed(0)
        mats = {f"0.{t}": torch.randn(*s, generator=g).to(device) for t, s in SMOLLM2_SHAPES.items()}
        kind = "random-smollm2-shape"
    cpu = device.type == "cpu"
    solver = args.solver or ("krylov" if cpu else "randomized")  # what auto uses for small ranks there
    baseline = args.baseline or ("gram" if cpu else "exact")  # and for large ones
    found = []
    for t in ("q", "k", "gate", "down"):  # 576x576, 192x576, 1536x576, 576x1536
        W = mats[f"0.{t}"]
        ranks = [r for r in (1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384) if r <= min(W.shape)]
        found.append(_sweep_shape(W, ranks, args.reps, device, f"{kind}.{t} {tuple(W.shape)}", solver, baseline))
    if args.large:
        g = torch.Generator(device="cpu").manual_seed(0)
        for shape in ((4096, 4096), (4096, 11008)):
            W = torch.randn(*shape, generator=g).to(device)
            found.append(_sweep_shape(W, [1, 64, 256, 512, 768, 1024, 1536], max(1, args.reps // 2), device, f"random {shape}", solver, baseline))
    known = [f for f in found if f is not None]
    if known:
        if solver == "krylov":
            print(f"switch point (min over shapes): r*m/n^2 = {min(known):.3f}; KRYLOV_GRAM_SWITCH now {tk.KRYLOV_GRAM_SWITCH}", flush=True)
        else:
            print(f"switch point (min over shapes): r/min(m,n) = {min(known):.3f}; RANDOMIZED_MAX_FRACTION now {tk.RANDOMIZED_MAX_FRACTION} (of rank + oversampling)", flush=True)


def bench_synthetic(args: argparse.Namespace, device: torch.device) -> None:
    """Llama-2-7B-shaped random bf16 weights: decompose time against the time to load the same weights."""
    from safetensors.torch import load_file, save_file

    if args.synthetic != "llama-2-7b":
        raise SystemExit(f"--synthetic {args.synthetic!r}: only llama-2-7b is known")
    n_layers = args.layers or LLAMA2_7B["layers"]
    shapes = LLAMA2_7B["shapes"]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lowrank-synth-"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_layers):  # write once: one safetensors file per layer, as a sharded checkpoint would
        path = workdir / f"layer{i:02d}.safetensors"
        if not path.exists():
            g = torch.Generator(device=device).manual_seed(1000 + i)
            tensors = {t: (torch.randn(*s, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu() for t, s in shapes.items()}
            save_file(tensors, str(path))
            del tensors
        files.append(path)
    total_params = n_layers * sum(a * b for a, b in shapes.values())
    print(f"# synthetic llama-2-7b: {n_layers} layers, {total_params / 1e9:.2f} B params bf16 in {workdir}, device {device}", flush=True)

    def plain_load() -> None:
        for p in files:
            w = load_file(str(p), device=str(device))
            sync(device)
            del w

    def decompose(rank: int) -> float:
        # Weights are loaded untimed; the timed part is what decompose-on-load adds per tensor:
        # the fp32 cast (decompose_model factors in fp32) and the factorisation.
        spent = 0.0
        for p in files:
            w = load_file(str(p), device=str(device))
            for W in w.values():
                spent += timed(lambda W=W: tucker_method(W.float(), rank), device)
            del w
        return spent

    plain_load()  # warm-up (page cache, CUDA context): the load figure is a warm load, the smallest denominator
    tucker_method(torch.randn(512, 512, device=device), 8)  # warm-up of the solvers
    loads: list[float] = []
    decs: dict[int, list[float]] = {r: [] for r in args.ranks}
    for _ in range(args.reps):
        loads.append(timed(plain_load, device))
        for r in args.ranks:
            decs[r].append(decompose(r))
    load_med = statistics.median(loads)
    for r in args.ranks:
        d = statistics.median(decs[r])
        # both readings of "decompose-on-load vs the plain load": the added time alone, and the whole load with it
        print(
            f"synthetic llama-2-7b rank={r}: decompose {d:.2f} s, plain load {load_med:.2f} s, decompose/load {d / load_med:.2f}x, "
            f"(load + decompose)/load {(load_med + d) / load_med:.2f}x",
            flush=True,
        )
    if args.full_svd_layers:
        # Full SVD of every matrix is minutes here: time a few layers and scale to all of them.
        spent = 0.0
        timed_files = files[: args.full_svd_layers]
        for p in timed_files:
            w = load_file(str(p), device=str(device))
            for W in w.values():
                A = W.float()
                spent += timed(lambda A=A: torch.linalg.svd(A, full_matrices=False), device)
            del w
        full = spent * n_layers / len(timed_files)
        for r in args.ranks:
            d = statistics.median(decs[r])
            print(f"synthetic llama-2-7b rank={r}: ours {d:.2f} s, full SVD {full:.2f} s (from {len(timed_files)} layers, scaled), speedup {full / d:.1f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="SmolLM2 folder (default: lm-eval-lowrank fetch-model)")
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--layers", type=int, default=None, help="only the first N layers")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--serial-gram", action="store_true", help="also time each rank that uses the Gram solver with its solves one at a time (interleaved)")
    p.add_argument("--switch", action="store_true", help="also sweep the small-rank solver against the large-rank one over ranks")
    p.add_argument("--switch-only", action="store_true")
    p.add_argument("--solver", choices=["krylov", "randomized", "gram"], default=None, help="--switch: the small-rank solver to sweep (default: auto's choice for --device)")
    p.add_argument("--baseline", choices=["exact", "gram"], default=None, help="--switch: what it is timed against (default: gram on a CPU, exact on a GPU)")
    p.add_argument("--large", action="store_true", help="the switch sweep also on 4096x4096 and 4096x11008")
    p.add_argument("--floor", action="store_true", help="also time what the solvers cannot beat: Krylov passes at the dimensions known in hindsight and at those where the 1%% certificate first holds (ranks <= 16), the Gram solver's syrk + eigensolve (larger ranks)")
    p.add_argument("--synthetic", default=None, help="llama-2-7b: random bf16 weights of that shape on --device")
    p.add_argument("--workdir", default=None, help="where --synthetic writes its safetensors files")
    p.add_argument("--full-svd-layers", type=int, default=1, help="--synthetic: layers whose full SVD is timed (0: none)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.synthetic:
        args.ranks = args.ranks or [1, 64]
        bench_synthetic(args, device)
        return
    args.ranks = args.ranks or [1, 8, 64, 128]
    if not args.switch_only:
        bench_smollm2(args, device)
    if args.floor:
        bench_floor(args, device)
    if args.switch or args.switch_only:
        bench_switch(args, device)


if __name__ == "__main__":
    sys.exit(main())
