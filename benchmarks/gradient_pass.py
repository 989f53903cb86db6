"""The gradient pass (fwsvd, fwhiten, allocator=fisher): batched against one sequence at a time, same model and tokens.

Both compute every targeted linear's (and stacked expert projection's) Fisher row sums
f_i = sum_n sum_j (dL_n/dW_ij)^2 over the calibration sequences. The per-sequence pass (the way before session 18;
for stacked experts, before session 19) runs a forward and backward per sequence and squares each weight's gradient
(grad_batch=1); the batched pass runs ``--batch`` sequences at once, takes no weight gradient, and reads each
sequence's squared gradient from the module's inputs and output gradients (calibration._gradient_row_sums_reader,
and _routed_gradient_row_sums_reader for each expert's routed tokens). The passes alternate, the median is kept,
and the line after the timings gives the largest relative difference of f between the two over all modules.

  python benchmarks/gradient_pass.py                          # SmolLM2, 7 tensors x 30 layers, 32 x 128 wikitext tokens
  python benchmarks/gradient_pass.py --batch 2 4 8 16 --n 32 --repeats 5
  python benchmarks/gradient_pass.py --device cuda --synthetic llama-2-7b --synthetic-layers 8 --dtype bfloat16 \
      --tokenizer DIR --batch 2 8 16                          # random weights of that shape, SmolLM2's vocabulary
  python benchmarks/gradient_pass.py --synthetic olmoe-1b-7b --synthetic-layers 1 \
      --tensors 'experts.gate_up_proj|experts.down_proj'      # the experts of one OLMoE layer
  python benchmarks/gradient_pass.py --batch 2 4 --checkpoint # also each pass with its layers recomputed
                                                              # (grad_checkpoint=true): time ratio, same bits
  python benchmarks/gradient_pass.py --synthetic llama-2-7b --synthetic-layers 2 --dtype bfloat16 --len 128 512 \
      --batch 2 --repeats 0 --held                            # what the first batch holds for its backward
                                                              # (grad_checkpoint=auto's count), per token and layer
  python benchmarks/gradient_pass.py --dtype bfloat16 --n 4 --batch 2 --repeats 1 --native-half
                                                              # also torch's own bf16 kernels, which CPUs without
                                                              # native half GEMM run slowly (half_backward.py)

The peak memory of each way is measured by benchmarks/memory.py, in processes of their own (a process's peak RSS
cannot be split between passes run in it):

  python benchmarks/memory.py --repeats 3 --configs 'method=fwhiten,rank=8,layers=3|15|28,cache=false' \
      'method=fwhiten,rank=8,layers=3|15|28,cache=false,grad_checkpoint=true'
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lm_eval_lowrank import calibration  # noqa: E402
from _synthetic import save_random_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _timing import timed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an HF folder (default: the cached SmolLM2)")
    ap.add_argument("--synthetic", default=None, help="instead of --model: random weights of this shape (e.g. llama-2-7b)")
    ap.add_argument("--synthetic-layers", type=int, default=None, help="keep only the first N decoder layers of --synthetic")
    ap.add_argument("--tokenizer", default=None, help="--synthetic's vocabulary and the calibration tokens' (default: SmolLM2's)")
    ap.add_argument("--workdir", default=None, help="where --synthetic saves its model (reused when there)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tensors", default="all", help="the spec's tensors (e.g. 'experts.gate_up_proj|experts.down_proj')")
    ap.add_argument("--n", type=int, default=32, help="calibration sequences")
    ap.add_argument("--len", type=int, nargs="+", default=[128], help="tokens per sequence (several: --held only; the timings take the first)")
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8], help="batch sizes (>= 2) of the batched pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", action="store_true", help="also time every pass with its decoder layers recomputed in the backward")
    ap.add_argument("--held", action="store_true", help="also count what one batch of each size and length holds for its backward")
    ap.add_argument("--native-half", action="store_true", help="--dtype bfloat16/float16 on a CPU: also time every pass with torch's own half-precision kernels")
    args = ap.parse_args(argv)
    if min(args.batch) < 2:
        ap.error("--batch: each size must be >= 2 (1 is the per-sequence pass, always measured)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.assets import smollm2_path
    from lm_eval_lowrank.plan import candidate_paths
    from lm_eval_lowrank.spec import DecompositionSpec

    device = torch.device(args.device)
    if args.synthetic:
        folder = Path(args.workdir or tempfile.mkdtemp(prefix="lowrank-grad-")) / f"{args.synthetic}-random-{args.dtype}-{args.synthetic_layers or 'all'}"
        if not (folder / "config.json").is_file():
            tokenizer = Path(args.tokenizer) if args.tokenizer else smollm2_path()
            save_random_model(args.synthetic, folder, device=args.device, dtype=args.dtype, tokenizer_dir=tokenizer, layers=args.synthetic_layers)
    else:
        folder = Path(args.model) if args.model else smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = DecompositionSpec.from_args({"rank": 8, "method": "fwsvd", "calib_n": args.n, "calib_len": args.len[0], "tensors": args.tensors, "layers": "all"})
    ids, _ = calibration.calibration_tokens(spec, tokenizer)
    paths = [p for p, _ in candidate_paths(spec, model.config, adapter=adapter_for_model(model))]
    print(f"# {folder.name}: {len(paths)} targets, {ids.shape[0]} x {ids.shape[1]} tokens, {args.dtype}, device {device}, torch threads {torch.get_num_threads()}")

    found: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}  # (batch size (1: per sequence), checkpointed) -> the sums

    def run(b: int, ckpt: bool):
        return lambda: found.__setitem__((b, ckpt), calibration.fisher_row_sums(model, paths, ids, batch_size=b, checkpoint_layers=ckpt)[0])

    ways = [(b, ckpt) for b in [1, *args.batch] for ckpt in ((False, True) if args.checkpoint else (False,))]
    times: dict[tuple[int, bool], list[float]] = {w: [] for w in ways}
    for r in range(args.repeats):
        for w in ways if r % 2 == 0 else ways[::-1]:  # alternate the order: a drift lands on both sides
            times[w].append(timed(run(*w), device, collect=True))
    if args.repeats > 0:
        timings(args, ids, paths, found, times)
    if args.native_half:
        native_half(model, paths, ids, args, device)
    if args.held:
        held(model, paths, spec, tokenizer, args, device)
    return 0


def timings(args: argparse.Namespace, ids: torch.Tensor, paths: list[str], found: dict, times: dict) -> None:
    seq = statistics.median(times[1, False])
    print(f"gradient pass per sequence: {seq:.2f} s ({seq / ids.shape[0] * 1e3:.0f} ms a sequence)")
    for b in args.batch:
        t = statistics.median(times[b, False])
        worst = max(float(((found[b, False][p] - found[1, False][p]).abs() / found[1, False][p].abs().clamp_min(1e-30)).max()) for p in paths)
        print(f"gradient pass batch {b}: {t:.2f} s, speedup {seq / t:.2f}x over per sequence; largest relative difference of f {worst:.1e}")
    if args.checkpoint:
        for b in [1, *args.batch]:
            plain, ckpt = times[b, False], times[b, True]
            ratios = sorted(c / p for p, c in zip(plain, ckpt))
            same = all(torch.equal(found[b, True][p], found[b, False][p]) for p in paths)
            print(f"gradient pass batch {b} with layers recomputed: {statistics.median(ckpt):.2f} s, {statistics.median(ratios):.2f}x "
                  f"[{ratios[0]:.2f}..{ratios[-1]:.2f}] the plain pass's time (per round); the same sums bit for bit: {'yes' if same else 'NO'}")  # fmt: skip


def native_half(model, paths: list[str], ids: torch.Tensor, args: argparse.Namespace, device: torch.device) -> None:
    """Each pass with the linears in fp32 (half_backward.linears_in_fp32, what this CPU gets) against torch's own
    half-precision kernels, alternating per round; the largest relative difference of f between the two."""
    from lm_eval_lowrank import half_backward

    dtype = next(model.parameters()).dtype
    if device.type != "cpu" or not half_backward.slow_half_products(dtype):
        print(f"# --native-half: {dtype} on {device.type} already runs torch's own kernels (nothing to compare)")
        return
    found: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}

    def run(b: int, native: bool):
        def go() -> None:
            half_backward._SLOW[dtype] = not native  # the probe's answer, overridden for the native side
            try:
                found[b, native] = calibration.fisher_row_sums(model, paths, ids, batch_size=b, checkpoint_layers=False)[0]
            finally:
                half_backward._SLOW[dtype] = True

        return go

    ways = [(b, native) for b in [1, *args.batch] for native in (False, True)]
    times: dict[tuple[int, bool], list[float]] = {w: [] for w in ways}
    for r in range(max(1, args.repeats)):
        for w in ways if r % 2 == 0 else ways[::-1]:
            times[w].append(timed(run(*w), device, collect=True))
    for b in [1, *args.batch]:
        ours, native = statistics.median(times[b, False]), statistics.median(times[b, True])
        worst = max(float(((found[b, False][p] - found[b, True][p]).abs() / found[b, True][p].abs().clamp_min(1e-30)).max()) for p in paths)
        print(f"gradient pass batch {b} in {str(dtype).removeprefix('torch.')}: linears in fp32 {ours:.2f} s, torch's own kernels {native:.2f} s, "
              f"speedup {native / ours:.1f}x; largest relative difference of f {worst:.1e}")  # fmt: skip


def held(model, paths: list[str], spec, tokenizer, args: argparse.Namespace, device: torch.device) -> None:
    """One batch per (length, size): the bytes grad_checkpoint=auto counts as held for the backward (the graph's
    saved tensors and the gradient readers' kernels), per token and decoder layer (the targets start in layer 1,
    so the graph spans every layer); on CUDA beside the device memory the pass allocated at its peak."""
    from lm_eval_lowrank.architectures import adapter_for_model

    layers = len(adapter_for_model(model).layers(model))
    for length in args.len:
        ids, _ = calibration.calibration_tokens(spec.with_(calib_len=length, calib_n=max(args.batch)), tokenizer)
        for b in sorted({1, *args.batch}):
            report: dict = {}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            calibration.fisher_row_sums(model, paths, ids[:b], batch_size=b, checkpoint_layers=None, report=report)
            n = report["held_bytes_first_batch"]
            line = f"held for the backward, {length} tokens, batch {b}: {n / 2**20:.1f} MiB, {n / (b * length * layers) / 1024:.1f} KiB a token a layer"
            if device.type == "cuda":
                line += f"; the pass's peak allocation {(torch.cuda.max_memory_allocated(device) - base) / 2**20:.1f} MiB"
            if report["checkpoint_layers"]:  # the count stopped where it passed the budget
                line += f"; at least that: the budget ({report['held_budget_bytes'] / 2**30:.1f} GiB) was passed and the layers checkpointed"
            print(line)


if __name__ == "__main__":
    sys.exit(main())
