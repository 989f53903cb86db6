"""Dense against decomposed through the real harness: latency, energy, memory, load time.

Builds a random-weight model of a known shape (accuracy is meaningless; compute cost is
the same as the trained model's), saves it once, then runs ``lm_eval --model hf-tucker``
in a separate process per configuration and prints one line per figure, each a ratio
against the dense run of the same invocation.

    python benchmarks/harness_efficiency.py --shape smollm2-135m --device cpu --limit 20
    python benchmarks/harness_efficiency.py --shape llama-2-7b --device cuda --dtype bfloat16 --limit 400

The synthetic model uses the SmolLM2 tokenizer, so its vocabulary is 49152 (the shapes of
every decoder layer are the named model's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _synthetic import save_random_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

DEFAULT_CONFIGS = {
    "smollm2-135m": ["rank=1,layers=3|15|28", "rank=8,layers=3-28:3", "rank=32,layers=all"],
    "llama-2-7b": ["rank=1,layers=3|18|32", "rank=1,layers=3-30:3|32", "rank=64,layers=3-30:3|32"],
}

ARC_YAML = """task: arc_bench
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
training_split: null
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def run_lm_eval(model_dir: Path, extra: str, task_dir: Path, args: argparse.Namespace, out: Path) -> dict:
    model_args = f"pretrained={model_dir},dtype={args.dtype},warmup_calls={args.warmup_calls}" + (f",{extra}" if extra else "")
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf-tucker", "--model_args", model_args,
        "--tasks", "arc_bench", "--include_path", str(task_dir), "--limit", str(args.limit),
        "--device", args.device, "--batch_size", str(args.batch_size), "--output_path", str(out),
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"lm_eval failed for {model_args!r}")
    res = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    res["_wall"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", help="a design_space built-in name (smollm2-135m, llama-2-7b, ...)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--batch-size", default="16")
    ap.add_argument("--configs", nargs="*", default=None, help="model_args suffixes, e.g. 'rank=1,layers=3|18|32'")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the cached SmolLM2)")
    ap.add_argument("--arc-file", default=None, help="ARC-Easy test.jsonl (default: from the data folder)")
    ap.add_argument("--json-out", default=None, help="write all results here")
    ap.add_argument("--warmup-calls", default="auto", help="hf-tucker's warmup_calls (auto: 1 on a GPU, 0 on the CPU); 0 shows the start-up in the first call")
    args = ap.parse_args()

    from lm_eval_lowrank.assets import smollm2_path

    tok_dir = Path(args.tokenizer) if args.tokenizer else smollm2_path()
    if args.arc_file:
        arc = Path(args.arc_file).resolve()
    else:
        from lm_eval_lowrank.tasks import data_dir

        arc = data_dir() / "arc_easy" / "test.jsonl"
    configs = args.configs or DEFAULT_CONFIGS.get(args.shape, DEFAULT_CONFIGS["smollm2-135m"])
    work = Path(tempfile.mkdtemp(prefix="lowrank-bench-"))
    try:
        task_dir = work / "tasks"
        task_dir.mkdir()
        (task_dir / "arc_bench.yaml").write_text(ARC_YAML.format(path=arc))
        model_dir = work / "model"
        build_s = save_random_model(args.shape, model_dir, device=args.device, dtype=args.dtype, tokenizer_dir=tok_dir)
        print(f"model {args.shape} (random weights, {args.dtype}) built and saved in {build_s:.1f} s", flush=True)
        runs = {"dense": run_lm_eval(model_dir, "", task_dir, args, work / "out_dense")}
        for extra in configs:
            runs[extra] = run_lm_eval(model_dir, extra, task_dir, args, work / f"out_{len(runs)}")
        dense = runs["dense"]["config"]["lowrank"]
        print(f"dense: load {dense['decomposition']['load_seconds']:.2f} s, forward {dense['latency']['total_seconds']:.3f} s "
              f"({dense['latency']['timer']}, {dense['latency']['calls']} batches), "
              f"energy {_energy(dense)}, peak memory {dense['memory']['bytes'] / 2**30:.2f} GiB ({dense['memory']['kind']})")
        calls = dense["latency"]["per_call_seconds"]
        if len(calls) > 1:  # the first (largest) batch against the median of the rest, per input token
            tokens = dense["latency"]["per_call_input_tokens"]
            rest = sorted(t / n for t, n in zip(calls[1:], tokens[1:]))
            print(f"dense: first timed call / median call, per input token: {calls[0] / tokens[0] / rest[len(rest) // 2]:.2f} "
                  f"({dense['latency']['warmup_calls']} warm-up calls before it)")
        for extra in configs:
            low = runs[extra]["config"]["lowrank"]
            dec = low["decomposition"]
            cut = dec["param_reduction"]
            lat = low["latency"]["total_seconds"] / dense["latency"]["total_seconds"]
            print(f"[{extra}] params cut {100 * cut:.2f}%")
            print(f"[{extra}] decompose-on-load / plain load: {(dec['load_seconds'] + dec['decomposition_seconds']) / dense['decomposition']['load_seconds']:.2f}x "
                  f"(load {dec['load_seconds']:.2f} s + decompose {dec['decomposition_seconds']:.2f} s, solvers {dec['solvers']})")
            print(f"[{extra}] forward latency ratio {lat:.3f} (cut {100 * (1 - lat):.1f}%; latency cut / param cut = {(1 - lat) / cut:.2f})")
            tps = low["latency"]["tokens_per_second"] / dense["latency"]["tokens_per_second"]
            print(f"[{extra}] tokens/s ratio {tps:.3f}")
            if low["energy"].get("available") and dense["energy"].get("available"):
                er = low["energy"]["joules_per_token"] / dense["energy"]["joules_per_token"]
                print(f"[{extra}] energy per token ratio {er:.3f} (cut {100 * (1 - er):.1f}%; energy cut / param cut = {(1 - er) / cut:.2f}); "
                      f"J/token dense {dense['energy']['joules_per_token']:.4g}, decomposed {low['energy']['joules_per_token']:.4g} ({low['energy']['method']})")
            else:
                print(f"[{extra}] energy: n/a: {low['energy'].get('reason')}")
            print(f"[{extra}] peak memory ratio {low['memory']['bytes'] / dense['memory']['bytes']:.3f}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({k: v["config"]["lowrank"] | {"wall": v["_wall"], "results": v["results"]} for k, v in runs.items()}, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _energy(low: dict) -> str:
    e = low["energy"]
    if not e.get("available"):
        return f"n/a: {e.get('reason')}"
    return f"{e['total_joules']:.1f} J ({e['joules_per_token']:.4g} J/token, {e['method']})"


if __name__ == "__main__":
    main()
