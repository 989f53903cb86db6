"""Sweep review fixes: the grid's canonical configurations, checks before any weights load, and the store's rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lm_eval_lowrank.spec import SpecError
from lm_eval_lowrank.store import Store, row_key
from lm_eval_lowrank.sweep import Runner, build_grid, expand_layer_sets, expand_tensor_groups, model_info


class _FakeTaskManager:
    """What the runner reads of lm-eval's TaskManager: the registered names."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.all_tasks = sorted(names)


@pytest.fixture
def no_evaluation(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every configuration the runner would evaluate is recorded instead (nothing loads), and lm-eval knows one task."""
    run: list[str] = []

    def fake_run(self, key, spec_args, limit, label, phase, meta):
        run.append(label)
        return {"key": key, "status": "ok", "label": label, "device": self.device, "batch_size": str(self.batch_size),
                "accuracy": {"arc_easy_local": 0.5}, "param_reduction": 0.01, "wall_seconds": 0.1}

    monkeypatch.setattr(Runner, "_run", fake_run)
    monkeypatch.setattr(Runner, "task_manager", lambda self: _FakeTaskManager(("arc_easy_local",)))
    return run


def _main(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """The console script's entry point (its one-line errors), in this process: (exit code, stderr)."""
    from lm_eval_lowrank.cli import main

    monkeypatch.setattr(sys, "argv", ["lm-eval-lowrank", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _sweep(store: Path, *extra: str) -> list[str]:
    return ["sweep", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(store), "--limit", "2", *extra]


# -- the grid ---------------------------------------------------------------------------------------
def test_equivalent_tensor_groups_and_layer_sets_are_one_configuration() -> None:
    L, _, adapter = model_info("smollm2-135m")
    groups = expand_tensor_groups("q|k,k|q,all,q|k|v|o|gate|up|down,down|up,attn", adapter)
    assert groups == [("q|k", ("q", "k")), ("all", None), ("up|down", ("up", "down")), ("attn", ("q", "k", "v", "o"))]
    sets = expand_layer_sets("all;1-30;18|3;single:3", L)
    assert sets == [("all", None), ("3|18", (3, 18)), ("3", (3,))]
    grid = build_grid([1], sets, groups)
    specs = [tuple(sorted(c.spec_args().items())) for c in grid]
    assert len(specs) == len(set(specs)) == 1 + 3 * 4


def test_canonical_configurations_keep_their_store_keys(tmp_path: Path) -> None:
    """Stores written before canonicalisation are still reused: a configuration that was canonical keeps its spec."""
    L, _, adapter = model_info("smollm2-135m")
    runner = Runner(model="smollm2-135m", tasks=("arc_easy_local",), store=Store.open(tmp_path / "s.jsonl"), log=lambda s: None)
    grid = build_grid([8], expand_layer_sets("all;3|18", L), expand_tensor_groups("all,q|k,mlp", adapter), dense=False)
    tensors = {"all": "all", "q|k": "q|k", "mlp": "gate|up|down"}
    expected = [{"rank": "8", "layers": layers, "tensors": t} for layers in ("all", "3|18") for t in tensors.values()]
    assert [c.spec_args() for c in grid] == expected
    assert [runner.key(c.spec_args(), 20) for c in grid] == [row_key("smollm2-135m", s, ["arc_easy_local"], 20) for s in expected]


@pytest.mark.parametrize("entry", ["spread:0", "spread:1-30", "single:0", "single:", "spread:all"])
def test_layer_set_entry_errors_name_the_option_and_the_entry(entry: str) -> None:
    with pytest.raises(SpecError, match=rf"^layer-sets='{entry}' is invalid: entry '{entry}': .*; ';'-separated entries: table4"):
        expand_layer_sets(entry, 30)


# -- checks before anything is evaluated ------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, match",
    [
        ("budget=0.5", r"budget: it would compress the dense baseline"),
        ("dtype=float32,allocator=fisher", r"allocator: search sets it per candidate from --allocator"),
        ("asvd_alpha=0.3", r"asvd_alpha=0.3 is invalid: it applies to method=asvd only"),
    ],
)
def test_model_args_that_would_compress_or_break_the_dense_baseline_are_refused(tmp_path: Path, extra: str, match: str) -> None:
    with pytest.raises(SpecError, match=rf"^model-args='{extra}' is invalid: {match}"):
        Runner(model="m", tasks=("arc_easy_local",), store=Store.open(tmp_path / "s.jsonl"), model_args=extra, log=lambda s: None)
    # decomposition options that leave the dense row dense still pass, to every row
    runner = Runner(model="m", tasks=("arc_easy_local",), store=Store.open(tmp_path / "s.jsonl"), model_args="method=whiten,calib_n=16", log=lambda s: None)
    assert runner.decomposition_args == {"method": "whiten", "calib_n": 16}


def test_a_rank_too_large_for_the_model_stops_the_sweep_before_any_row(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    code, err = _main(_sweep(tmp_path / "s.jsonl", "--ranks", "1,5000", "--layer-sets", "3"), capsys, monkeypatch)
    assert code == 2 and no_evaluation == [] and not (tmp_path / "s.jsonl").read_text()
    assert err.strip().splitlines() == ["Error: r5000 layers[3] tensors[all]: rank=5000 is invalid for tensor 'q' (4096x4096): valid 1..4096, and only ranks below 2048 save parameters"]
    code, err = _main(_sweep(tmp_path / "s.jsonl", "--ranks", "1", "--layer-sets", "3", "--dry-run"), capsys, monkeypatch)
    assert code == 0 and no_evaluation == []  # the dry run checks the same grid


def test_search_checks_its_candidates_against_the_model_before_any_row(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    args = ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(tmp_path / "s.jsonl"), "--limits", "2"]
    code, err = _main([*args, "--ranks", "8,5000", "--max-k", "1", "--no-table4"], capsys, monkeypatch)
    assert code == 2 and no_evaluation == []
    assert err.strip().splitlines()[-1].startswith("Error: r5000 layers[17] tensors[all]: rank=5000 is invalid for tensor 'q'")


def test_search_refuses_a_method_in_model_args_beside_method(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    """--method sets each candidate's method, and tucker candidates name none: a method= in --model-args would turn
    them into that method's, under tucker's name."""
    args = ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(tmp_path / "s.jsonl"), "--limits", "2",
            "--ranks", "8", "--max-k", "1", "--no-table4", "--method", "tucker,asvd", "--model-args", "method=whiten"]  # fmt: skip
    code, err = _main(args, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and no_evaluation == [] and len(lines) == 1 and "'--model-args'" in lines[0] and "--method" in lines[0], err


@pytest.mark.parametrize("batch_size", ["abc", "0", "auto:0", "AUTO", "1.5"])
def test_a_bad_batch_size_is_one_line_before_the_model_is_read(tmp_path: Path, batch_size: str, capsys, monkeypatch) -> None:
    from lm_eval_lowrank import sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "model_info", lambda model: pytest.fail("read the model before checking --batch-size"))
    for command in (_sweep(tmp_path / "s.jsonl"), ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(tmp_path / "s.jsonl")]):
        code, err = _main([*command, "--batch-size", batch_size], capsys, monkeypatch)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "'--batch-size'" in lines[0] and "auto:N" in lines[0], err


def test_batch_sizes_lm_eval_takes_pass(tmp_path: Path) -> None:
    for batch_size in (1, "8", "auto", "auto:4"):
        Runner(model="m", tasks=("t",), store=Store.open(tmp_path / "s.jsonl"), batch_size=batch_size, log=lambda s: None)
    with pytest.raises(SpecError, match=r"^batch_size='abc' is invalid: expected an int >= 1, auto, or auto:N"):
        Runner(model="m", tasks=("t",), store=Store.open(tmp_path / "s.jsonl"), batch_size="abc", log=lambda s: None)


def test_unknown_tasks_are_one_line_before_any_row(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    store = tmp_path / "s.jsonl"
    bad = ["sweep", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local,no_such_task", "--store", str(store), "--layer-sets", "3"]
    code, err = _main(bad, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and no_evaluation == [] and len(lines) == 1, err
    assert "'--tasks'" in lines[0] and "'no_such_task'" in lines[0] and "'arc_easy_local'" not in lines[0]
    yaml = tmp_path / "my_task.yaml"  # a YAML file is a task spec lm-eval takes as it is
    yaml.write_text("task: my_task\n")
    code, _ = _main(["sweep", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", f"arc_easy_local,{yaml}", "--store", str(store), "--layer-sets", "3"], capsys, monkeypatch)
    assert code == 0 and no_evaluation == ["dense", "r1 layers[3] tensors[all]"]


def test_a_resumed_sweep_with_its_dense_row_stored_does_not_index_the_tasks_again(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    args = _sweep(tmp_path / "s.jsonl", "--layer-sets", "3", "--batch-size", "1")
    assert _main(args, capsys, monkeypatch)[0] == 0 and len(no_evaluation) == 2
    monkeypatch.setattr(Runner, "task_manager", lambda self: pytest.fail("built the TaskManager for a finished store"))
    assert _main(args, capsys, monkeypatch)[0] == 0 and len(no_evaluation) == 2


# -- the store --------------------------------------------------------------------------------------
def test_a_failed_reevaluation_does_not_hide_the_finished_row(tmp_path: Path) -> None:
    path, spec = tmp_path / "s.jsonl", {"rank": "1", "layers": "3", "tensors": "all"}
    store = Store.open(path)
    batch8 = Runner(model="m", tasks=("arc_easy_local",), store=store, batch_size="8", log=lambda s: None)
    key = batch8.key(spec, 10)
    ok = store.append({"key": key, "status": "ok", "batch_size": "8", "device": "cpu", "accuracy": {"arc_easy_local": 0.5}})
    batch64 = Runner(model="m", tasks=("arc_easy_local",), store=store, batch_size="64", log=lambda s: None)
    batch64._run = lambda key, spec_args, limit, label, phase, meta: {"key": key, "status": "error", "batch_size": "64", "device": "cpu", "error": "OutOfMemoryError"}
    assert batch64.evaluate(spec, 10)["status"] == "error"  # said where it happened
    for s in (store, Store.open(path)):
        assert s.done(key) and s.get(key) == ok and s.rows() == [ok]
        assert [r["status"] for r in s.rows(ok_only=False)] == ["error"]  # the failure stays visible
    again = Runner(model="m", tasks=("arc_easy_local",), store=Store.open(path), batch_size="8", log=lambda s: None)
    again._run = lambda *a: pytest.fail("evaluated a finished row again")
    assert again.evaluate(spec, 10) == ok and again.evaluated == 0
    only_errors = Store.open(tmp_path / "e.jsonl")  # a key that never finished is still run again
    only_errors.append({"key": "k", "status": "error", "error": "boom"})
    assert not only_errors.done("k") and only_errors.get("k")["error"] == "boom" and only_errors.rows() == []


def test_sweeps_score_a_task_on_the_metric_the_gate_and_compare_choose():
    """Sweeps scored ARC on acc while the gate and compare took acc_norm: a configuration the search chose within
    a tolerance could then fail the gate on the other metric. A row stored under the old choice is evaluated again,
    and the report leaves it out of the drops."""
    from lm_eval_lowrank.gate import choose_metric
    from lm_eval_lowrank.report import markdown_table
    from lm_eval_lowrank.sweep import Runner, extract_metrics

    entry = {"acc,none": 0.6, "acc_stderr,none": 0.05, "acc_norm,none": 0.4, "acc_norm_stderr,none": 0.04, "alias": "arc"}
    metrics, acc, names, errs = extract_metrics({"arc": entry}, ["arc"])
    assert choose_metric(entry) == "acc_norm,none" and names == {"arc": "acc_norm"} and acc == {"arc": 0.4} and errs == {"arc": 0.04}
    runner = Runner.__new__(Runner)
    runner.device, runner.batch_size, runner.keep_doc_scores = "cpu", 1, False
    old = {"device": "cpu", "batch_size": "1", "metrics": metrics, "primary_metric": {"arc": "acc"}, "accuracy": {"arc": 0.6}}
    assert runner.stale_reason(old) == "stored with arc scored on acc, now acc_norm"
    assert runner.stale_reason({**old, "primary_metric": names, "accuracy": acc}) is None
    base = {"model": "m", "tasks": ["arc"], "limit": 10, "param_reduction": 0.0, "label": "dense", "spec": None}
    dense = {**base, "primary_metric": {"arc": "acc"}, "accuracy": {"arc": 0.6}}
    newer = {**base, "label": "r1", "spec": {"rank": 1, "layers": "3", "tensors": "all"}, "param_reduction": 0.1, "primary_metric": names, "accuracy": {"arc": 0.3}}
    row = next(line for line in markdown_table([dense, newer]).splitlines() if line.startswith("| r1"))
    assert "+30.0" not in row and "+10.0" not in row  # no drop across metrics (0.6 acc - 0.3 acc_norm)


def test_sweep_and_search_refuse_a_shape_without_weights_and_a_bogus_device(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    """`--model smollm2-135m` (a built-in shape of `space`) passed every check and then every evaluation failed;
    `--device bogus` ran on the CPU and was stored as the rows' device."""
    store = str(tmp_path / "s.jsonl")
    for command in ("sweep", "search"):
        code, err = _main([command, "--model", "smollm2-135m", "--tasks", "arc_easy_local", "--store", store], capsys, monkeypatch)
        assert code == 2 and no_evaluation == [] and err.count("\n") == 1 and "'smollm2-135m' is a built-in shape without weights" in err, err
        code, err = _main([command, "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", store, "--device", "bogus"], capsys, monkeypatch)
        assert code == 2 and no_evaluation == [] and err.count("\n") == 1 and "'--device': 'bogus' is not a torch device" in err, err
    code, _ = _main(["sweep", "--model", "gpt2", "--tasks", "arc_easy_local", "--store", store, "--layer-sets", "3"], capsys, monkeypatch)
    assert code == 0 and no_evaluation == ["dense", "r1 layers[3] tensors[all]"]  # gpt2 is a Hub model too


def test_a_dry_run_changes_nothing_on_disk(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    """`sweep --dry-run` created an empty store file, and cut a torn last line of an existing one."""
    new = tmp_path / "new.jsonl"
    code, _ = _main(_sweep(new, "--layer-sets", "3", "--dry-run"), capsys, monkeypatch)
    assert code == 0 and not new.exists() and no_evaluation == []
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"key": "a", "status": "ok"}\n{"key": "b", "sta')
    before = torn.read_bytes()
    code, _ = _main(_sweep(torn, "--layer-sets", "3", "--dry-run"), capsys, monkeypatch)
    assert code == 0 and torn.read_bytes() == before


def test_a_file_that_is_not_a_store_is_refused_and_left_as_it_is(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    """A results JSON or a text file given as --store ended in a StoreError traceback (exit 1)."""
    for name, text in (("results.json", '{\n "results": {}\n}\n'), ("notes.txt", "not a store\n")):
        path = tmp_path / name
        path.write_text(text)
        for command in (_sweep(path), ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(path)]):
            code, err = _main(command, capsys, monkeypatch)
            assert code == 2 and err.strip().splitlines() == [f"Error: Invalid value for '--store': store {str(path)!r} line 1 is not JSON; fix or remove that line"], err
            assert path.read_text() == text and no_evaluation == []


def test_a_dry_run_checks_the_tasks_the_device_and_the_model_args_as_a_run_does(tmp_path: Path, no_evaluation: list[str], capsys, monkeypatch) -> None:
    """`sweep --dry-run` listed the rows of an unknown task, of --device cuda on a machine without CUDA, and of
    a misspelt model argument: each then failed only when run."""
    import torch

    store = tmp_path / "s.jsonl"
    code, err = _main(_sweep(store, "--layer-sets", "3", "--dry-run", "--tasks", "arc_easy_lcoal"), capsys, monkeypatch)
    assert code == 2 and "'--tasks': 'arc_easy_lcoal': lm-eval" in err and err.count("\n") == 1, err
    code, err = _main(_sweep(store, "--layer-sets", "3", "--dry-run", "--model-args", "calib_m=4"), capsys, monkeypatch)
    assert code == 2 and "model-args='calib_m=4' is invalid: calib_m=4 is not an argument of hf-tucker" in err, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _main(_sweep(store, "--layer-sets", "3", "--dry-run", "--device", "cuda"), capsys, monkeypatch)
    assert code == 2 and "'--device': 'cuda': this torch" in err and "has no usable CUDA; use --device cpu" in err, err
    assert no_evaluation == [] and not store.exists()
