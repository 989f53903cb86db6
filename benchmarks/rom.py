"""rom's solve: the truncated solvers on W S against the exact fp64 eigendecomposition, same statistics.

The input covariances are real: every decoder linear of SmolLM2 sees held-out wikitext
(calibration documents) in one dense forward. For each rank, both paths solve every matrix, timed
side by side (repetitions interleaved, median kept); the quality figure is the ratio of their output
errors ||(W - W_hat) X||_F, from trace((W - W_hat) C (W - W_hat)^T). Calibration itself is the same
for both and is not timed. q, k, v (and gate, up) share one statistics object, as in a real run, so
rom factorises their covariance once.

  python benchmarks/rom.py --threads 1                         # SmolLM2: 7 tensors x 30 layers, ranks 1 8 64
  python benchmarks/rom.py --threads 1 --synthetic llama-2-7b  # + one 4096x4096 and one 11008x4096 matrix at rank 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lm_eval_lowrank.methods import LayerStats  # noqa: E402
from lm_eval_lowrank.methods.rom import output_principal_basis, rom_method  # noqa: E402
from _timing import timed  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def exact_rom(W: torch.Tensor, C: torch.Tensor, rank: int) -> torch.Tensor:
    """The exact path (session 4's rom): fp64 eigendecomposition, W_hat = V V^T W."""
    V, _ = output_principal_basis(W, C, rank)
    return V @ (V.mT @ W.double())


def output_error(W: torch.Tensor, W_hat: torch.Tensor, C: torch.Tensor) -> float:
    D = (W.double() - W_hat.double()).cpu()
    return float(((D @ C.double()) * D).sum().clamp_min(0).sqrt())


def smollm2_stats(folder: Path, n: int, length: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, weight, input covariance) of every decoder linear, from one dense forward on calibration text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.calibration import calibration_tokens
    from lm_eval_lowrank.spec import DecompositionSpec

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids, _ = calibration_tokens(DecompositionSpec.from_args({"method": "rom", "rank": 1, "calib_n": n, "calib_len": length}), tok)
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m: torch.nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.mT @ x
            hooks.append(mod.register_forward_pre_hook(hook))
    # q, k, v (and gate, up) see the same inputs: one covariance object each, as the calibrator gives.
    with torch.no_grad():
        for i in range(0, ids.shape[0], 8):
            model(ids[i : i + 8])
    for h in hooks:
        h.remove()
    tokens = ids.numel()
    shared: dict[tuple[str, str], torch.Tensor] = {}
    out = []
    for name, s in sums.items():
        layer, kind = name.split(".")[0], name.rsplit(".", 1)[-1]
        group = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(kind, kind)
        C = shared.setdefault((layer, group), s / tokens)
        out.append((name, model.model.layers.get_submodule(name).weight.detach().clone(), C))
    return out


def synthetic_stats(seed: int = 0) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Llama-2-7B's q (4096x4096) and gate (11008x4096) shapes; covariances with a decaying spectrum, as real ones have."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, (m, n) in (("q", (4096, 4096)), ("gate", (11008, 4096))):
        W = torch.randn(m, n, generator=g) / n**0.5
        X = torch.randn(2 * n, n, generator=g) * torch.logspace(0, -2, n)
        out.append((name, W, X.mT @ X / X.shape[0]))
    return out


def bench(mats: list[tuple[str, torch.Tensor, torch.Tensor]], ranks: list[int], reps: int, label: str, device: torch.device) -> None:
    # Weights on the device, covariances on the CPU, as the calibrator leaves them.
    mats = [(name, W.to(device), C) for name, W, C in mats]
    for r in ranks:
        ours: list[float] = []
        exact: list[float] = []
        solvers: dict[str, int] = {}
        for _ in range(reps):  # interleaved
            box: dict[str, list] = {}
            exact.append(timed(lambda: box.__setitem__("exact", [exact_rom(W, C, min(r, min(W.shape))) for _, W, C in mats]), device))
            # Fresh statistics objects each repetition, shared by the modules that share a covariance.
            stats = {id(C): LayerStats(C, 1) for _, _, C in mats}
            ours.append(timed(lambda: box.__setitem__("ours", [rom_method(W, min(r, min(W.shape)), stats[id(C)]) for _, W, C in mats]), device))
        worst = 1.0
        for (_, W, C), f, W_exact in zip(mats, box["ours"], box["exact"]):
            solvers[f.info["solver"]] = solvers.get(f.info["solver"], 0) + 1
            worst = max(worst, output_error(W, f.dense(), C) / max(output_error(W, W_exact, C), 1e-30))
        t_ours, t_exact = statistics.median(ours), statistics.median(exact)
        used = ",".join(f"{k}:{v}" for k, v in sorted(solvers.items()))
        print(
            f"rom {label} rank={r}: ours {t_ours:.2f} s, exact fp64 path {t_exact:.2f} s, speedup {t_exact / t_ours:.1f}x; "
            f"worst output error ours/exact {worst:.4f} [solvers {used}]",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SmolLM2 folder (default: lm-eval-lowrank fetch-model)")
    p.add_argument("--device", default="cpu", help="where the weights are (covariances stay on the CPU, as in a real run)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--calib-n", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--synthetic", choices=["llama-2-7b"], default=None, help="also one q- and one gate-shaped matrix of that model (one repetition)")
    p.add_argument("--synthetic-ranks", type=int, nargs="+", default=[64])
    p.add_argument("--synthetic-only", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval_lowrank.assets import smollm2_path

    if not args.synthetic_only:
        mats = smollm2_stats(Path(args.model or smollm2_path()), args.calib_n, args.calib_len)
        print(f"# {len(mats)} SmolLM2 matrices, covariances from {args.calib_n}x{args.calib_len} calibration tokens, torch threads {torch.get_num_threads()}", flush=True)
        bench(mats, args.ranks, args.reps, "smollm2", torch.device(args.device))
    if args.synthetic or args.synthetic_only:
        bench(synthetic_stats(), args.synthetic_ranks, 1, args.synthetic or "llama-2-7b", torch.device(args.device))


if __name__ == "__main__":
    sys.exit(main())
