"""Sweeps: the resumable store, the grid, the report, and a tiny end-to-end search through hf-tucker."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

from conftest import save_tiny_llama, write_arc_task
from lm_eval_lowrank.spec import SpecError
from lm_eval_lowrank.store import Store, row_key




# -- store ------------------------------------------------------------------------------
def test_row_key_normalises_spec_and_task_order() -> None:
    a = row_key("m", {"rank": 1, "layers": 18}, ["b", "a"], 4)
    assert a == row_key("m", {"layers": "18", "rank": "1"}, ["a", "b"], 4)
    assert a != row_key("m", {"rank": 1, "layers": 18}, ["a", "b"], 5)
    assert a != row_key("m", {"rank": 8, "layers": 18}, ["a", "b"], 4)


def test_store_cuts_torn_line_and_keeps_complete_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    s = Store.open(path)
    s.append({"key": "k1", "status": "ok", "v": 1})
    s.append({"key": "k2", "status": "ok", "v": 2})
    with open(path, "ab") as fh:  # a kill in the middle of the third write
        fh.write(b'{"key": "k3", "status": "o')
    s2 = Store.open(path)
    assert s2.repaired_bytes > 0
    assert [r["key"] for r in s2.rows()] == ["k1", "k2"]
    assert path.read_bytes().endswith(b"\n")
    s2.append({"key": "k3", "status": "ok", "v": 3})
    lines = path.read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["k1", "k2", "k3"]


def test_store_keeps_row_without_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"key": "a", "status": "ok"}')
    s = Store.open(path)
    assert s.done("a") and s.repaired_bytes == 0
    s.append({"key": "b", "status": "ok"})
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b"]


def test_store_error_row_is_superseded(tmp_path: Path) -> None:
    s = Store.open(tmp_path / "s.jsonl")
    s.append({"key": "a", "status": "error", "error": "boom"})
    assert not s.done("a")
    s.append({"key": "a", "status": "ok"})
    assert s.done("a") and len(s.rows()) == 1
    assert Store.open(tmp_path / "s.jsonl").done("a")


# -- grid -------------------------------------------------------------------------------
def test_grid_expansion(smollm2_dir: Path) -> None:
    from lm_eval_lowrank.sweep import build_grid, expand_layer_sets, expand_tensor_groups, model_info

    L, names, adapter = model_info(str(smollm2_dir))
    assert L == 30 and "gate" in names
    sets = expand_layer_sets("single:3|16|30;table4;spread:1-2;all;3|18", L)
    assert ("3", (3,)) in sets and ("all", None) in sets and ("3|18", (3, 18)) in sets
    assert any(n.startswith("t4:") for n, _ in sets) and any(n == "spread2" for n, _ in sets)
    groups = expand_tensor_groups("all,attn,single,q|k", adapter)
    assert ("attn", ("q", "k", "v", "o")) in groups and ("gate", ("gate",)) in groups
    grid = build_grid([1, 8], [("3", (3,))], [("all", None), ("q", ("q",))])
    assert grid[0].is_dense and len(grid) == 5
    assert grid[1].axis == "single-layer" and grid[1].spec_args() == {"rank": "1", "layers": "3", "tensors": "all"}
    with pytest.raises(SpecError, match="layer-sets"):
        expand_layer_sets("3|40", L)
    with pytest.raises(SpecError, match="tensor-groups"):
        expand_tensor_groups("qq", adapter)
    assert expand_tensor_groups("[ud]*", adapter) == [("[ud]*", ("up", "down"))]  # a pattern, as in tensors=
    with pytest.raises(SpecError, match=r"tensor-groups='x\*' is invalid: unknown tensor 'x\*'"):
        expand_tensor_groups("x*", adapter)


# -- the real harness on a tiny random Llama ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama"), smollm2_dir,
        intermediate_size=128, num_hidden_layers=6, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory):
    from lm_eval.tasks import TaskManager

    d = write_arc_task(tmp_path_factory.mktemp("tasks"), "tiny_arc")
    # no built-in index: ~20 s saved, the throwaway task needs none
    return TaskManager(include_path=str(d), include_defaults=False)


def _runner(model: Path, store: Path, tm):
    from lm_eval_lowrank.sweep import Runner

    return Runner(model=str(model), tasks=("tiny_arc",), store=Store.open(store), batch_size=4, task_manager_instance=tm, log=lambda s: None)


def test_sweep_resumes_after_interruption(tiny_model: Path, task_manager, tmp_path: Path) -> None:
    from lm_eval_lowrank.sweep import build_grid, run_sweep

    grid = build_grid([1], [("2", (2,)), ("4", (4,))], [("all", None), ("q", ("q",))])
    store_path = tmp_path / "sweep.jsonl"
    runner = _runner(tiny_model, store_path, task_manager)
    real = runner._run
    calls = {"n": 0}

    def dies_on_third(*a, **k):  # a kill while the third configuration runs
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    runner._run = dies_on_third  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        run_sweep(runner, grid, limit=4)
    with open(store_path, "ab") as fh:  # and the kill tore the write of a row
        fh.write(b'{"key": "torn", "stat')
    assert len(Store.open(store_path, create=False).rows()) == 2

    runner2 = _runner(tiny_model, store_path, task_manager)
    rows = run_sweep(runner2, grid, limit=4)
    assert runner2.evaluated == len(grid) - 2  # the two finished rows are not repeated
    keys = [json.loads(x)["key"] for x in store_path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(grid)  # none repeated, none lost
    assert all(r["status"] == "ok" for r in rows)
    dense = rows[0]
    assert dense["spec"] == {} and dense["param_reduction"] == 0.0
    assert 0.0 <= dense["accuracy"]["tiny_arc"] <= 1.0 and dense["primary_metric"]["tiny_arc"] == "acc"
    r = rows[1]
    assert r["param_reduction"] > 0 and r["latency_seconds"] > 0 and r["memory_bytes"] > 0
    if r["energy_available"]:  # a host whose RAPL counters are readable
        assert r["energy_method"] == "rapl_energy_counter" and r["joules_per_token"] > 0
    else:
        assert r["energy_method"] is None and r["energy_reason"]
    assert "rank=1,layers=2,tensors=all" in r["model_args"]


def _fixture_rows() -> list[dict]:
    rows = []

    def row(label, spec, red, a1, a2, lat, axis):
        return {
            "key": label, "status": "ok", "label": label, "spec": spec, "axis": axis, "tasks": ["arc", "lam"], "limit": 16,
            "accuracy": {"arc": a1, "lam": a2}, "primary_metric": {"arc": "acc", "lam": "acc"}, "param_reduction": red,
            "latency_seconds": lat, "seconds_per_token": lat / 1000, "tokens_per_second": 1000 / lat, "energy_available": False,
            "energy_reason": "no CUDA GPU visible", "memory_bytes": int(2e9 * (1 - red)), "decomposition_seconds": 3 * red,
        }

    rows.append(row("dense", {}, 0.0, 0.5, 0.4, 10.0, "dense"))
    for layer, d in ((3, 0.1), (16, 0.02), (30, 0.2)):
        rows.append(row(f"r1 layers[{layer}]", {"rank": "1", "layers": str(layer), "tensors": "all"}, 0.026, 0.5 - d, 0.4 - d, 9.8, "single-layer"))
    for t, d in (("q", 0.01), ("gate", 0.15)):
        rows.append(row(f"r1 tensors[{t}]", {"rank": "1", "layers": "all", "tensors": t}, 0.05, 0.5 - d, 0.4 - d, 9.5, "single-tensor"))
    rows.append(row("r1 t4:odd", {"rank": "1", "layers": "1|3|5", "tensors": "all"}, 0.4, 0.25, 0.0, 7.0, "layer-set"))
    return rows


def test_report_from_fixture_store(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.sweep import report

    store = Store.open(tmp_path / "s.jsonl")
    for r in _fixture_rows():
        store.append(r)
    res = CliRunner().invoke(report, [str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "out" / "report.md").read_text()
    for label in ("dense", "r1 layers[16]", "r1 tensors[gate]", "r1 t4:odd"):
        assert label.replace("|", "\\|") in md
    assert "1\\|3\\|5" in md and "40.00%" in md
    for name in ("accuracy_vs_reduction", "efficiency_vs_reduction", "layer_sensitivity", "tensor_sensitivity"):
        png = tmp_path / "out" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"({name}.png)" in md
    bad = CliRunner().invoke(report, [str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "does not exist" in bad.output  # an input error, as elsewhere


def test_report_without_matplotlib_writes_the_table_alone_unless_plots_are_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from click.testing import CliRunner

    from lm_eval_lowrank.cli.sweep import report

    store = Store.open(tmp_path / "s.jsonl")
    for r in _fixture_rows():
        store.append(r)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    res = CliRunner().invoke(report, [str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "out" / "report.md").read_text()
    assert "r1 tensors[gate]" in md and "No plots: matplotlib is not installed" in md and ".png" not in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md"]
    asked = CliRunner().invoke(report, [str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o2"), "--plots"])
    assert asked.exit_code != 0 and "plotting needs the matplotlib package: pip install 'lm-eval-lowrank[plots]'" in str(asked.exception)
    assert not (tmp_path / "o2").exists()  # refused before writing anything
    monkeypatch.setattr(importlib.util, "find_spec", real)
    declined = CliRunner().invoke(report, [str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o3"), "--no-plots"])
    assert declined.exit_code == 0 and sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["report.md"]
    assert "No plots" not in (tmp_path / "o3" / "report.md").read_text()


def test_search_end_to_end_on_tiny_llama(tiny_model: Path, task_manager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.sweep import search
    from lm_eval_lowrank.sweep import Runner

    from lm_eval_lowrank import measure

    monkeypatch.setattr(Runner, "task_manager", lambda self: task_manager)
    monkeypatch.setattr(measure, "RAPL_ROOT", tmp_path)  # no energy counter, even on a host with readable RAPL
    store = tmp_path / "search.jsonl"
    args = ["--model", str(tiny_model), "--tasks", "tiny_arc", "--tolerance", "0.03", "--objective", "latency*energy",
            "--ranks", "1", "--max-k", "2", "--no-table4", "--limits", "2,4", "--eta", "2", "--prune-margin", "1.0",
            "--batch-size", "1", "--store", str(store)]
    res = CliRunner().invoke(search, args)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "energy unavailable" in out and "falls back to latency" in out
    assert "--model_args 'pretrained=" in out
    assert "Pareto front" in out
    rows = Store.open(store).rows()
    phases = {r["phase"] for r in rows}
    assert phases == {"screen0", "full"}
    assert sum(1 for r in rows if r["phase"] == "screen0") == 3  # dense + k=1 + k=2
    assert sum(1 for r in rows if r["phase"] == "full") == 2  # dense + the best half
    # the rows keep every timed call, and rows at one limit and batch size time the same batches: they pair
    full = [r for r in rows if r["phase"] == "full"]
    assert all(len(r["latency_calls"]["per_call_seconds"]) == len(r["latency_calls"]["per_call_tokens"]) > 0 for r in rows)
    assert full[0]["latency_calls"]["per_call_tokens"] == full[1]["latency_calls"]["per_call_tokens"]
    assert sum(full[1]["latency_calls"]["per_call_seconds"]) == pytest.approx(full[1]["latency_seconds"], abs=1e-5)
    ratio = re.search(r"latency vs dense: ([\d.]+) \[([\d.]+), ([\d.]+)\] \(95% interval, paired over (\d+) batches\)", out)
    assert ratio is not None, out
    assert int(ratio[4]) == len(full[0]["latency_calls"]["per_call_tokens"]) >= 9
    lower, point, upper = float(ratio[2]), float(ratio[1]), float(ratio[3])
    assert lower <= point <= upper
    assert point == pytest.approx(sum(full[1]["latency_calls"]["per_call_seconds"]) / sum(full[0]["latency_calls"]["per_call_seconds"]), abs=1e-3)
    # resumable: a second run evaluates nothing new and chooses the same
    res2 = CliRunner().invoke(search, args)
    assert res2.exit_code == 0 and "(0 run now" in res2.output
    chosen = [x for x in out.splitlines() if x.startswith("--model_args")]
    assert chosen == [x for x in res2.output.splitlines() if x.startswith("--model_args")]
    bad = CliRunner().invoke(search, [*args[:-2], "--store", str(store), "--objective", "speed"])
    assert bad.exit_code != 0 and "--objective" in bad.output


def test_runner_names_the_evaluated_tasks_for_the_no_leak_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process evaluations have no lm_eval --tasks on the command line: the runner must name
    # them, or calibration's no-leak check could only record "unchecked".
    import lm_eval

    from lm_eval_lowrank.calibration import EVAL_TASKS_ENV, evaluated_tasks_from_env
    from lm_eval_lowrank.sweep import Runner, spec_label

    seen: list = []

    def fake_evaluate(**kw):
        seen.append(evaluated_tasks_from_env())
        return {"results": {"wikitext_local": {"word_perplexity,none": 10.0}}, "config": {"lowrank": {}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.delenv(EVAL_TASKS_ENV, raising=False)
    runner = Runner(model="m", tasks=("wikitext_local", "arc_easy_local"), store=Store.open(tmp_path / "s.jsonl"), log=lambda s: None)
    runner.evaluate({"method": "whiten", "budget": "0.7", "layers": "3"}, limit=2)
    assert seen and sorted(seen[0]) == ["arc_easy_local", "wikitext_local"]
    import os

    assert EVAL_TASKS_ENV not in os.environ  # restored afterwards
    assert spec_label({"method": "whiten", "budget": "0.7", "layers": "3"}) == "whiten keep0.7 layers[3] tensors[all]"


def test_runner_refuses_bad_extra_model_args_before_any_row(tmp_path: Path) -> None:
    from lm_eval_lowrank.spec import SpecError
    from lm_eval_lowrank.sweep import Runner

    store = Store.open(tmp_path / "s.jsonl")
    for extra, match in (
        ("pretrained=x", r"^model-args='pretrained=x' is invalid: \['pretrained'\] are set per configuration by sweep and search"),
        ("dtype=float17", r"^dtype='float17' is invalid: valid auto, float32"),
        ("peft=/no/such/adapter", r"^peft='/no/such/adapter' is invalid: no such local file or folder"),
        ("device=cuda:1", r"^model-args='device=cuda:1' is invalid: device is an option of its own, --device$"),
        ("dtype=float32,batch_size=4", r"^model-args='dtype=float32,batch_size=4' is invalid: batch_size is an option of its own, --batch-size$"),
    ):
        with pytest.raises(SpecError, match=match):
            Runner(model="m", tasks=("arc_easy_local",), store=store, model_args=extra, log=lambda s: None)
    Runner(model="m", tasks=("arc_easy_local",), store=store, model_args="dtype=bfloat16", log=lambda s: None)


def test_runner_keeps_each_documents_score_for_the_paired_search(tiny_model: Path, task_manager, tmp_path: Path) -> None:
    """Through the real simple_evaluate: the stored per-document scores are the primary metric's, one per
    document, and their mean is the stored accuracy."""
    runner = _runner(tiny_model, tmp_path / "s.jsonl", task_manager)
    runner.keep_doc_scores = True
    row = runner.evaluate({"rank": "1", "layers": "2"}, 6)
    scores = row["doc_scores"]["tiny_arc"]
    assert len(scores) == 6 and len({(d, h) for d, h, _ in scores}) == 6 and {v for _, _, v in scores} <= {0.0, 1.0}
    assert sum(v for _, _, v in scores) / 6 == pytest.approx(row["accuracy"]["tiny_arc"])
    assert "doc_scores" in Store.open(tmp_path / "s.jsonl").get(row["key"])


def test_doc_scores_take_the_primary_metrics_filter_and_refuse_repeats() -> None:
    from lm_eval_lowrank.sweep import doc_scores_from_samples

    gsm = [
        {"doc_id": i, "doc_hash": f"h{i}", "filter": flt, "exact_match": v}
        for i, (strict, flexible) in enumerate([(1.0, 1.0), (0.0, 1.0)])
        for flt, v in (("strict-match", strict), ("flexible-extract", flexible))
    ]
    arc = [{"doc_id": 0, "doc_hash": "a", "filter": "none", "acc": 1.0}, {"doc_id": 0, "doc_hash": "a", "filter": "none", "acc": 0.0}]
    out = doc_scores_from_samples({"gsm": gsm, "arc": arc}, {"gsm": "exact_match,flexible-extract", "arc": "acc", "wiki": None})
    assert out == {"gsm": [[0, "h0", 1.0], [1, "h1", 1.0]]}  # arc repeats a document: left out


def test_keeping_doc_scores_evaluates_again_the_rows_stored_without_them(tiny_model: Path, task_manager, tmp_path: Path) -> None:
    spec, store = {"rank": "1", "layers": "2"}, tmp_path / "s.jsonl"
    plain = _runner(tiny_model, store, task_manager)
    first = plain.evaluate(spec, 4)
    assert "doc_scores" not in first and plain.evaluated == 1
    keeper = _runner(tiny_model, store, task_manager)
    keeper.keep_doc_scores = True
    assert keeper.stored_row(first["key"]) is None and plain.stored_row(first["key"]) == first
    again = keeper.evaluate(spec, 4)
    assert keeper.evaluated == 1 and len(again["doc_scores"]["tiny_arc"]) == 4
    assert again["accuracy"] == first["accuracy"]  # the same evaluation, now with its documents
    assert Store.open(store).get(first["key"])["doc_scores"] == again["doc_scores"]  # the new row supersedes
    for keep in (True, False):  # once stored with them, neither kind of runner evaluates again
        runner = _runner(tiny_model, store, task_manager)
        runner.keep_doc_scores = keep
        assert runner.evaluate(spec, 4) == again and runner.evaluated == 0


def test_report_gives_each_mean_drop_its_paired_interval(tmp_path: Path) -> None:
    from lm_eval_lowrank.report import markdown_table

    def row(label: str, spec: dict, arc: list[float], lam: list[float] | None, keep: bool = True) -> dict:
        lam = lam if lam is not None else arc
        r = {
            "key": label, "status": "ok", "label": label, "spec": spec, "tasks": ["arc", "lam"], "limit": 16,
            "accuracy": {"arc": sum(arc) / 16, "lam": sum(lam) / 16}, "primary_metric": {"arc": "acc", "lam": "acc"},
            "param_reduction": 0.1 if spec else 0.0, "latency_seconds": 1.0, "seconds_per_token": 0.001, "energy_available": False,
        }
        if keep:
            r["doc_scores"] = {t: [[i, f"h{i}", v] for i, v in enumerate(s)] for t, s in (("arc", arc), ("lam", lam))}
        return r

    dense_arc, dense_lam = [1.0] * 8 + [0.0] * 8, [1.0] * 6 + [0.0] * 10
    comp_arc, comp_lam = [0.0] * 2 + [1.0] * 6 + [0.0] * 8, [0.0] + [1.0] * 5 + [0.0] * 10  # 2 and 1 answers lost
    rows = [
        row("dense", {}, dense_arc, dense_lam),
        row("r1 kept", {"rank": "1", "layers": "3"}, comp_arc, comp_lam),
        row("r1 bare", {"rank": "1", "layers": "4"}, comp_arc, comp_lam, keep=False),
    ]

    def se(lost: int) -> float:
        d = [1.0] * lost + [0.0] * (16 - lost)
        m = lost / 16
        return math.sqrt(sum((x - m) ** 2 for x in d) / 15 / 16)

    drop, err = (2 / 16 + 1 / 16) / 2, math.hypot(se(2), se(1)) / 2
    table = markdown_table(rows)
    cells = {ln.split(" | ")[0].lstrip("| "): ln.split(" | ") for ln in table.splitlines() if ln.startswith("| ")}
    head = cells["config"]
    col = head.index("95% interval (pts)")
    assert head[col - 1] == "mean drop (pts)"
    assert cells["r1 kept"][col] == f"{100 * (drop - 1.959964 * err):+.1f} .. {100 * (drop + 1.959964 * err):+.1f}"
    assert cells["r1 bare"][col] == "n/a" and cells["dense"][col] == "-"
    # no row kept its documents: no column
    assert "interval" not in markdown_table([{k: v for k, v in r.items() if k != "doc_scores"} for r in rows])


def test_search_cli_with_family_wise_bounds_on_tiny_llama(tiny_model: Path, task_manager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI path with --confidence --family-wise: every document's score is stored, the log gives the per-bound
    level, and the chosen configuration states its family-wise upper bound."""
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.sweep import search
    from lm_eval_lowrank.sweep import Runner

    monkeypatch.setattr(Runner, "task_manager", lambda self: task_manager)
    store = tmp_path / "search.jsonl"
    args = ["--model", str(tiny_model), "--tasks", "tiny_arc", "--tolerance", "1.0", "--objective", "params", "--ranks", "1", "--max-k", "2",
            "--no-table4", "--limits", "4", "--confidence", "0.9", "--family-wise", "--batch-size", "4", "--store", str(store)]  # fmt: skip
    res = CliRunner().invoke(search, args)
    assert res.exit_code == 0, res.output
    assert "rung 0 (limit=4): 2 candidates, each bound at 0.95 (family-wise 0.9)" in res.output
    assert "(upper 0.9 family-wise bound " in res.output  # a tolerance of 1.0: a candidate is chosen
    assert all(len(r["doc_scores"]["tiny_arc"]) == 4 for r in Store.open(store).rows())


def test_report_plots_error_bars_from_the_documents_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """score_stderr is the standard error of a row's score over its documents; with it the accuracy plot draws
    95 % error bars (one errorbar call per task and axis), and without document scores none."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes
    import matplotlib.pyplot as plt

    from lm_eval_lowrank import report

    scores = [1.0] * 6 + [0.0] * 10
    row = {"doc_scores": {"arc": [[i, f"h{i}", v] for i, v in enumerate(scores)]}}
    assert report.score_stderr(row, "arc") == pytest.approx(math.sqrt(sum((v - 6 / 16) ** 2 for v in scores) / 15 / 16))
    assert report.score_stderr(row, "lam") is None and report.score_stderr({}, "arc") is None

    rows = _fixture_rows()
    for r in rows:
        r["doc_scores"] = {t: [[i, f"h{i}", v] for i, v in enumerate(scores)] for t in ("arc", "lam")}
    calls: list = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, *a, **k):
        calls.append(k.get("yerr"))
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    report._accuracy_plot(plt, rows, ["arc", "lam"], tmp_path / "a.png", "t")
    with_bars = len(calls)
    se = report.score_stderr(row, "arc")
    assert all(e == pytest.approx(100 * 1.959964 * se) for yerr in calls for e in yerr)  # every score has the same documents here
    calls.clear()
    report._accuracy_plot(plt, _fixture_rows(), ["arc", "lam"], tmp_path / "b.png", "t")
    assert with_bars == 2 * 3 and calls == []  # arc and lam x (single-layer, single-tensor, layer-set)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_report_gives_the_latency_change_its_paired_interval(tmp_path: Path) -> None:
    """Δlatency carries the paired interval of the rows' timed calls: one that ran 20 % slower on every batch
    (in 3 %-noisy calls) gets an interval around +20 % that excludes 0; rows without the calls, or with other
    batches, keep the bare change."""
    from lm_eval_lowrank.report import markdown_table

    rng = random.Random(3)
    base = [0.05 * (1 + 0.5 * math.sin(i)) for i in range(40)]

    def row(label: str, spec: dict, factor: float, tokens: list[int] | None = None, keep: bool = True) -> dict:
        calls = [b * factor * (1 + rng.gauss(0, 0.03)) for b in base]
        total = sum(calls)
        r = {
            "key": label, "status": "ok", "label": label, "spec": spec, "tasks": ["arc"], "limit": 16, "accuracy": {"arc": 0.5},
            "primary_metric": {"arc": "acc"}, "param_reduction": 0.1 if spec else 0.0, "latency_seconds": total,
            "seconds_per_token": total / 4000, "energy_available": False,
        }
        if keep:
            r["latency_calls"] = {"per_call_seconds": calls, "per_call_tokens": tokens or [100] * 40}
        return r

    rows = [row("dense", {}, 1.0), row("slow", {"rank": "1", "layers": "3"}, 1.2), row("bare", {"rank": "1", "layers": "4"}, 1.2, keep=False),
            row("other", {"rank": "1", "layers": "5"}, 1.2, tokens=[90] * 40)]  # fmt: skip
    cells = {line.split("|")[1].strip(): line.split("|")[-6].strip() for line in markdown_table(rows).splitlines() if line.startswith("| ") and "config" not in line}
    got = re.fullmatch(r"(\S+)% \[([+-][\d.]+), ([+-][\d.]+)\]", cells["slow"])
    assert got is not None, cells
    change, lower, upper = (float(x) for x in got.groups())
    assert change == pytest.approx(100 * (rows[1]["seconds_per_token"] / rows[0]["seconds_per_token"] - 1), abs=0.05)
    assert 0 < lower < change < upper and lower < 20 < upper
    assert re.fullmatch(r"\S+%", cells["bare"]) and re.fullmatch(r"\S+%", cells["other"]) and cells["dense"] == "0.0%"

    # the efficiency plot draws the same interval as an error bar, for the one row that has it
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.axes
    import matplotlib.pyplot as plt

    from lm_eval_lowrank import report

    calls: list = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, *a, **k):
        calls.append((a, k.get("yerr")))
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(matplotlib.axes.Axes, "errorbar", spy)
        report._efficiency_plot(plt, rows, tmp_path / "e.png", "t")
    ((xs, ys), (below, above)), = calls
    assert xs == (10.0,) and ys[0] == pytest.approx(change, abs=0.05)
    assert ys[0] - below[0] == pytest.approx(lower, abs=0.05) and ys[0] + above[0] == pytest.approx(upper, abs=0.05)


def test_a_row_stored_on_another_device_or_batch_size_is_evaluated_again(tmp_path: Path) -> None:
    """The key leaves out device and batch size (old stores still resume), but a cpu/batch-1 row's latency is not a
    cuda/batch-8 run's: the runner evaluates again, says why, and the new row supersedes the old."""
    from lm_eval_lowrank.sweep import Runner, build_grid, run_sweep

    path, spec = tmp_path / "s.jsonl", {"rank": "8", "layers": "16", "tensors": "all"}

    def runner(device: str, batch_size: str | int) -> tuple[Runner, list[str]]:
        logged: list[str] = []
        r = Runner(model="m", tasks=("arc_easy_local",), store=Store.open(path), device=device, batch_size=batch_size, log=logged.append)

        def fake_run(key, spec_args, limit, label, phase, meta):  # no model: the row a real run would store
            return {"key": key, "status": "ok", "device": r.device, "batch_size": str(r.batch_size), "seconds_per_token": 0.001,
                    "accuracy": {"arc_easy_local": 0.5}, "param_reduction": 0.01, "wall_seconds": 1.0}

        r._run = fake_run  # type: ignore[method-assign]
        return r, logged

    cpu, _ = runner("cpu", 1)
    old = cpu.store.append({"key": cpu.key(spec, 20), "status": "ok", "device": "cpu", "batch_size": "1", "seconds_per_token": 0.05})
    assert cpu.evaluate(spec, 20) == old and cpu.evaluated == 0  # its own row: reused

    gpu, logged = runner("cuda", 8)
    assert gpu.key(spec, 20) == old["key"] and gpu.stored_row(old["key"]) is None
    row = gpu.evaluate(spec, 20, label="r8 [16]")
    assert gpu.evaluated == 1 and (row["device"], row["batch_size"], row["seconds_per_token"]) == ("cuda", "8", 0.001)
    assert logged == ["  r8 [16]: stored with --device cpu, not cuda; evaluating again"]
    assert Store.open(path).get(old["key"])["device"] == "cuda"  # the new row supersedes
    again, _ = runner("cuda", 8)
    assert again.evaluate(spec, 20) == row and again.evaluated == 0  # and is reused by a run like it

    batch4, logged4 = runner("cuda", 4)  # the batch size alone differs
    assert batch4.evaluate(spec, 20, label="r8 [16]")["batch_size"] == "4" and batch4.evaluated == 1
    assert logged4 == ["  r8 [16]: stored with --batch-size 8, not 4; evaluating again"]

    sweeper, _ = runner("cpu", 1)  # run_sweep goes through the same check
    grid = build_grid([8], [("16", (16,))], [("all", None)], dense=False)
    assert run_sweep(sweeper, grid, 20)[0]["device"] == "cpu" and sweeper.evaluated == 1
    assert sweeper.stored_row(sweeper.key(spec, 20)) is not None

    unrecorded, _ = runner("cuda", 8)  # a row that records neither (written by hand) is taken as it is
    bare = unrecorded.store.append({"key": unrecorded.key(spec, 40), "status": "ok", "seconds_per_token": 0.02})
    assert unrecorded.evaluate(spec, 40) == bare and unrecorded.evaluated == 0


def test_opening_a_store_waits_for_a_row_another_sweep_is_writing(tmp_path: Path) -> None:
    """A second sweep that opens the store while the first is mid-append must not cut that row as a torn tail (the
    rest of it would then land as a garbage line, and every later open would fail)."""
    import fcntl
    import threading
    import time

    path = tmp_path / "store.jsonl"
    Store.open(path).append({"key": "a", "status": "ok"})
    line = json.dumps({"key": "b", "status": "ok", "pad": "x" * 3000}) + "\n"
    opened: list[Store] = []
    with open(path, "ab") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # as append holds it
        fh.write(line[:1000].encode())
        fh.flush()
        reader = threading.Thread(target=lambda: opened.append(Store.open(path)))
        reader.start()
        time.sleep(0.3)
        assert reader.is_alive()  # waiting for the lock, not cutting the half row
        fh.write(line[1000:].encode())
        fh.flush()
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    reader.join(10)
    assert opened and opened[0].repaired_bytes == 0 and opened[0].done("b")
    assert Store.open(path).done("b")


def test_an_open_store_takes_other_writers_rows_and_never_glues_onto_a_torn_line(tmp_path: Path) -> None:
    """Two writers on one store: a row appended after another writer was killed mid-write was glued onto its
    fragment, and every later open failed ("line 3 is not JSON"), losing the row."""
    path = tmp_path / "s.jsonl"
    mine, theirs = Store.open(path), Store.open(path)
    mine.append({"key": "k1", "status": "ok"})
    theirs.append({"key": "k2", "status": "ok"})
    with open(path, "ab") as fh:  # a third writer killed in the middle of its write
        fh.write(b'{"key": "k3", "status": "o')
    mine.append({"key": "k4", "status": "ok"})
    assert mine.done("k2") and not mine.done("k3")  # the other writer's row is taken on the way
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["k1", "k2", "k4"]
    reopened = Store.open(path)
    assert [r["key"] for r in reopened.rows()] == ["k1", "k2", "k4"] and reopened.repaired_bytes == 0
    with open(path, "ab") as fh:  # a whole row whose newline never landed is kept
        fh.write(b'{"key": "k5", "status": "ok"}')
    theirs.append({"key": "k6", "status": "ok"})
    assert [r["key"] for r in Store.open(path).rows()] == ["k1", "k2", "k4", "k5", "k6"]
    mine.refresh()
    assert mine.done("k5") and mine.done("k6")


def test_two_sweeps_on_one_store_share_the_work(tmp_path: Path, monkeypatch) -> None:
    """Two sweeps of one grid on one store evaluated every configuration twice and wrote each row twice. A
    configuration another process holds is left to it and its row taken at the end."""
    import threading
    import time

    from lm_eval_lowrank.sweep import Runner, SweepConfig, run_sweep

    path = tmp_path / "s.jsonl"
    ran: list[str] = []

    def fake_run(self, key, spec_args, limit, label, phase, meta):
        ran.append(label)
        return {"key": key, "status": "ok", "label": label, "device": self.device, "batch_size": str(self.batch_size),
                "accuracy": {"arc": 0.5}, "param_reduction": 0.01, "wall_seconds": 0.1}  # fmt: skip

    monkeypatch.setattr(Runner, "_run", fake_run)
    grid = [SweepConfig(rank=r, layers=(3,), layer_set="3") for r in (1, 2, 3)]
    runner = Runner(model="m", tasks=("arc",), store=Store.open(path), log=lambda s: None)
    other = Store.open(path)
    busy_key = runner.key(grid[0].spec_args(), 4)
    held, release = threading.Event(), threading.Event()

    def other_sweep() -> None:  # holds r1 while "evaluating" it, then writes its row
        with other.claim(busy_key):
            held.set()
            release.wait(10)
            time.sleep(0.2)
            other.append({"key": busy_key, "status": "ok", "label": "r1 (other)", "device": "cpu", "batch_size": "1", "accuracy": {"arc": 0.5}, "param_reduction": 0.01, "wall_seconds": 0.1})

    t = threading.Thread(target=other_sweep)
    t.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    rows = run_sweep(runner, grid, 4)
    t.join(10)
    assert ran == [grid[1].label, grid[2].label] and [r["label"] for r in rows] == ["r1 (other)", grid[1].label, grid[2].label]
    assert sorted(json.loads(x)["key"] for x in path.read_text().splitlines()) == sorted({r["key"] for r in rows})  # no row twice


def test_report_compares_each_model_with_its_own_dense_row() -> None:
    """Store keys include the model and its other model_args, so one store can hold two sweeps: each table must
    take its drops from its own model's dense row, not the first dense row of the same tasks."""
    from lm_eval_lowrank.report import markdown_table

    def row(model: str, label: str, spec: dict, acc: float, extra: str = "") -> dict:
        args = ",".join([f"pretrained={model}", *([extra] if extra else []), *(f"{k}={v}" for k, v in spec.items())])
        return {"key": model + label + extra, "status": "ok", "model": model, "label": label, "spec": spec, "model_args": args,
                "tasks": ["arc"], "limit": 50, "accuracy": {"arc": acc}, "primary_metric": {"arc": "acc"},
                "param_reduction": 0.1 if spec else 0.0, "latency_seconds": 1.0, "seconds_per_token": 0.001}  # fmt: skip

    rows = [
        row("A", "dense", {}, 0.70), row("B", "dense", {}, 0.40), row("B", "r8 L3", {"rank": "8", "layers": "3"}, 0.39),
        row("B", "dense", {}, 0.50, "dtype=bfloat16"), row("B", "r8 L3", {"rank": "8", "layers": "3"}, 0.45, "dtype=bfloat16"),
    ]  # fmt: skip
    table = markdown_table(rows)
    drops = [line.split("|")[7].strip() for line in table.splitlines() if line.startswith("| r8 L3")]
    assert drops == ["+1.0", "+5.0"]  # against B's own dense row, then B in bfloat16's; not A's 0.70
    assert "### model: B, dtype=bfloat16; tasks: arc" in table and table.count("| dense |") == 3


def test_sensitivity_bars_leave_a_configuration_that_was_not_evaluated_out(tmp_path: Path) -> None:
    """A (series, layer) with no finished row is no bar, not a bar of height 0 ('this layer costs nothing')."""
    from lm_eval_lowrank import report

    drawn = {}

    class Axes:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def bar(self, xs, heights, width=None, label=None):
            drawn[label] = heights

    class Plt:
        def subplots(self, *a, **k):
            return type("Fig", (), {"tight_layout": lambda self: None, "savefig": lambda self, *a, **k: None})(), Axes()

        def close(self, fig):
            pass

    def row(spec, acc, axis):
        return {"label": str(spec), "spec": spec, "axis": axis, "accuracy": {"arc": acc}, "tasks": ["arc"], "limit": 50}

    group = [row({}, 0.60, None), row({"rank": "8", "layers": "3"}, 0.55, "single-layer"), row({"rank": "8", "layers": "15"}, 0.50, "single-layer"), row({"rank": "1", "layers": "3"}, 0.40, "single-layer")]
    assert report._sensitivity_plot(Plt(), group, ["arc"], "single-layer", tmp_path / "x.png", "t")
    assert drawn["rank 8"] == pytest.approx([5.0, 10.0]) and drawn["rank 1"][0] == pytest.approx(20.0)
    assert math.isnan(drawn["rank 1"][1])
