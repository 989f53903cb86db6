"""The accuracy gate, on results JSON built in the exact lm-eval 0.4.13 layout."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lm_eval_lowrank import gate as g
from lm_eval_lowrank.cli import main
from lm_eval_lowrank.cli.gate import gate

MODEL = "HuggingFaceTB/SmolLM2-135M"
MODEL_DIR = "HuggingFaceTB__SmolLM2-135M"  # lm_eval.utils.sanitize_model_name(MODEL)

# Direction per metric as lm-eval's Task.higher_is_better() reports it.
HIB = {
    "acc": True,
    "acc_norm": True,
    "exact_match": True,
    "word_perplexity": False,
    "byte_perplexity": False,
    "bits_per_byte": False,
}

MMLU_SUBTASKS = ("mmlu_local_stem", "mmlu_local_humanities")


def _task_entry(name: str, metrics: dict[str, float], n: int = 100) -> dict[str, Any]:
    """A ``results`` entry as evaluator_utils._collect_results writes it."""
    entry: dict[str, Any] = {"name": name, "alias": name, "sample_len": n}
    for key, value in metrics.items():
        metric, flt = key.split(",")
        entry[key] = value
        # wikitext-style metrics have no bootstrap stderr: lm-eval writes "N/A".
        entry[f"{metric}_stderr,{flt}"] = "N/A" if "perplexity" in metric or metric == "bits_per_byte" else 0.01
    return entry


def lm_eval_results(
    *,
    arc: dict[str, float] | None = None,
    mmlu: tuple[float, float] | None = (0.30, 0.26),
    gsm8k: tuple[float, float] | None = None,
    wikitext: float | None = None,
    mmlu_aggregates: bool = True,
    n_shot: int = 0,
    model_args: str = f"pretrained={MODEL}",
) -> dict[str, Any]:
    """A full results JSON as lm-eval 0.4.13 saves it (EvaluationTracker.save_results_aggregated)."""
    results: dict[str, Any] = {}
    hib: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    if arc is not None:
        results["arc_easy_local"] = _task_entry("arc_easy_local", arc, 200)
        hib["arc_easy_local"] = {"acc": True, "acc_norm": True}
    if gsm8k is not None:
        strict, flexible = gsm8k
        results["gsm8k_local"] = _task_entry(
            "gsm8k_local", {"exact_match,strict-match": strict, "exact_match,flexible-extract": flexible}, 50
        )
        hib["gsm8k_local"] = {"exact_match": True}
    if wikitext is not None:
        results["wikitext_local"] = _task_entry(
            "wikitext_local",
            {"word_perplexity,none": wikitext, "byte_perplexity,none": 1.7, "bits_per_byte,none": 0.77},
            20,
        )
        hib["wikitext_local"] = {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}
    group_subtasks: dict[str, list[str]] = {}
    groups: dict[str, Any] = {}
    if mmlu is not None:
        for name, value in zip(MMLU_SUBTASKS, mmlu):
            results[name] = _task_entry(name, {"acc,none": value}, 100)
            hib[name] = {"acc": True}
        # Groups come after their subtasks in "results" (aggregate_groups runs last).
        group = {"alias": "mmlu_local", "name": "mmlu_local"}
        if mmlu_aggregates:
            group.update(
                {
                    "sample_len": 200,
                    "acc,none": sum(mmlu) / len(mmlu),
                    "acc_stderr,none": 0.007,
                    "sample_count": {"acc,none": 200},
                }
            )
            groups["mmlu_local"] = dict(group)
        results["mmlu_local"] = group
        group_subtasks["mmlu_local"] = list(MMLU_SUBTASKS)
        hib["mmlu_local"] = {"acc": True}
    for name, entry in results.items():
        if name in group_subtasks:
            continue
        n_samples[name] = {"original": entry["sample_len"], "effective": entry["sample_len"]}
    out: dict[str, Any] = {"results": results}
    if groups:
        out["groups"] = groups
    out.update(
        {
            "group_subtasks": group_subtasks,
            "configs": {name: {"task": name, "num_fewshot": n_shot} for name in sorted(n_samples)},
            "versions": {name: 1.0 for name in sorted(results)},
            "n-shot": {name: n_shot for name in sorted(results)},
            "higher_is_better": dict(sorted(hib.items())),
            "n-samples": n_samples,
            "config": {
                "model": "hf-tucker",
                "model_args": model_args,
                "model_num_parameters": 134515008,
                "model_dtype": "torch.float32",
                "batch_size": "1",
                "batch_sizes": [],
                "device": "cpu",
                "use_cache": None,
                "limit": None,
                "bootstrap_iters": 100000,
                "gen_kwargs": {},
                "random_seed": 0,
                "numpy_seed": 1234,
                "torch_seed": 1234,
                "fewshot_seed": 1234,
            },
            "git_hash": None,
            "date": 1767225600.0,
            "pretty_env_info": "PyTorch version: 2.5.1+cpu",
            "transformers_version": "4.57.1",
            "lm_eval_version": "0.4.13",
            "upper_git_hash": None,
            "tokenizer_pad_token": ["<|endoftext|>", "0"],
            "tokenizer_eos_token": ["<|endoftext|>", "0"],
            "tokenizer_bos_token": ["<|endoftext|>", "0"],
            "eot_token_id": 0,
            "max_length": 2048,
            "task_hashes": {},
            "model_source": "hf-tucker",
            "model_name": MODEL,
            "model_name_sanitized": MODEL_DIR,
            "system_instruction": None,
            "system_instruction_sha": None,
            "fewshot_as_multiturn": False,
            "chat_template": None,
            "chat_template_sha": None,
            "total_evaluation_time_seconds": "86.5",
        }
    )
    return out


def write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same call as EvaluationTracker: indent=2, ensure_ascii=False.
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_run(output_path: Path, data: dict[str, Any], date_id: str) -> Path:
    """Where ``lm_eval --output_path OUTPUT_PATH`` puts a run: OUTPUT_PATH/<model>/results_<date_id>.json."""
    return write(output_path / MODEL_DIR / f"results_{date_id}.json", data)


ARC_BASE = {"acc,none": 0.62, "acc_norm,none": 0.55}


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(gate, list(args))


def pair(tmp_path: Path, base: dict[str, Any], comp: dict[str, Any]) -> tuple[str, str]:
    return str(write(tmp_path / "base.json", base)), str(write(tmp_path / "comp.json", comp))


# --------------------------------------------------------------------------- pass / fail


def test_pass_within_tolerance_prints_table(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc={"acc,none": 0.61, "acc_norm,none": 0.54}))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03")
    assert r.exit_code == 0, r.output
    header = next(line for line in r.output.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "metric", "baseline", "compressed", "drop", "verdict"]
    row = next(line for line in r.output.splitlines() if line.startswith("arc_easy_local"))
    assert row.split() == ["arc_easy_local", "acc_norm,none", "0.5500", "0.5400", "+0.0100", "PASS"]
    assert "gate: PASS" in r.output


def test_fail_beyond_tolerance(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc={"acc,none": 0.62, "acc_norm,none": 0.50}))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03")
    assert r.exit_code == 1
    assert "FAIL" in next(line for line in r.output.splitlines() if line.startswith("arc_easy_local"))
    assert "gate: FAIL" in r.output


def test_a_malformed_value_or_an_empty_task_list_is_an_input_error(tmp_path: Path) -> None:
    """A metric value that is no number read MISSING (exit 1, as a regression would); --tasks '' gated every task."""
    for value in ("abc", None):
        b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc={"acc,none": 0.61, "acc_norm,none": value}))
        r = run_cli(c, "--baseline", b, "--max-drop", "0.03")
        assert r.exit_code == 2 and r.output.strip().splitlines() == [f"Error: {c}: arc_easy_local's acc_norm,none is {value!r}, not a number; the file is malformed"], r.output
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE))
    for empty in ("", " , "):
        r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--tasks", empty)
        assert r.exit_code == 2 and r.output.strip().splitlines() == [f"Error: --tasks {empty!r} names no task; give names separated by ',' (or leave --tasks out for all)"], r.output
    assert run_cli(c, "--baseline", b, "--max-drop", "0.03", "--tasks", "arc_easy_local,").exit_code == 0  # a trailing comma names one


def test_drop_exactly_at_tolerance_passes_despite_float_rounding(tmp_path: Path) -> None:
    assert 0.80 - 0.77 > 0.03  # the trap this guards against
    base, comp = lm_eval_results(arc={"acc,none": 0.80}, mmlu=None), lm_eval_results(arc={"acc,none": 0.77}, mmlu=None)
    b, c = pair(tmp_path, base, comp)
    assert run_cli(c, "--baseline", b, "--max-drop", "0.03").exit_code == 0
    assert run_cli(c, "--baseline", b, "--max-drop", "0.0299").exit_code == 1


def test_improvement_passes_and_shows_negative_drop(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc={"acc,none": 0.7, "acc_norm,none": 0.6}))
    r = run_cli(c, "--baseline", b, "--max-drop", "0")
    assert r.exit_code == 0
    assert "-0.0500" in r.output


# --------------------------------------------------------------------------- primary metric


def test_default_metric_preference() -> None:
    assert g.choose_metric(_task_entry("t", {"acc,none": 0.5, "acc_norm,none": 0.4})) == "acc_norm,none"
    assert g.choose_metric(_task_entry("t", {"acc,none": 0.5})) == "acc,none"
    gsm = _task_entry("t", {"exact_match,flexible-extract": 0.2, "exact_match,strict-match": 0.1})
    assert g.choose_metric(gsm) == "exact_match,strict-match"
    wiki = _task_entry("t", {"bits_per_byte,none": 0.7, "word_perplexity,none": 30.0})
    assert g.choose_metric(wiki) == "word_perplexity,none"
    # Unknown metrics: the task's first one (metric_list order), never a stderr.
    assert g.choose_metric(_task_entry("t", {"brier_score,none": 0.3, "zzz,none": 1.0})) == "brier_score,none"
    assert g.choose_metric({"alias": "x", "name": "x"}) is None
    # Explicit requests: bare metric picks a filter; metric,filter must match exactly.
    assert g.choose_metric(gsm, "exact_match,flexible-extract") == "exact_match,flexible-extract"
    assert g.choose_metric(gsm, "acc") is None


def test_metric_option_global_and_per_task(tmp_path: Path) -> None:
    base = lm_eval_results(arc=ARC_BASE, gsm8k=(0.10, 0.20))
    comp = lm_eval_results(arc={"acc,none": 0.50, "acc_norm,none": 0.55}, gsm8k=(0.10, 0.05))
    b, c = pair(tmp_path, base, comp)
    # Default: acc_norm (unchanged) and strict-match (unchanged) -> pass.
    assert run_cli(c, "--baseline", b, "--max-drop", "0.03").exit_code == 0
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--metric", "acc")
    assert r.exit_code == 1
    rows = {line.split()[0]: line.split() for line in r.output.splitlines() if line.startswith(("arc", "gsm", "mmlu"))}
    assert rows["arc_easy_local"][1:2] == ["acc,none"] and rows["arc_easy_local"][-1] == "FAIL"
    assert rows["gsm8k_local"][1] == "exact_match,strict-match"  # global --metric applies only where reported
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--metric", "gsm8k_local=exact_match,flexible-extract")
    assert r.exit_code == 1
    assert "exact_match,flexible-extract" in r.output


def test_metric_typo_is_usage_error(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--metric", "acc-norm")
    assert r.exit_code == 2
    assert "acc-norm" in r.output


def test_a_metric_or_task_the_baseline_lacks_is_a_usage_error_not_a_regression(tmp_path: Path) -> None:
    """A mistyped per-task metric or task name ended as MISSING with exit 1, which CI cannot tell from a task that
    really went missing from the compressed run; they are usage errors (exit 2), named in one line."""
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--metric", "arc_easy_local=exact_match")
    assert r.exit_code == 2 and "--metric arc_easy_local=exact_match: the baseline's arc_easy_local reports no 'exact_match'; it has acc, acc_norm" in r.output
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--tasks", "arc_easy_lcoal")
    assert r.exit_code == 2 and "--tasks: 'arc_easy_lcoal' in neither results file; the baseline has arc_easy_local" in r.output
    assert r.output.strip().count("\n") == 0


# --------------------------------------------------------------------------- missing tasks


def test_named_task_missing_from_compressed(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=None))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--tasks", "arc_easy_local")
    assert r.exit_code == 1
    row = next(line for line in r.output.splitlines() if line.startswith("arc_easy_local"))
    assert row.split()[-1] == "MISSING" and "0.5500" in row
    assert "not in the compressed results" in r.output


def test_named_task_missing_from_baseline_or_both(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=None), lm_eval_results(arc=ARC_BASE))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--tasks", "arc_easy_local")
    assert r.exit_code == 1
    assert "arc_easy_local: not in the baseline" in r.output
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--tasks", "arc_easy_local,hellaswag")
    assert r.exit_code == 2 and "'hellaswag' in neither results file" in r.output  # a typo, not a regression


def test_unnamed_baseline_task_missing_from_compressed_fails(tmp_path: Path) -> None:
    # A compressed run over fewer tasks must not pass by omission.
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE, mmlu=None))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03")
    assert r.exit_code == 1
    assert "mmlu_local: not in the compressed results" in r.output


# --------------------------------------------------------------------------- groups


def _rows(output: str) -> dict[str, list[str]]:
    names = ("arc_easy_local", "mmlu_local", "gsm8k_local", "wikitext_local")
    return {line.split()[0]: line.split() for line in output.splitlines() if line.startswith(names)}


def test_default_selection_gates_group_not_its_subtasks(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE, mmlu=(0.29, 0.25)))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03")
    assert r.exit_code == 0, r.output
    rows = _rows(r.output)
    assert set(rows) == {"arc_easy_local", "mmlu_local"}
    assert rows["mmlu_local"][1:4] == ["acc,none", "0.2800", "0.2700"]


def test_subtasks_flag_and_named_subtask(tmp_path: Path) -> None:
    # Group mean barely moves, one subtask collapses: only visible when subtasks are gated.
    b, c = pair(tmp_path, lm_eval_results(arc=None), lm_eval_results(arc=None, mmlu=(0.40, 0.16)))
    assert run_cli(c, "--baseline", b, "--max-drop", "0.03").exit_code == 0
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--subtasks")
    assert r.exit_code == 1
    rows = _rows(r.output)
    assert list(rows) == ["mmlu_local", "mmlu_local_stem", "mmlu_local_humanities"]
    assert rows["mmlu_local_humanities"][-1] == "FAIL" and rows["mmlu_local_stem"][-1] == "PASS"
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--tasks", "mmlu_local_humanities")
    assert r.exit_code == 1 and list(_rows(r.output)) == ["mmlu_local_humanities"]


def test_group_without_aggregation_stands_for_its_subtasks(tmp_path: Path) -> None:
    base = lm_eval_results(arc=None, mmlu_aggregates=False)
    assert "groups" not in base and base["results"]["mmlu_local"] == {"alias": "mmlu_local", "name": "mmlu_local"}
    b, c = pair(tmp_path, base, lm_eval_results(arc=None, mmlu_aggregates=False))
    for extra in ([], ["--tasks", "mmlu_local"]):
        r = run_cli(c, "--baseline", b, "--max-drop", "0.03", *extra)
        assert r.exit_code == 0, r.output
        assert list(_rows(r.output)) == list(MMLU_SUBTASKS)


def test_a_tolerance_for_a_group_without_aggregation_applies_to_its_subtasks(tmp_path: Path) -> None:
    """--max-drop mmlu_local=N when mmlu_local aggregates nothing: it is gated as its subtasks, and N is theirs (it
    was refused as a task "not gated"). A subtask's own tolerance still wins."""
    b, c = pair(tmp_path, lm_eval_results(arc=None, mmlu_aggregates=False), lm_eval_results(arc=None, mmlu=(0.28, 0.21), mmlu_aggregates=False))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.01", "--max-drop", "mmlu_local=0.06", "--json")
    assert r.exit_code == 0, r.output
    assert {t["task"]: t["max_drop"] for t in json.loads(r.stdout)["tasks"]} == {"mmlu_local_stem": 0.06, "mmlu_local_humanities": 0.06}
    r = run_cli(c, "--baseline", b, "--max-drop", "mmlu_local=0.06", "--max-drop", "mmlu_local_humanities=0.04", "--json")
    assert r.exit_code == 1, r.output
    rows = {t["task"]: (t["max_drop"], t["verdict"]) for t in json.loads(r.stdout)["tasks"]}
    assert rows == {"mmlu_local_stem": (0.06, "PASS"), "mmlu_local_humanities": (0.04, "FAIL")}
    r = run_cli(c, "--baseline", b, "--max-drop", "0.06", "--metric", "mmlu_local=acc", "--json")
    assert r.exit_code == 0 and [t["metric"] for t in json.loads(r.stdout)["tasks"]] == ["acc,none", "acc,none"]


def test_a_relative_drop_from_a_zero_baseline_says_why_it_fails(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc={"mcc,none": 0.0}, mmlu=None), lm_eval_results(arc={"mcc,none": -0.01}, mmlu=None))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.5", "--relative", "--json")
    task = json.loads(r.stdout)["tasks"][0]
    assert r.exit_code == 1 and task["verdict"] == "FAIL"
    assert "from a baseline of 0 is an infinite relative drop" in task["note"]


# --------------------------------------------------------------------------- direction, relative


def test_lower_is_better_drop_is_the_increase(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(wikitext=30.0, mmlu=None), lm_eval_results(wikitext=31.0, mmlu=None))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.5")
    assert r.exit_code == 1
    row = _rows(r.output)["wikitext_local"]
    assert row[1:3] == ["word_perplexity,none", "(lower"] and "+1.0000" in row and row[-1] == "FAIL"
    assert run_cli(c, "--baseline", b, "--max-drop", "1.0").exit_code == 0
    # Perplexity going down is an improvement, whatever the tolerance.
    assert run_cli(b, "--baseline", c, "--max-drop", "0").exit_code == 0


def test_direction_falls_back_to_builtin_table(tmp_path: Path) -> None:
    base, comp = lm_eval_results(wikitext=30.0, mmlu=None), lm_eval_results(wikitext=31.0, mmlu=None)
    for data in (base, comp):
        data["higher_is_better"] = {}
    b, c = pair(tmp_path, base, comp)
    assert run_cli(c, "--baseline", b, "--max-drop", "0.5").exit_code == 1


def test_relative_drop(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(wikitext=30.0, mmlu=None), lm_eval_results(wikitext=31.0, mmlu=None))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.05", "--relative")  # +3.33% < 5%
    assert r.exit_code == 0, r.output
    assert "+3.33%" in r.output
    assert run_cli(c, "--baseline", b, "--max-drop", "0.03", "--relative").exit_code == 1


def test_per_task_tolerance(tmp_path: Path) -> None:
    base = lm_eval_results(arc=ARC_BASE, wikitext=30.0, mmlu=None)
    comp = lm_eval_results(arc={"acc,none": 0.61, "acc_norm,none": 0.54}, wikitext=31.0, mmlu=None)
    b, c = pair(tmp_path, base, comp)
    assert run_cli(c, "--baseline", b, "--max-drop", "0.03").exit_code == 1
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--max-drop", "wikitext_local=2")
    assert r.exit_code == 0, r.output
    assert "max" in next(line for line in r.output.splitlines() if line.startswith("task")).split()
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--max-drop", "hellaswag=2")
    assert r.exit_code == 2 and "hellaswag" in r.output


def test_nan_score_fails(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(wikitext=30.0, mmlu=None), lm_eval_results(wikitext=math.nan, mmlu=None))
    assert "NaN" in Path(c).read_text()  # json.dumps writes NaN, as lm-eval would
    r = run_cli(c, "--baseline", b, "--max-drop", "1000")
    assert r.exit_code == 1
    assert "non-finite" in r.output


# --------------------------------------------------------------------------- lm-eval output folders


def test_output_folder_uses_newest_results_file(tmp_path: Path) -> None:
    dense, comp = tmp_path / "dense", tmp_path / "compressed"
    write_run(dense, lm_eval_results(arc=ARC_BASE), "2026-01-02T10-00-00.123456")
    write_run(comp, lm_eval_results(arc={"acc,none": 0.1, "acc_norm,none": 0.1}), "2026-01-02T09-59-59.999999")
    # Later run; isoformat() omits microseconds when they are 0, so this name is shorter.
    newest = write_run(comp, lm_eval_results(arc=ARC_BASE), "2026-01-02T11-00-00")
    (comp / MODEL_DIR / "samples_arc_easy_local_2026-01-02T12-00-00.jsonl").write_text("{}\n")
    for given in (comp, comp / MODEL_DIR):
        r = run_cli(str(given), "--baseline", str(dense), "--max-drop", "0.03")
        assert r.exit_code == 0, r.output
        assert f"compressed: {newest}" in r.output
        assert "newest of 2 results files" in r.output


def test_resolve_newest_by_timestamp_not_name_length(tmp_path: Path) -> None:
    folder = tmp_path / MODEL_DIR
    for stamp in ("2026-01-02T11-00-00", "2026-01-02T11-00-00.000001", "2025-12-31T23-59-59.999999"):
        write(folder / f"results_{stamp}.json", {"results": {}})
    path, note = g.resolve_results_path(tmp_path)
    assert path.name == "results_2026-01-02T11-00-00.000001.json"
    assert note and "newest of 3" in note


def test_output_path_given_as_json_file(tmp_path: Path) -> None:
    # lm_eval --output_path out/dense.json writes out/dense_<date_id>.json.
    write(tmp_path / "dense_2026-01-02T10-00-00.5.json", lm_eval_results(arc=ARC_BASE))
    comp = write(tmp_path / "comp.json", lm_eval_results(arc=ARC_BASE))
    r = run_cli(str(comp), "--baseline", str(tmp_path / "dense.json"), "--max-drop", "0.03")
    assert r.exit_code == 0, r.output
    assert "dense_2026-01-02T10-00-00.5.json" in r.output


def test_folder_with_several_models_is_ambiguous(tmp_path: Path) -> None:
    write_run(tmp_path, lm_eval_results(arc=ARC_BASE), "2026-01-02T10-00-00")
    write(tmp_path / "other__model" / "results_2026-01-02T10-00-00.json", lm_eval_results(arc=ARC_BASE))
    comp = write(tmp_path / "c.json", lm_eval_results(arc=ARC_BASE))
    r = run_cli(str(comp), "--baseline", str(tmp_path), "--max-drop", "0.03")
    assert r.exit_code == 2
    assert "several models" in r.output


def test_same_file_for_both_is_an_error(tmp_path: Path) -> None:
    # The classic CI slip: both runs into one --output_path, newest picked for both.
    write_run(tmp_path, lm_eval_results(arc=ARC_BASE), "2026-01-02T10-00-00")
    r = run_cli(str(tmp_path), "--baseline", str(tmp_path), "--max-drop", "0.03")
    assert r.exit_code == 2
    assert "same file" in r.output


def test_runs_that_are_not_comparable_fail_unless_allowed(tmp_path: Path) -> None:
    """Another num_fewshot or another number of documents is not a like-for-like comparison: a CI gate that passed
    it with a warning passed what it never compared."""
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE, n_shot=5))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03")
    assert r.exit_code == 1
    assert "warning: arc_easy_local: num_fewshot differs (baseline 0, compressed 5)" in r.output
    assert r.output.strip().splitlines()[-1] == "gate: FAIL (0 failed, 0 missing, of 2 gated, runs not comparable: see the warnings; --allow-incomparable gates them anyway)"
    allowed = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--allow-incomparable", "--json")
    assert allowed.exit_code == 0 and "warning: arc_easy_local: num_fewshot differs" in allowed.output
    verdict = json.loads(allowed.output[allowed.output.index("{") :])
    assert verdict["passed"] and verdict["comparable"] is False and verdict["allow_incomparable"] is True
    limited = lm_eval_results(arc=ARC_BASE)
    limited["n-samples"]["arc_easy_local"]["effective"] = 20  # --limit 20
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), limited)
    assert run_cli(c, "--baseline", b, "--max-drop", "0.03", "--tasks", "arc_easy_local").exit_code == 1


def test_a_task_given_two_tolerances_or_two_metrics_is_refused(tmp_path: Path) -> None:
    """The last value silently won: --max-drop arc=0.01 --max-drop arc=0.10 gated at 0.10."""
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc={"acc,none": 0.57, "acc_norm,none": 0.50}))
    r = run_cli(c, "--baseline", b, "--max-drop", "arc_easy_local=0.01", "--max-drop", "arc_easy_local=0.10", "--tasks", "arc_easy_local")
    assert r.exit_code == 2
    assert r.output.strip() == "Error: --max-drop arc_easy_local= given twice (0.01, 0.1); give each task one tolerance"
    r = run_cli(c, "--baseline", b, "--max-drop", "0.1", "--metric", "arc_easy_local=acc", "--metric", "arc_easy_local=acc_norm", "--tasks", "arc_easy_local")
    assert r.exit_code == 2 and r.output.strip() == "Error: --metric arc_easy_local= given twice ('acc', 'acc_norm'); give each task one metric"
    # the same value twice is one value
    same = run_cli(c, "--baseline", b, "--max-drop", "arc_easy_local=0.10", "--max-drop", "arc_easy_local=0.1", "--tasks", "arc_easy_local")
    assert same.exit_code == 0, same.output


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_stderr_under_confidence_is_no_stderr(bad: float, tmp_path: Path) -> None:
    """lm-eval writes NaN where a stderr could not be computed: under --confidence it went into the bounds and the
    gate died in documents_to_decide (math.ceil(nan)) with a traceback, exit 1, which CI reads as a failed gate."""
    base = lm_eval_results(arc={"acc,none": 0.62, "acc_norm,none": 0.60})
    base["results"]["arc_easy_local"]["acc_norm_stderr,none"] = bad
    b, c = pair(tmp_path, base, lm_eval_results(arc={"acc,none": 0.62, "acc_norm,none": 0.59}))
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03", "--confidence", "0.95", "--tasks", "arc_easy_local")
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 0, r.output
    assert "no standard error for acc_norm,none in the results (nor samples from both runs): gated on the drop alone" in r.output
    from lm_eval_lowrank.gate import documents_to_decide

    assert documents_to_decide(0.01, bad, 50, 0.03, 1.64) is None


def test_results_of_lm_eval_before_0_4_are_an_input_error(tmp_path: Path) -> None:
    """Metric keys without ',filter': every task read as MISSING, an accuracy FAIL (exit 1) for two equal files."""
    old = {"results": {"arc_easy": {"acc": 0.60, "acc_stderr": 0.01, "acc_norm": 0.55, "acc_norm_stderr": 0.01}}, "versions": {"arc_easy": 0}}
    b, c = pair(tmp_path, old, old)
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03")
    assert r.exit_code == 2
    assert r.output.strip() == f"Error: {Path(b).resolve()}: its metrics have no ',filter' suffix (lm-eval before 0.4): give results written by lm-eval 0.4 or later"


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"results": {"arc_easy_local": ', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2, 3]", "not an lm-eval results file"),
        ('{"config": {}, "versions": {}}', "not an lm-eval results file"),
        ('{"results": [1]}', "not an lm-eval results file"),
    ],
)
def test_bad_input_files(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    good = write(tmp_path / "good.json", lm_eval_results(arc=ARC_BASE))
    for args in ([str(bad), "--baseline", str(good)], [str(good), "--baseline", str(bad)]):
        r = run_cli(*args, "--max-drop", "0.03")
        assert r.exit_code == 2
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {bad}: ")
        assert message in r.output


def test_missing_file_and_empty_folder(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", lm_eval_results(arc=ARC_BASE))
    r = run_cli(str(good), "--baseline", str(tmp_path / "nope.json"), "--max-drop", "0.03")
    assert r.exit_code == 2
    assert r.output.strip() == f"Error: {tmp_path / 'nope.json'}: no such file or folder"
    (tmp_path / "empty").mkdir()
    r = run_cli(str(tmp_path / "empty"), "--baseline", str(good), "--max-drop", "0.03")
    assert r.exit_code == 2 and "no lm-eval results_<timestamp>.json" in r.output


@pytest.mark.parametrize("bad", ["abc", "-0.1", "nan", "x="])
def test_bad_max_drop(tmp_path: Path, bad: str) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE))
    r = run_cli(c, "--baseline", b, "--max-drop", bad)
    assert r.exit_code == 2 and "--max-drop" in r.output


def test_missing_required_option_is_usage_error(tmp_path: Path) -> None:
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE))
    assert run_cli(c, "--baseline", b).exit_code == 2
    assert run_cli(c, "--max-drop", "0.03").exit_code == 2


# --------------------------------------------------------------------------- --json


def test_json_output(tmp_path: Path) -> None:
    comp = lm_eval_results(arc={"acc,none": 0.62, "acc_norm,none": 0.50}, mmlu=None)
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), comp)
    r = CliRunner().invoke(gate, [c, "--baseline", b, "--max-drop", "0.03", "--json"])
    assert r.exit_code == 1
    verdict = json.loads(r.stdout)  # stdout holds only the JSON; the table went to stderr
    assert "gate: FAIL" in r.stderr
    assert verdict["passed"] is False and verdict["exit_code"] == 1
    assert verdict["baseline"]["model"] == MODEL
    by_task = {t["task"]: t for t in verdict["tasks"]}
    assert by_task["arc_easy_local"]["verdict"] == "FAIL"
    assert by_task["arc_easy_local"]["metric"] == "acc_norm,none"
    assert by_task["arc_easy_local"]["drop"] == pytest.approx(0.05)
    assert by_task["mmlu_local"]["verdict"] == "MISSING" and by_task["mmlu_local"]["compressed"] is None


# --------------------------------------------------------------------------- main() and console script


def _main(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["lm-eval-lowrank", "gate", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    code = exc.value.code
    return 0 if code is None else int(code)


def test_exit_codes_via_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    base = write(tmp_path / "b.json", lm_eval_results(arc=ARC_BASE))
    ok = write(tmp_path / "ok.json", lm_eval_results(arc=ARC_BASE))
    bad = write(tmp_path / "bad.json", lm_eval_results(arc={"acc,none": 0.1, "acc_norm,none": 0.1}))
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"name": "not results"}')
    assert _main(monkeypatch, str(ok), "--baseline", str(base), "--max-drop", "0.03") == 0
    assert _main(monkeypatch, str(bad), "--baseline", str(base), "--max-drop", "0.03") == 1
    capsys.readouterr()
    assert _main(monkeypatch, str(foreign), "--baseline", str(base), "--max-drop", "0.03") == 2
    err = capsys.readouterr().err
    assert err.strip() == f"Error: {foreign}: not an lm-eval results file (no 'results' mapping)"
    assert _main(monkeypatch, str(ok), "--max-drop", "0.03") == 2


def test_console_script_subprocess(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("lm-eval-lowrank")
    if not script.exists():
        pytest.skip("lm-eval-lowrank console script not installed next to this interpreter")
    base = write_run(tmp_path / "dense", lm_eval_results(arc=ARC_BASE), "2026-01-02T10-00-00.000001")
    worse = lm_eval_results(arc={"acc,none": 0.5, "acc_norm,none": 0.45})
    comp = write_run(tmp_path / "compressed", worse, "2026-01-02T11-00-00")
    proc = subprocess.run(
        [str(script), "gate", str(tmp_path / "compressed"), "--baseline", str(tmp_path / "dense")]
        + ["--max-drop", "0.03", "--tasks", "arc_easy_local"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"baseline:   {base}" in proc.stdout and f"compressed: {comp}" in proc.stdout
    assert "arc_easy_local" in proc.stdout and "FAIL" in proc.stdout


def test_gate_does_not_import_torch() -> None:
    code = "import sys, lm_eval_lowrank.cli.gate; sys.exit('torch' in sys.modules or 'lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# --------------------------------------------------------------------------- confidence


def _arc_run(out: Path, date_id: str, correct: list[int], stderr: float | str = 0.01, samples: bool = True) -> Path:
    """A run whose arc_easy_local acc_norm is the mean of ``correct`` (one 0/1 per document), with the samples
    file ``lm_eval --log_samples`` writes beside the results (doc_id, doc_hash, filter, one key per metric)."""
    value = sum(correct) / len(correct)
    data = lm_eval_results(arc={"acc,none": value, "acc_norm,none": value}, mmlu=None)
    data["results"]["arc_easy_local"]["acc_norm_stderr,none"] = stderr
    path = write_run(out, data, date_id)
    if samples:
        lines = [
            {"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "metrics": ["acc", "acc_norm"], "acc": float(v), "acc_norm": float(v)}
            for i, v in enumerate(correct)
        ]
        (path.parent / f"samples_arc_easy_local_{date_id}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _arc_row(output: str) -> list[str]:
    return next(line for line in output.splitlines() if line.startswith("arc_easy_local")).split()


def test_confidence_bounds_from_lm_eval_stderr(tmp_path: Path) -> None:
    """stderr 0.01 in each run: the drop's is 0.01414, and the one-sided 95 % bounds are drop -/+ 0.02326."""
    base = _arc_run(tmp_path / "base", "2026-01-01T00-00-00.0", [1] * 50 + [0] * 50, samples=False)
    for n_correct, verdict, code in ((50, "PASS", 0), (46, "UNSURE", 1), (42, "FAIL", 1)):
        comp = _arc_run(tmp_path / f"c{n_correct}", "2026-01-02T00-00-00.0", [1] * n_correct + [0] * (100 - n_correct), samples=False)
        r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.03", "--confidence", "0.95", "--json")
        assert r.exit_code == code, r.output
        task = json.loads(r.stdout)["tasks"][0]
        drop = 0.5 - n_correct / 100
        assert task["verdict"] == verdict and task["stderr_kind"] == "unpaired"
        assert task["stderr"] == pytest.approx(math.sqrt(2) * 0.01)
        assert task["bounds"] == pytest.approx([drop - 0.0232617, drop + 0.0232617], abs=1e-6)
    # the same UNSURE drop passes with --unsure pass, and fails on its point estimate without --confidence
    assert run_cli(str(tmp_path / "c46"), "--baseline", str(base), "--max-drop", "0.03", "--confidence", "0.95", "--unsure", "pass").exit_code == 0
    assert run_cli(str(tmp_path / "c46"), "--baseline", str(base), "--max-drop", "0.03").exit_code == 1


def test_paired_documents_give_a_tighter_bound_than_independent_scores(tmp_path: Path) -> None:
    """200 documents; the compressed run loses 4 the dense one had right and nothing else changes: a drop of 0.02.
    Independent stderrs (0.035 each) cannot tell that from 0.10; paired over documents it is within 0.04."""
    dense = [1] * 100 + [0] * 100
    compressed = [0] * 4 + [1] * 96 + [0] * 100
    base = _arc_run(tmp_path / "base", "2026-01-01T00-00-00.0", dense, stderr=0.0354)
    comp = _arc_run(tmp_path / "comp", "2026-01-02T00-00-00.0", compressed, stderr=0.0353)
    r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.04", "--confidence", "0.95", "--json")
    assert r.exit_code == 0, r.output
    task = json.loads(r.stdout)["tasks"][0]
    d = [1.0] * 4 + [0.0] * 196
    mean = sum(d) / 200
    paired = math.sqrt(sum((x - mean) ** 2 for x in d) / 199 / 200)
    assert (task["verdict"], task["stderr_kind"], task["paired_documents"]) == ("PASS", "paired", 200)
    assert task["stderr"] == pytest.approx(paired) and task["drop"] == pytest.approx(0.02)
    assert "200 paired docs" in r.stderr
    # without the samples files the same scores are UNSURE
    for run in (base, comp):
        next(run.parent.glob("samples_*.jsonl")).unlink()
    r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.04", "--confidence", "0.95")
    assert r.exit_code == 1 and _arc_row(r.output)[-2:] == ["stderr", "UNSURE"]


def test_samples_that_do_not_pair_fall_back_with_a_note(tmp_path: Path) -> None:
    base = _arc_run(tmp_path / "base", "2026-01-01T00-00-00.0", [1] * 50 + [0] * 50)
    other_docs = _arc_run(tmp_path / "other", "2026-01-02T00-00-00.0", [1] * 50 + [0] * 50)
    samples = next(other_docs.parent.glob("samples_*.jsonl"))
    samples.write_text(samples.read_text().replace('"doc_hash": "h0"', '"doc_hash": "changed"'))
    r = run_cli(str(other_docs), "--baseline", str(base), "--max-drop", "0.03", "--confidence", "0.95", "--json")
    assert json.loads(r.stdout)["tasks"][0]["stderr_kind"] == "unpaired"
    assert "the samples files cover different documents" in r.stderr
    # a reported score that is not the mean of the samples (a corpus-level metric) is not paired either
    data = json.loads(other_docs.read_text())
    data["results"]["arc_easy_local"]["acc_norm,none"] = 0.47
    other_docs.write_text(json.dumps(data))
    samples.write_text(samples.read_text().replace('"changed"', '"h0"'))
    r = run_cli(str(other_docs), "--baseline", str(base), "--max-drop", "0.03", "--confidence", "0.95", "--json")
    assert json.loads(r.stdout)["tasks"][0]["stderr_kind"] == "unpaired" and "is not a mean over documents" in r.stderr


def test_true_false_per_document_scores_pair_and_unreadable_samples_say_so(tmp_path: Path) -> None:
    """A custom metric may log True/False per document: that is 0/1 and pairs. Samples files that hold no number per
    document fall back to the unpaired stderr with a note, not silently."""
    dense = [1] * 100 + [0] * 100
    compressed = [0] * 4 + [1] * 96 + [0] * 100
    base = _arc_run(tmp_path / "base", "2026-01-01T00-00-00.0", dense, stderr=0.0354)
    comp = _arc_run(tmp_path / "comp", "2026-01-02T00-00-00.0", compressed, stderr=0.0353)
    for run in (base, comp):
        samples = next(run.parent.glob("samples_*.jsonl"))
        samples.write_text(samples.read_text().replace('"acc_norm": 1.0', '"acc_norm": true').replace('"acc_norm": 0.0', '"acc_norm": false'))
    r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.04", "--confidence", "0.95", "--json")
    task = json.loads(r.stdout)["tasks"][0]
    assert (task["verdict"], task["stderr_kind"], task["paired_documents"]) == ("PASS", "paired", 200), r.output
    for run in (base, comp):
        samples = next(run.parent.glob("samples_*.jsonl"))
        samples.write_text(samples.read_text().replace('"acc_norm": true', '"acc_norm": "yes"'))
    r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.04", "--confidence", "0.95", "--json")
    assert json.loads(r.stdout)["tasks"][0]["stderr_kind"] == "unpaired"
    assert "the samples files do not give one number per document for acc_norm,none" in r.stderr


def test_confidence_without_any_stderr_gates_the_point_estimate_and_says_so(tmp_path: Path) -> None:
    base = _arc_run(tmp_path / "base", "2026-01-01T00-00-00.0", [1] * 50 + [0] * 50, stderr="N/A", samples=False)
    comp = _arc_run(tmp_path / "comp", "2026-01-02T00-00-00.0", [1] * 49 + [0] * 51, stderr="N/A", samples=False)
    r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.03", "--confidence", "0.95")
    assert r.exit_code == 0 and _arc_row(r.output)[-1] == "PASS"
    assert "no standard error for acc_norm,none in the results (nor samples from both runs): gated on the drop alone" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--confidence", "1.5"], "--confidence 1.5 is invalid: give a level in [0.5, 1), e.g. 0.95"),
        (["--unsure", "pass"], "--unsure pass needs --confidence: without it no verdict is UNSURE"),
    ],
)
def test_bad_confidence_options_are_one_line_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    base = _arc_run(tmp_path / "base", "2026-01-01T00-00-00.0", [1, 0])
    comp = _arc_run(tmp_path / "comp", "2026-01-02T00-00-00.0", [1, 0])
    r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.03", *args)
    assert r.exit_code == 2 and message in r.output


def _mmlu_run(out: Path, date_id: str, stem: list[int], humanities: list[int], weighted: bool = True) -> Path:
    """An mmlu_local group over two subtasks of 30 and 70 documents, each with its samples file; the group's
    score is the mean over all documents (lm-eval's weight_by_size) or, with ``weighted=False``, of the two."""
    means = [sum(stem) / len(stem), sum(humanities) / len(humanities)]
    data = lm_eval_results(mmlu=tuple(means))
    data["results"]["mmlu_local"]["acc,none"] = (sum(stem) + sum(humanities)) / 100 if weighted else sum(means) / 2
    path = write_run(out, data, date_id)
    for task, correct in zip(MMLU_SUBTASKS, (stem, humanities)):
        lines = [{"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "acc": float(v)} for i, v in enumerate(correct)]
        (path.parent / f"samples_{task}_{date_id}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_a_group_is_paired_over_every_document_of_its_subtasks(tmp_path: Path) -> None:
    base = _mmlu_run(tmp_path / "base", "2026-01-01T00-00-00.0", [1] * 15 + [0] * 15, [1] * 35 + [0] * 35)
    comp = _mmlu_run(tmp_path / "comp", "2026-01-02T00-00-00.0", [0] + [1] * 14 + [0] * 15, [0] + [1] * 34 + [0] * 35)
    r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.05", "--confidence", "0.95", "--tasks", "mmlu_local", "--json")
    task = json.loads(r.stdout)["tasks"][0]
    d = [1.0, 1.0] + [0.0] * 98  # one lost in each subtask; ids and hashes repeat across subtasks: keyed by task too
    mean = sum(d) / 100
    assert (task["stderr_kind"], task["paired_documents"]) == ("paired", 100)
    assert task["stderr"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 99 / 100))
    assert r.exit_code == 0 and task["verdict"] == "PASS"
    # a group that averages its subtasks unweighted is not the mean over its documents: not paired
    for name, stem, hum in (("base2", [1] * 15 + [0] * 15, [1] * 35 + [0] * 35), ("comp2", [0] + [1] * 14 + [0] * 15, [1] * 35 + [0] * 35)):
        _mmlu_run(tmp_path / name, "2026-01-03T00-00-00.0", stem, hum, weighted=False)
    r = run_cli(str(tmp_path / "comp2"), "--baseline", str(tmp_path / "base2"), "--max-drop", "0.05", "--confidence", "0.95", "--tasks", "mmlu_local", "--json")
    assert json.loads(r.stdout)["tasks"][0]["stderr_kind"] == "unpaired" and "acc,none is not a mean over documents" in r.stderr


def test_family_wise_spreads_the_level_over_every_gated_task(tmp_path: Path) -> None:
    """Three bounds (the group and its two subtasks): each at 1 - 0.05 / 3, so all hold together at 0.95. A
    subtask whose lower bound cleared the tolerance alone no longer does."""
    b, c = pair(tmp_path, lm_eval_results(mmlu=(0.30, 0.26)), lm_eval_results(mmlu=(0.26, 0.22)))
    args = [c, "--baseline", b, "--max-drop", "0.01", "--confidence", "0.95", "--subtasks", "--json"]
    alone, family = run_cli(*args), run_cli(*args, "--family-wise")
    verdicts = {name: {t["task"]: t["verdict"] for t in json.loads(r.stdout)["tasks"]} for name, r in (("alone", alone), ("family", family))}
    assert verdicts["alone"] == {"mmlu_local": "FAIL", "mmlu_local_stem": "FAIL", "mmlu_local_humanities": "FAIL"}
    assert verdicts["family"] == {"mmlu_local": "FAIL", "mmlu_local_stem": "UNSURE", "mmlu_local_humanities": "UNSURE"}
    doc = json.loads(family.stdout)
    assert (doc["confidence"], doc["row_confidence"]) == (0.95, pytest.approx(1 - 0.05 / 3))
    z = 2.12805  # NormalDist().inv_cdf(1 - 0.05 / 3)
    stem = next(t for t in doc["tasks"] if t["task"] == "mmlu_local_stem")
    assert stem["bounds"] == pytest.approx([0.04 - z * math.sqrt(2) * 0.01, 0.04 + z * math.sqrt(2) * 0.01], abs=1e-5)
    assert "family-wise: 0.9833 per bound" in family.stderr
    bad = run_cli(c, "--baseline", b, "--max-drop", "0.01", "--family-wise")
    assert bad.exit_code == 2 and "--family-wise needs --confidence" in bad.output


def test_unsure_says_how_many_documents_would_decide(tmp_path: Path) -> None:
    """40 paired documents, 3 answers lost: a drop of 0.075 with bounds +0.006 .. +0.144 straddles 0.05. The bound
    shrinks as 1/sqrt(n), so about 40 * (z * se / (0.075 - 0.05))^2 documents would make it FAIL."""
    base = _arc_run(tmp_path / "base", "2026-01-01T00-00-00.0", [1] * 20 + [0] * 20)
    comp = _arc_run(tmp_path / "comp", "2026-01-02T00-00-00.0", [0] * 3 + [1] * 17 + [0] * 20)
    for run in (base, comp):
        data = json.loads(run.read_text())
        data["n-samples"]["arc_easy_local"] = {"original": 2376, "effective": 40}
        run.write_text(json.dumps(data))
    r = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.05", "--confidence", "0.95", "--json")
    task = json.loads(r.stdout)["tasks"][0]
    d = [1.0] * 3 + [0.0] * 37
    se = math.sqrt(sum((x - 0.075) ** 2 for x in d) / 39 / 40)
    expected = math.ceil(40 * (1.6448536 * se / 0.025) ** 2)
    assert task["verdict"] == "UNSURE" and task["stderr"] == pytest.approx(se)
    assert (task["documents_to_decide"], task["task_documents"]) == (expected, 2376) and 300 < expected < 320
    text = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.05", "--confidence", "0.95").output
    assert f"note: arc_easy_local: UNSURE at 40 documents: about {expected} would make it FAIL, if the drop and its spread per document hold (the task has 2376)" in text
    # a tolerance as far above the drop: as many documents would make it PASS; beyond the task's size, it says so
    text = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.1", "--confidence", "0.95").output
    assert f"UNSURE at 40 documents: about {expected} would make it PASS" in text and "(the task has 2376)" in text
    text = run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.08", "--confidence", "0.95").output
    assert "would make it PASS, if the drop and its spread per document hold (more than the 2376 the task has)" in text
    # decided rows carry no such advice
    task = json.loads(run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.2", "--confidence", "0.95", "--json").stdout)["tasks"][0]
    assert task["verdict"] == "PASS" and task["documents_to_decide"] is None


def test_sample_counts_sum_a_groups_subtasks(tmp_path: Path) -> None:
    data = lm_eval_results(arc=ARC_BASE)
    data["n-samples"][MMLU_SUBTASKS[0]] = {"original": 300, "effective": 20}
    res = g.load_results(write(tmp_path / "r.json", data))
    assert g.sample_counts(res, "arc_easy_local") == (200, 200)
    assert g.sample_counts(res, "mmlu_local") == (20 + 100, 300 + 100)
    assert g.sample_counts(res, "nope") is None
    assert g.documents_to_decide(0.05, 0.01, 100, 0.05, 1.645) is None  # on the tolerance: nothing decides it
    assert g.documents_to_decide(0.04, 0.01, 100, 0.05, 2.0) == 400  # the bound must move by 0.01 = 2 * se * sqrt(100 / n)


def test_no_answer_changed_is_not_certainty(tmp_path: Path) -> None:
    """20 documents, the same answers in both runs: the sample spread is zero, which would call a 0.00 drop certain
    and PASS a 3-point gate. Agresti and Min's half-document cells leave a standard error of 1/22, so 20 documents
    read UNSURE, as they should (rule of three: no change in 20 still allows about 15 %)."""
    answers = [1] * 12 + [0] * 8
    base = _arc_run(tmp_path / "base", "2026-01-01T00-00-00.0", answers)
    comp = _arc_run(tmp_path / "comp", "2026-01-02T00-00-00.0", answers)
    task = json.loads(run_cli(str(comp), "--baseline", str(base), "--max-drop", "0.03", "--confidence", "0.95", "--json").stdout)["tasks"][0]
    assert task["stderr_kind"] == "paired" and task["stderr"] == pytest.approx(1 / 22)
    assert task["verdict"] == "UNSURE" and task["bounds"] == pytest.approx([-1.6448536 / 22, 1.6448536 / 22])
    # every answer lost: the error stays positive and the verdict is FAIL
    se, why = g.paired_drop_stderr({i: 1.0 for i in range(20)}, {i: 0.0 for i in range(20)}, 1.0, 0.0, "acc")
    n, mean = 22, 20 / 22
    assert why is None and se == pytest.approx(math.sqrt((21 / n - mean**2) / n))
    # the usual case is untouched: 4 lost of 200
    se, _ = g.paired_drop_stderr({i: float(i < 100) for i in range(200)}, {i: float(4 <= i < 100) for i in range(200)}, 0.5, 0.48, "acc")
    d = [1.0] * 4 + [0.0] * 196
    assert se == pytest.approx(math.sqrt(sum((x - 0.02) ** 2 for x in d) / 199 / 200))
    # scores that are not 0/1 and all moved alike: no error from the pairing, and it says why
    se, why = g.paired_drop_stderr({0: 0.5, 1: 0.7}, {0: 0.4, 1: 0.6}, 0.6, 0.5, "f1")
    assert se is None and "moved by the same amount" in why


def test_min_reduction_fails_a_run_that_was_not_compressed_enough(tmp_path: Path) -> None:
    """Accuracy alone passes a model that was never compressed (a layers= typo, a rank=0 default): --min-reduction
    makes the gate read the compressed run's own parameter cut too."""
    base_data = lm_eval_results(arc=ARC_BASE)
    comp_data = lm_eval_results(arc=ARC_BASE)
    comp_data.setdefault("config", {})["lowrank"] = {"decomposition": {"param_reduction": 0.0787}}
    base, comp = pair(tmp_path, base_data, comp_data)
    args = [comp, "--baseline", base, "--max-drop", "0.03", "--tasks", "arc_easy_local"]
    r = run_cli(*args, "--min-reduction", "0.05", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and (doc["param_reduction"], doc["min_reduction"], doc["reduction_passed"]) == (0.0787, 0.05, True)
    assert "reduction: 7.87 % of the parameters, at least 5 % asked: PASS" in r.stderr
    r = run_cli(*args, "--min-reduction", "0.1")
    assert r.exit_code == 1 and "parameter reduction below the minimum" in r.output
    assert run_cli(*args).exit_code == 0  # without the option, accuracy alone decides
    # the dense run as "compressed": not an hf-tucker run at all
    r = run_cli(base, "--baseline", comp, "--max-drop", "0.03", "--tasks", "arc_easy_local", "--min-reduction", "0.05")
    assert r.exit_code == 1 and "not an hf-tucker run (no config.lowrank block)" in r.output
    bad = run_cli(*args, "--min-reduction", "1.5")
    assert bad.exit_code == 2 and "--min-reduction 1.5 is invalid" in bad.output


def test_a_group_evaluated_on_other_documents_warns_like_a_task(tmp_path: Path) -> None:
    """lm-eval writes n-samples for leaf tasks only, so a group run at another --limit must be caught from its
    subtasks' counts (summed), as a plain task is from its own."""
    comp = lm_eval_results(arc=ARC_BASE)
    for counts in comp["n-samples"].values():
        counts["effective"] = 50  # --limit 50 on every task
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), comp)
    r = run_cli(c, "--baseline", b, "--max-drop", "0.03")
    assert "warning: arc_easy_local: evaluated samples differs (baseline 200, compressed 50)" in r.output
    assert "warning: mmlu_local: evaluated samples differs (baseline 200, compressed 100); the runs are not comparable" in r.output
    # the same documents: no warning for the group
    b, c = pair(tmp_path, lm_eval_results(arc=ARC_BASE), lm_eval_results(arc=ARC_BASE))
    assert "warning" not in run_cli(c, "--baseline", b, "--max-drop", "0.03").output


def _with_documents(run: Path, evaluated: int, original: int = 2376) -> Path:
    """Set the run's n-samples for arc_easy_local, as ``--limit evaluated`` on a task of ``original`` documents."""
    data = json.loads(run.read_text())
    data["n-samples"]["arc_easy_local"] = {"original": original, "effective": evaluated}
    run.write_text(json.dumps(data))
    return run


def _gate_json(tmp_path: Path, name: str, base: list[int], comp: list[int], *args: str, samples: bool = True, stderr: float | str = 0.01) -> dict[str, Any]:
    """The arc_easy_local row of ``gate --json`` on two runs of the given 0/1 answers (n-samples: their length)."""
    runs = [
        _with_documents(_arc_run(tmp_path / name / side, stamp, answers, stderr=stderr, samples=samples), len(answers))
        for side, stamp, answers in (("base", "2026-01-01T00-00-00.0", base), ("comp", "2026-01-02T00-00-00.0", comp))
    ]
    r = run_cli(str(runs[1]), "--baseline", str(runs[0]), "--confidence", "0.95", "--json", *args)
    return {**json.loads(r.stdout)["tasks"][0], "exit_code": r.exit_code, "output": r.stderr}


def test_unsure_advice_when_no_answer_changed_shrinks_as_one_over_n(tmp_path: Path) -> None:
    """No answer changed: the Agresti-Min error is 1/(n+2), not spread/sqrt(n), so the documents that decide are
    about z / gap - 2 (53 at a 3-point gate), not 20 * (z * se / gap)^2 = 125. Checked on the gate's own verdict."""
    z = 1.6448536
    answers = [i % 2 for i in range(20)]
    task = _gate_json(tmp_path, "n20", answers, answers, "--max-drop", "0.03")
    assert (task["verdict"], task["stderr"]) == ("UNSURE", pytest.approx(1 / 22))
    advised = task["documents_to_decide"]
    assert advised == math.ceil(z / 0.03) - 2 == 53
    assert "UNSURE at 20 documents: about 53 would make it PASS" in task["output"]
    # the gate itself: the advised count of unchanged documents passes, one fewer does not
    assert _gate_json(tmp_path, "m", [1] * advised, [1] * advised, "--max-drop", "0.03")["verdict"] == "PASS"
    assert _gate_json(tmp_path, "m-1", [1] * (advised - 1), [1] * (advised - 1), "--max-drop", "0.03")["verdict"] == "UNSURE"
    # a relative drop's error is divided by the baseline (0.5): a 6 % relative gate is the same 3-point one
    assert _gate_json(tmp_path, "rel", answers, answers, "--max-drop", "0.06", "--relative")["documents_to_decide"] == 53
    # every answer lost (the other zero-spread case): 4 documents, drop 1.0, UNSURE at a 0.7 tolerance
    lost = _gate_json(tmp_path, "lost", [1] * 4, [0] * 4, "--max-drop", "0.7")
    assert lost["verdict"] == "UNSURE" and lost["stderr"] == pytest.approx(g.agresti_min_stderr(4, 0, 4))
    m = lost["documents_to_decide"]
    assert m < math.ceil(4 * (z * lost["stderr"] / 0.3) ** 2)  # the 1/sqrt(n) rule overstates it
    assert _gate_json(tmp_path, "lost_m", [1] * m, [0] * m, "--max-drop", "0.7")["verdict"] == "FAIL"
    assert _gate_json(tmp_path, "lost_m-1", [1] * (m - 1), [0] * (m - 1), "--max-drop", "0.7")["verdict"] == "UNSURE"
    # an ordinary paired error keeps the 1/sqrt(n) rule
    assert g.documents_to_decide(0.04, 0.01, 100, 0.05, 2.0) == 400


def test_zero_lm_eval_stderrs_are_not_certainty(tmp_path: Path) -> None:
    """lm-eval writes a stderr of 0 for a score of 0 or 1. Two of them would put both bounds on the drop and PASS
    20 documents all right in both runs at any level; each is floored at the error of (x+1)/(n+2) instead."""
    z = 1.6448536
    task = _gate_json(tmp_path, "n20", [1] * 20, [1] * 20, "--max-drop", "0.03", samples=False, stderr=0.0)
    floor = math.sqrt(21 / 22 * (1 / 22) / 22)  # p = 21/22 over 20 documents
    assert (task["stderr_kind"], task["stderr"]) == ("unpaired", pytest.approx(math.hypot(floor, floor)))
    assert task["verdict"] == "UNSURE" and task["exit_code"] == 1
    assert task["bounds"] == pytest.approx([-z * math.hypot(floor, floor), z * math.hypot(floor, floor)])
    assert "stderr of acc_norm,none is 0 in both runs (a score of 0 or 1)" in task["note"]
    # the advice solves on the floor too, and the gate agrees with it
    m = task["documents_to_decide"]
    assert _gate_json(tmp_path, "m", [1] * m, [1] * m, "--max-drop", "0.03", samples=False, stderr=0.0)["verdict"] == "PASS"
    assert _gate_json(tmp_path, "m-1", [1] * (m - 1), [1] * (m - 1), "--max-drop", "0.03", samples=False, stderr=0.0)["verdict"] == "UNSURE"
    # a score of 0 in both runs is floored alike
    assert _gate_json(tmp_path, "zero", [0] * 20, [0] * 20, "--max-drop", "0.03", samples=False, stderr=0.0)["stderr"] == pytest.approx(math.hypot(floor, floor))
    # without n-samples the document count is unknown: no bound, UNSURE with the reason, not PASS
    def without_counts(name: str, base: list[int], comp: list[int]) -> tuple[str, str]:
        runs = []
        for side, stamp, answers in (("base", "2026-01-01T00-00-00.0", base), ("comp", "2026-01-02T00-00-00.0", comp)):
            run = _arc_run(tmp_path / name / side, stamp, answers, stderr=0.0, samples=False)
            data = json.loads(run.read_text())
            del data["n-samples"]
            run.write_text(json.dumps(data))
            runs.append(str(run))
        return runs[0], runs[1]

    base, comp = without_counts("unknown", [1] * 20, [1] * 20)
    r = run_cli(comp, "--baseline", base, "--max-drop", "0.03", "--confidence", "0.95", "--json")
    task = json.loads(r.stdout)["tasks"][0]
    assert r.exit_code == 1 and (task["verdict"], task["stderr"], task["bounds"]) == ("UNSURE", None, None)
    assert "is 0 in both runs, which would claim certainty" in task["note"] and "no bound" in task["note"]
    # compare (drop_noise) gives no interval then, rather than a zero-width one
    noise, note = g.drop_noise("arc_easy_local", "acc_norm,none", g.load_results(base), g.load_results(comp), 1.0, 1.0)
    assert noise is None and "no bound" in (note or "")
    # a drop beyond the tolerance still FAILs on its own, so that --unsure pass cannot pass a broken model
    base, comp = without_counts("broken", [1] * 20, [0] * 20)
    r = run_cli(comp, "--baseline", base, "--max-drop", "0.03", "--confidence", "0.95", "--unsure", "pass", "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["tasks"][0]["verdict"] == "FAIL"


def _wikitext_run(out: Path, date_id: str, parts: list[tuple[float, int, int]]) -> Path:
    """A wikitext_local run whose perplexities are lm-eval's corpus aggregates of per-document (loglikelihood,
    words, bytes), with the samples file that logs each document's pairs."""
    ll, words, nbytes = (sum(p[i] for p in parts) for i in range(3))
    data = lm_eval_results(wikitext=math.exp(-ll / words), mmlu=None)
    entry = data["results"]["wikitext_local"]
    entry["byte_perplexity,none"], entry["bits_per_byte,none"] = math.exp(-ll / nbytes), -ll / nbytes / math.log(2)
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        entry[f"{key}_stderr,none"] = "N/A"  # as lm-eval writes for these
    path = write_run(out, data, date_id)
    lines = [
        {"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "word_perplexity": [x, w], "byte_perplexity": [x, b], "bits_per_byte": [x, b]}
        for i, (x, w, b) in enumerate(parts)
    ]
    (path.parent / f"samples_wikitext_local_{date_id}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_perplexities_get_a_paired_error_over_documents(tmp_path: Path) -> None:
    """word_perplexity and bits_per_byte are corpus aggregates (lm-eval gives them no stderr), so a perplexity drop
    had no interval at all. Paired over documents by the delta method: bits_per_byte's error is the ratio
    estimator's, and the perplexity's agrees with a bootstrap over documents."""
    import random

    from lm_eval_lowrank.gate import drop_noise, load_results

    rng = random.Random(0)
    dense = []
    for _ in range(300):
        words = rng.randint(50, 400)
        dense.append((-words * rng.uniform(2.5, 4.0), words, 5 * words))
    comp = [(x - w * abs(rng.gauss(0.05, 0.04)), w, b) for x, w, b in dense]
    base = load_results(_wikitext_run(tmp_path / "base", "2026-01-01T00-00-00.0", dense))
    run = load_results(_wikitext_run(tmp_path / "comp", "2026-01-02T00-00-00.0", comp))
    value = lambda f, m: f.entry("wikitext_local")[f"{m},none"]  # noqa: E731
    bits, _ = drop_noise("wikitext_local", "bits_per_byte,none", base, run, value(base, "bits_per_byte"), value(run, "bits_per_byte"))
    d = [xb - xc for (xb, _, b), (xc, _, _) in zip(dense, comp)]
    total = sum(b for _, _, b in dense)
    ratio = sum(d) / total
    by_hand = math.sqrt(300 / 299 * sum((di - ratio * b) ** 2 for di, (_, _, b) in zip(d, dense))) / total / math.log(2)
    assert bits.kind == "paired" and bits.documents == 300 and bits.stderr == pytest.approx(by_hand, rel=1e-9)
    word, note = drop_noise("wikitext_local", "word_perplexity,none", base, run, value(base, "word_perplexity"), value(run, "word_perplexity"))
    assert word.kind == "paired" and note is None
    drops = []
    for _ in range(2000):
        idx = [rng.randrange(300) for _ in range(300)]
        w = sum(dense[i][1] for i in idx)
        drops.append(math.exp(-sum(comp[i][0] for i in idx) / w) - math.exp(-sum(dense[i][0] for i in idx) / w))
    mean = sum(drops) / len(drops)
    bootstrap = math.sqrt(sum((x - mean) ** 2 for x in drops) / (len(drops) - 1))
    assert word.stderr == pytest.approx(bootstrap, rel=0.1)
    # other word counts per document (another tokenisation of the texts) do not pair
    shifted = [(x, w + 1, b) for x, w, b in comp]
    other = load_results(_wikitext_run(tmp_path / "other", "2026-01-03T00-00-00.0", shifted))
    none, why = drop_noise("wikitext_local", "word_perplexity,none", base, other, value(base, "word_perplexity"), value(other, "word_perplexity"))
    assert none is None and "count different words or bytes" in why


def test_compare_shows_a_perplexity_drop_with_its_paired_interval_or_says_why_not(tmp_path: Path) -> None:
    """compare printed a perplexity drop with no interval and no reason, though both runs had logged samples."""
    from lm_eval_lowrank.compare import comparison_rows

    dense = [(-300.0 - 7 * i, 100 + i, 500 + 5 * i) for i in range(20)]
    comp = [(x - 5 - (i % 3), w, b) for i, (x, w, b) in enumerate(dense)]
    base = _wikitext_run(tmp_path / "base", "2026-01-01T00-00-00.0", dense)
    run = _wikitext_run(tmp_path / "comp", "2026-01-02T00-00-00.0", comp)
    other = _wikitext_run(tmp_path / "other", "2026-01-03T00-00-00.0", [(x, w + 1, b) for x, w, b in comp])
    notes: list[str] = []
    _, rows = comparison_rows([base, run, other], tasks=["wikitext_local"], notes=notes)
    drop_row = rows[[r[0] for r in rows].index("wikitext_local word_perplexity") + 1]
    assert "(paired, 20 docs)" in drop_row[2] and "[" not in drop_row[3]
    assert len(notes) == 1 and notes[0].startswith("wikitext_local, run 3") and "count different words or bytes" in notes[0]


def test_a_perplexity_of_the_mean_loglikelihood_pairs_too(tmp_path: Path) -> None:
    """lambada's perplexity is exp(-mean loglikelihood) over documents, each logged as one number."""
    from lm_eval_lowrank.gate import drop_noise, load_results

    dense = [-1.0 - 0.1 * (i % 7) for i in range(30)]
    comp = [x - 0.05 * (i % 4) for i, x in enumerate(dense)]
    paths = []
    for name, lls, date_id in (("base", dense, "2026-01-01T00-00-00.0"), ("comp", comp, "2026-01-02T00-00-00.0")):
        data = lm_eval_results(arc={"acc,none": 0.5}, mmlu=None)
        data["results"]["lambada_local"] = {"alias": "lambada_local", "perplexity,none": math.exp(-sum(lls) / len(lls)), "perplexity_stderr,none": "N/A"}
        data["higher_is_better"]["lambada_local"] = {"perplexity": False}
        path = write_run(tmp_path / name, data, date_id)
        (path.parent / f"samples_lambada_local_{date_id}.jsonl").write_text("".join(json.dumps({"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "perplexity": x}) + "\n" for i, x in enumerate(lls)))
        paths.append(load_results(path))
    base, run = paths
    vb, vc = (f.entry("lambada_local")["perplexity,none"] for f in paths)
    noise, note = drop_noise("lambada_local", "perplexity,none", base, run, vb, vc)
    ab, ac = sum(dense) / 30, sum(comp) / 30
    g = [(-vc * (c - ac) + vb * (b - ab)) / 30 for b, c in zip(dense, comp)]
    assert note is None and noise.kind == "paired" and noise.stderr == pytest.approx(math.sqrt(30 / 29 * sum(x * x for x in g)))
