"""Wall-time overhead of hf-tucker with nothing decomposed against plain hf (goal <= 1.02).

Both run the same lm-eval evaluation in this process (the model is loaded once per run,
as lm-eval does), interleaved over repetitions so machine noise hits both alike; the
median ratio is printed.

    python benchmarks/overhead.py --limit 40 --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the cached SmolLM2)")
    ap.add_argument("--tasks", default="arc_easy_local")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from lm_eval_lowrank.assets import smollm2_path
    from lm_eval_lowrank.tasks import task_dir

    model = args.model or str(smollm2_path())
    tm = TaskManager(include_path=str(task_dir()))
    tasks = args.tasks.split(",")

    def run(name: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=name, model_args=f"pretrained={model},dtype=float32", tasks=tasks, task_manager=tm,
            limit=args.limit, device=args.device, batch_size=args.batch_size, log_samples=False, verbosity="ERROR",
        )  # fmt: skip
        return time.perf_counter() - t0, res["results"]

    run("hf")  # warm-up: file cache, dataset cache, imports
    times: dict[str, list[float]] = {"hf": [], "hf-tucker": []}
    results = {}
    for i in range(args.reps):
        for name in (("hf", "hf-tucker") if i % 2 == 0 else ("hf-tucker", "hf")):
            t, results[name] = run(name)
            times[name].append(t)
    same = results["hf"] == results["hf-tucker"]
    ratios = [a / b for a, b in zip(times["hf-tucker"], times["hf"])]
    print(f"overhead: hf {statistics.median(times['hf']):.2f} s, hf-tucker (nothing decomposed) {statistics.median(times['hf-tucker']):.2f} s (medians of {args.reps})")
    ratio = statistics.median(ratios)
    print(f"overhead ratio hf-tucker/hf: median {ratio:.3f} (per-rep {', '.join(f'{r:.3f}' for r in ratios)}) (goal <= 1.02) {'PASS' if ratio <= 1.02 else 'FAIL'}")
    print(f"overhead: identical scores: {same}")


if __name__ == "__main__":
    main()
