"""Data-parallel processes splitting the solves (ProcessShard) against each decomposing the whole model alone.

Under ``accelerate launch`` every process holds the same model. Before, each one decomposed all of it; now they
split the solves and exchange the factors. This starts N gloo processes on the CPU (one torch thread each, as
the multi-process test runs them), and per configuration times, in interleaved rounds, ``compress_model`` with
and without the shard on a fresh load of the model. The wall time of a round is the slowest process's; the
median over rounds is kept. One line per configuration:

  python benchmarks/shared_solves.py                                  # SmolLM2, rank 8 all layers; rom at rank 8
  python benchmarks/shared_solves.py --configs 'rank=1,layers=all' --reps 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIGS = ["rank=8,layers=all", "rank=64,layers=all", "method=rom,rank=8,layers=3|15|28"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str, configs: list[str], reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.decompose import ProcessShard, factors_digest

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tok = AutoTokenizer.from_pretrained(folder)
    rows = {}
    for cfg in configs:
        args = {**dict(kv.split("=", 1) for kv in cfg.split(",")), "cache": "false"}
        times: dict[str, list[float]] = {"alone": [], "shared": []}
        exchange, digests = [], set()
        for _ in range(reps):
            for mode in ("alone", "shared"):
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                shard = ProcessShard.create() if mode == "shared" else None
                dist.barrier()
                start = time.perf_counter()
                report = compress_model(model, args, tokenizer=tok, progress=False, shard=shard)
                seconds = time.perf_counter() - start
                slowest = [None] * world
                dist.all_gather_object(slowest, seconds)
                times[mode].append(max(slowest))
                if shard is not None:
                    exchange.append(report.shared_solves["exchange_seconds"])
                digests.add(factors_digest(model))
                del model
        rows[cfg] = {"alone": statistics.median(times["alone"]), "shared": statistics.median(times["shared"]),
                     "exchange": statistics.median(exchange), "same_factors": len(digests) == 1}  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="SmolLM2 folder (default: lm-eval-lowrank fetch-model)")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="model_args decomposition arguments")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    from lm_eval_lowrank.assets import smollm2_path

    folder = str(args.model or smollm2_path())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, args.processes, port, folder, args.configs, args.reps, out)) for r in range(args.processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            sys.exit(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
        rows = json.loads(Path(out).read_text())
    print(f"# SmolLM2, {args.processes} gloo processes, 1 torch thread each, median of {args.reps} interleaved rounds", flush=True)
    for cfg, r in rows.items():
        print(
            f"shared solves '{cfg}': shared {r['shared']:.2f} s (exchange {r['exchange']:.2f} s), each alone "
            f"{r['alone']:.2f} s, shared / alone {r['shared'] / r['alone']:.2f} (ideal {1 / args.processes:.2f}); "
            f"same factors both ways: {r['same_factors']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
