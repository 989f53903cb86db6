"""The gradient pass under a real memory limit: grad_checkpoint=false against auto, in a memory cgroup.

Each way runs ``calibration.fisher_row_sums`` (every linear of every layer, ``--batch`` sequences of ``--len``
tokens) in a process of its own inside a fresh memory cgroup limited to ``--limit-gib``. A first run without a
limit, plain, gives the reference sums. Each line says whether the way finished or was killed (OOM), its time and
peak RSS, what ``auto`` decided, and whether the sums are the reference's bit for bit.

Needs a writable cgroup tree (v1's memory controller or v2 with memory in the root's subtree_control), usually root.

    python benchmarks/memory_limit.py                          # SmolLM2, 2 x 2048 tokens, a 6.2 GiB limit
    python benchmarks/memory_limit.py --len 1024 --limit-gib 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM
from lm_eval_lowrank import calibration
from lm_eval_lowrank.architectures import adapter_for_model
from lm_eval_lowrank.plan import candidate_paths
from lm_eval_lowrank.spec import DecompositionSpec
folder, mode, length, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
spec = DecompositionSpec.from_args({"rank": 8, "method": "fwsvd", "layers": "all"})
paths = [p for p, _ in candidate_paths(spec, model.config, adapter=adapter_for_model(model))]
ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
report = {}
start = time.perf_counter()
sums, _ = calibration.fisher_row_sums(model, paths, ids, batch_size=batch, checkpoint_layers={"auto": None, "true": True, "false": False}[mode], report=report)
seconds = time.perf_counter() - start
torch.save(sums, out)
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **report}))
"""


def make_cgroup(limit: int) -> tuple[Path, Path]:
    """(the cgroup's folder, its procs file): v1's memory controller if mounted, else v2."""
    name = f"lowrank-bench-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        folder = v1 / name
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(limit))
        return folder, folder / "cgroup.procs"
    v2 = Path("/sys/fs/cgroup")
    if "memory" not in (v2 / "cgroup.subtree_control").read_text().split():
        raise SystemExit("memory_limit.py: v2's memory controller is not enabled in /sys/fs/cgroup/cgroup.subtree_control")
    folder = v2 / name
    folder.mkdir()
    (folder / "memory.max").write_text(str(limit))
    if (folder / "memory.swap.max").exists():  # killed at the limit, not swapped
        (folder / "memory.swap.max").write_text("0")
    return folder, folder / "cgroup.procs"


def run(folder: str, mode: str, args: argparse.Namespace, out: Path, procs: Path | None) -> dict:
    cmd = [sys.executable, "-c", CHILD, folder, mode, str(args.len), str(args.batch), str(out)]
    if procs is not None:  # the child joins the cgroup before it starts python
        cmd = ["bash", "-c", f'echo $$ > "{procs}" && exec "$@"', "bash", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        killed = r.returncode in (137, -9)
        if not killed:
            raise SystemExit(f"memory_limit.py: {mode} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
        return {"killed": True}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="an HF folder (default: the cached SmolLM2)")
    ap.add_argument("--len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=2, help="sequences, all in one batch (grad_batch)")
    ap.add_argument("--limit-gib", type=float, default=6.2, help="the cgroup's memory limit")
    ap.add_argument("--modes", nargs="+", default=["false", "auto"], choices=["false", "true", "auto"])
    args = ap.parse_args()
    from lm_eval_lowrank.assets import smollm2_path

    folder = args.model or str(smollm2_path())
    work = Path(tempfile.mkdtemp(prefix="lowrank-limit-"))
    try:
        measure(folder, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(folder: str, args: argparse.Namespace, work: Path) -> None:
    import torch

    reference = run(folder, "false", args, work / "reference.pt", None)
    print(f"no limit [false]: {reference['seconds']:.1f} s, peak RSS {reference['peak_rss'] / 2**20:.0f} MiB", flush=True)
    expected = torch.load(work / "reference.pt")
    limit = int(args.limit_gib * 2**30)
    for mode in args.modes:
        cgroup, procs = make_cgroup(limit)
        try:
            got = run(folder, mode, args, work / f"{mode}.pt", procs)
        finally:
            cgroup.rmdir()
        where = f"memory limit {args.limit_gib:g} GiB [{mode}]"
        if got.get("killed"):
            print(f"{where}: killed (out of memory)", flush=True)
            continue
        sums = torch.load(work / f"{mode}.pt")
        same = all(torch.equal(sums[p], expected[p]) for p in expected)
        held = got["held_bytes_first_batch"]
        counted = "" if held is None else f", counted {held / 2**30:.2f} GiB held against a budget of {got['held_budget_bytes'] / 2**30:.2f} GiB"
        print(f"{where}: finished in {got['seconds']:.1f} s, peak RSS {got['peak_rss'] / 2**20:.0f} MiB, layers checkpointed: "
              f"{got['checkpoint_layers']}{counted}; the same sums as without a limit, bit for bit: {'yes' if same else 'NO'}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
