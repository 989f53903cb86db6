"""Table of a healing comparison: dense / compressed / LM-healed / KD-healed (issue #5).

Not a timed benchmark: it collects lm-eval result JSONs and the checkpoints' healing records.
Each row is ``NAME=CKPT`` (``CKPT`` empty for the dense model); its lm-eval outputs are the
folders ``EVAL_DIR/NAME_arc``, ``NAME_wt`` and ``NAME_hs`` (``--output_path`` of lm_eval for
arc_easy_local, wikitext_local and hellaswag_approx_local; any of them may be missing).

The measurement itself, on one CPU thread (OMP_NUM_THREADS=1)::

    lm-eval-lowrank decompose --model_args 'pretrained=PATH,method=whiten,budget=0.9,allocator=sensitivity,calib_n=128' --out ckpt
    lm-eval-lowrank heal ckpt --out kd --teacher dense --steps 100 --lr 2e-4 \\
        --data DATA/gsm8k/train.jsonl --data DATA/arc_easy/validation.jsonl \\
        --data DATA/arc_challenge/validation.jsonl --data DATA/mmlu/dev
    lm-eval-lowrank heal ckpt --out lm (same data and steps, no --teacher)
    lm_eval --model hf-tucker --model_args pretrained=kd,dtype=float32 --tasks arc_easy_local --limit 1000 \\
        --include_path $(lm-eval-lowrank tasks) --output_path EVAL_DIR/kd_arc   (likewise _wt, _hs)
    python benchmarks/healing.py --eval_dir EVAL_DIR --row dense= --row compressed=ckpt --row lm-healed=lm --row kd-healed=kd

Never heal on a split an evaluated task scores: the healing record's ``scored_by`` lists,
per data file, the local tasks that score it (empty for the data above).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TASKS = {"arc": "arc_easy_local", "wt": "wikitext_local", "hs": "hellaswag_approx_local"}


def _results(folder: Path, task: str) -> tuple[dict[str, Any], int | None] | None:
    files = sorted(folder.rglob("results_*.json")) if folder.is_dir() else []
    if not files:
        return None
    data = json.loads(files[-1].read_text())
    n = (data.get("n-samples") or {}).get(task, {}).get("effective")
    return data["results"].get(task, {}), n


def _acc(r: tuple[dict[str, Any], int | None] | None) -> str:
    if r is None:
        return "-"
    res, n = r
    a, an = res.get("acc,none"), res.get("acc_norm,none")
    sa, san = res.get("acc_stderr,none"), res.get("acc_norm_stderr,none")
    return f"{a:.3f} ± {sa:.3f} / {an:.3f} ± {san:.3f} (n={n})"


def row(name: str, ckpt: str, eval_dir: Path) -> str:
    cut, heal = "0", "-"
    if ckpt:
        m = json.loads((Path(ckpt) / "lowrank_manifest.json").read_text())
        cut = f"{100 * m['params']['reduction']:.2f}%"
        recs = m.get("healing") or []
        if recs:
            h = recs[-1]
            kl = f", KL {h['kl_before']:.3f} -> {h['kl_after']:.3f}" if "kl_before" in h else ""
            heal = f"{h['objective']} {h['steps']} steps x {h['batch_size']}x{h['seq_len']}, lr {h['lr']:g}, {h['seconds'] / 60:.1f} min{kl}"
    wt = _results(eval_dir / f"{name}_wt", TASKS["wt"])
    ppl = f"{wt[0]['word_perplexity,none']:.2f}" if wt else "-"
    return f"| {name} | {cut} | {_acc(_results(eval_dir / f'{name}_arc', TASKS['arc']))} | {_acc(_results(eval_dir / f'{name}_hs', TASKS['hs']))} | {ppl} | {heal} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval_dir", required=True, type=Path)
    ap.add_argument("--row", action="append", required=True, help="NAME=CKPT (CKPT empty for the dense model)")
    args = ap.parse_args()
    print("| model | params cut | arc_easy acc / acc_norm | hellaswag_approx acc / acc_norm | wikitext word ppl | healing |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in args.row:
        name, _, ckpt = spec.partition("=")
        print(row(name, ckpt, args.eval_dir))


if __name__ == "__main__":
    main()
