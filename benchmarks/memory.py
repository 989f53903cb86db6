"""Peak memory of decompose-on-load against a dense load of the same model (goal <= 1.05).

Each configuration constructs ``HFTuckerLM`` in its own subprocess, runs one short forward
and reports the process's peak RSS (``ru_maxrss``), so the figures do not contaminate each
other. The forward matters: transformers maps safetensors files into memory, so a dense
load alone leaves most weight pages unread (and out of RSS) until the first forward, while
decomposition reads every targeted weight at load. Load + first forward is what every
evaluation pays, and compares like with like.

    python benchmarks/memory.py
    python benchmarks/memory.py --configs 'rank=1,layers=3|15|28' 'method=whiten,budget=0.8,calib_n=16'
    python benchmarks/memory.py --repeats 3      # median [range] of 3 interleaved rounds
    python benchmarks/memory.py --synthetic mixtral-8x7b --synthetic-layers 1 --dtype bfloat16 \
        --configs 'rank=64,tensors=experts.gate_up_proj|experts.down_proj,layers=all'   # random weights of that shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from lm_eval_lowrank.harness import HFTuckerLM
from lm_eval_lowrank.spec import parse_model_args
args = parse_model_args(sys.argv[1])
t = time.perf_counter()
lm = HFTuckerLM(device=sys.argv[2], **args)
import torch
lm._model_call(torch.ones(1, 16, dtype=torch.long, device=lm.device))  # touch every weight, as any evaluation does
info = lm.get_model_info()["lowrank"]["decomposition"]
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.perf_counter() - t, "param_reduction": info.get("param_reduction", 0.0)}))
"""


def measure(model_args: str, device: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, model_args, device], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed for {model_args!r}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the cached SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", nargs="*", default=["rank=1,layers=3|15|28", "rank=8,layers=all", "rank=32,layers=all"])
    ap.add_argument("--repeats", type=int, default=1, help="rounds, each measuring every configuration once (peaks vary by a few %% between processes)")
    ap.add_argument("--synthetic", default=None, help="a design_space built-in shape (llama-2-7b, mixtral-8x7b, ...): random weights, SmolLM2's tokenizer")
    ap.add_argument("--synthetic-layers", type=int, default=None, help="--synthetic: only the first N decoder layers")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    from lm_eval_lowrank.assets import smollm2_path

    work = None
    if args.synthetic:
        # Built in a process of its own: a child forked from a parent that held the model would inherit its peak
        # RSS (Linux keeps ru_maxrss across exec), and every figure would read as that peak.
        work = tempfile.mkdtemp(prefix="lowrank-memory-")
        model = os.path.join(work, "model")
        build = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_synthetic.py"), args.synthetic, model,
                 "--dtype", args.dtype, "--tokenizer", str(smollm2_path())]  # fmt: skip
        if args.synthetic_layers:
            build += ["--layers", str(args.synthetic_layers)]
        r = subprocess.run(build, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"building {args.synthetic} failed:\n{r.stderr[-3000:]}")
        s = float(r.stdout.strip().splitlines()[-1])
        print(f"# {args.synthetic} ({args.synthetic_layers or 'all'} layers, random {args.dtype} weights) built in {s:.1f} s", flush=True)
    else:
        model = args.model or str(smollm2_path())
    try:
        run(f"pretrained={model},dtype={args.dtype},cache=false", args)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def run(base: str, args: argparse.Namespace) -> None:
    ratios: dict[str, list[float]] = {extra: [] for extra in args.configs}
    for rnd in range(args.repeats):  # rounds interleave the configurations, so drift hits them alike
        dense = measure(base, args.device)
        print(f"memory round {rnd + 1}: dense load peak RSS {dense['peak_rss'] / 2**20:.0f} MiB", flush=True)
        for extra in args.configs:
            m = measure(f"{base},{extra}", args.device)
            ratios[extra].append(m["peak_rss"] / dense["peak_rss"])
            print(f"memory round {rnd + 1} [{extra}]: peak RSS {m['peak_rss'] / 2**20:.0f} MiB, param cut {100 * m['param_reduction']:.1f}%, ratio {ratios[extra][-1]:.3f}", flush=True)
    for extra, rs in ratios.items():
        med = statistics.median(rs)
        spread = f" [{min(rs):.3f}..{max(rs):.3f}] over {len(rs)} rounds" if len(rs) > 1 else ""
        print(f"memory [{extra}]: ratio to dense load {med:.3f}{spread} (goal <= 1.05) {'PASS' if med <= 1.05 else 'FAIL'}")


if __name__ == "__main__":
    main()
