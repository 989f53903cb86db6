"""Parsing and validation of the decomposition arguments: syntax, ranges, one-line errors."""

from __future__ import annotations

import re

import pytest

from lm_eval_lowrank.api import validate_against_config
from lm_eval_lowrank.spec import (
    DecompositionSpec,
    SpecError,
    breakeven_rank,
    parse_layers,
    parse_model_args,
    parse_rank,
    parse_tensors,
    split_model_args,
)

LLAMA2_7B = dict(
    model_type="llama",
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    num_hidden_layers=32,
    vocab_size=32000,
)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("3|18|32", (3, 18, 32)),
        (18, (18,)),  # lm-eval's CLI turns layers=18 into an int
        ("18", (18,)),
        ("3-6", (3, 4, 5, 6)),
        ("3-30:3|32", tuple(range(3, 31, 3)) + (32,)),
        ("1-2|10", (1, 2, 10)),
        ("all", None),
        ("ALL", None),
        (None, None),
        ([5, 1], (1, 5)),
        (range(3, 6), (3, 4, 5)),  # from Python
    ],
)
def test_parse_layers(value, expected):
    assert parse_layers(value) == expected


@pytest.mark.parametrize("value", ["0", 0, "-1", "3|3", "", "3||4", "a", "5-3", "3-5:0", True])
def test_parse_layers_rejects(value):
    with pytest.raises(SpecError) as e:
        parse_layers(value)
    msg = str(e.value)
    assert msg.startswith("layers=") and "\n" not in msg


def test_layers_are_one_based_in_the_message():
    with pytest.raises(SpecError, match="1-based"):
        parse_layers("0")


@pytest.mark.parametrize(
    "value,expected",
    [
        (8, (8, {})),
        ("8", (8, {})),
        ("q:8|gate:32", (None, {"q": 8, "gate": 32})),
        ("8|q:4", (8, {"q": 4})),
        ({"q": 8, "gate": 32}, (None, {"q": 8, "gate": 32})),  # from Python
        ({"*": 8, "q": 4}, (8, {"q": 4})),
    ],
)
def test_parse_rank(value, expected):
    assert parse_rank(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "x", "q:0", "8|9", "q:1|q:2", ":4", 1.5, True, {"q": 0}, {"*": 8, "default": 9}])
def test_parse_rank_rejects(value):
    with pytest.raises(SpecError) as e:
        parse_rank(value)
    assert str(e.value).startswith("rank=") and "\n" not in str(e.value)


def test_parse_tensors():
    assert parse_tensors("q|k|v") == ("q", "k", "v")
    assert parse_tensors("all") is None
    assert parse_tensors({"v", "q", "k"}) == ("k", "q", "v")  # a set, in a stable order
    with pytest.raises(SpecError, match="tensors="):
        parse_tensors("q|q")
    with pytest.raises(SpecError, match="tensors="):
        parse_tensors("")


def test_unknown_method_and_argument():
    with pytest.raises(SpecError, match=r"method='svdx'.*tucker, rom, whiten"):
        DecompositionSpec.from_args({"method": "svdx", "rank": 1})
    with pytest.raises(SpecError, match="unknown decomposition argument"):
        DecompositionSpec.from_args({"rnak": 1})


def test_rank_and_budget_exclude_each_other():
    with pytest.raises(SpecError, match="exclude each other"):
        DecompositionSpec.from_args({"rank": 1, "budget": 0.8})
    with pytest.raises(SpecError, match="budget="):
        DecompositionSpec.from_args({"budget": 1.5})


def test_layers_without_rank_is_an_error():
    with pytest.raises(SpecError, match="rank is missing"):
        DecompositionSpec.from_args({"layers": "3|4"})


def test_noop_spec_is_dense():
    assert DecompositionSpec.from_args({}).is_noop


@pytest.mark.parametrize(
    "args,match",
    [
        ({"rank": 1, "layers": 33}, r"layer 33 is past the end; this model has 32 decoder layers, valid 1\.\.32"),
        # a range comes back as the range, not its 31 numbers
        ({"rank": 1, "layers": "1|3-33|35"}, r"^layers='1\|3-33\|35' is invalid: layer 33 is past the end"),
        ({"rank": 5000}, r"rank=5000 is invalid for tensor 'q' \(4096x4096\): valid 1\.\.4096, and only ranks below 2048 save"),
        ({"rank": 1, "tensors": "q|qkv"}, r"unknown tensor 'qkv'.*valid: q\|k\|v\|o\|gate\|up\|down"),
        ({"rank": "q:4|c_attn:2"}, r"unknown tensor 'c_attn'"),
        ({"rank": "8|v:4|o:2", "tensors": "q|k"}, r"rank: v\|o given a rank but not selected by tensors=q\|k; add it to tensors or drop its rank"),
        ({"rank": "8|*p:4", "tensors": "q|k"}, r"rank: \*p given a rank but not selected by tensors=q\|k"),
    ],
)
def test_range_errors_from_the_config_alone(args, match):
    spec = DecompositionSpec.from_args(args)
    with pytest.raises(SpecError, match=match) as e:
        validate_against_config(spec, LLAMA2_7B)
    assert "\n" not in str(e.value)


def test_a_huge_layer_range_is_refused_before_it_is_expanded():
    """layers=1-300000000 expanded the whole range first and died in MemoryError."""
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(SpecError, match=r"^layers='1-300000000' is invalid: layer 300000000 is out of range; no model has more than 100000"):
        DecompositionSpec.from_args({"rank": 1, "layers": "1-300000000"})
    assert tracemalloc.get_traced_memory()[1] < 10_000_000
    tracemalloc.stop()
    assert DecompositionSpec.from_args({"rank": 1, "layers": "2-40:2|3"}).layers == (2, 3, *range(4, 41, 2))


def test_a_negative_count_from_the_command_line_is_quoted_as_typed():
    """lm_eval's command line reads rank=-1 as -1.0; the message said rank=-1.0."""
    with pytest.raises(SpecError, match=r"^rank=-1 is invalid: must be >= 1"):
        DecompositionSpec.from_args({"rank": -1.0})
    with pytest.raises(SpecError, match=r"^seed=-1 is invalid: expected an int >= 0$"):
        DecompositionSpec.from_args({"rank": 1, "seed": -1.0})


def test_layer_ranges_in_messages():
    from lm_eval_lowrank.spec import format_layer_ranges

    assert format_layer_ranges((1, 2, 4, 5, 6, 7, 9)) == "1|2|4-7|9" and format_layer_ranges(None) == "all" and format_layer_ranges(()) == ""


def test_split_model_args_takes_rank_out_of_hflm_kwargs():
    ours, rest = split_model_args({"pretrained": "x", "rank": 1, "layers": "3|18", "dtype": "float32", "batch_size": 4})
    assert ours == {"rank": 1, "layers": "3|18"}
    assert rest == {"pretrained": "x", "dtype": "float32", "batch_size": 4}


def test_parse_model_args_types_like_lm_eval():
    d = parse_model_args("pretrained=m,rank=1,layers=3|18|32,budget=0.8,cache=false")
    assert d == {"pretrained": "m", "rank": 1, "layers": "3|18|32", "budget": 0.8, "cache": False}
    # lm-eval keeps the last of a repeated key without a word: rank=8 ... rank=4 would decompose at 4
    with pytest.raises(SpecError, match=r"^model_args: rank is given twice \(8 and 4\); give it once$"):
        parse_model_args("pretrained=m,rank=8,layers=3,rank=4")


def test_breakeven_rank():
    # folded: r(m+n) < mn  <=>  r < mn/(m+n); square 4096: 2048
    assert breakeven_rank(4096, 4096, "folded") == 2048
    # tucker adds r^2: r^2 + 2nr - n^2 >= 0 -> r = n(sqrt2 - 1)
    assert breakeven_rank(4096, 4096, "tucker") == 1697


def test_spec_to_dict_round_trips_the_syntax():
    spec = DecompositionSpec.from_args({"rank": "8|q:4", "layers": "3-5", "tensors": "q|k"})
    d = spec.to_dict()
    assert d["rank"] == "8|q:4" and d["layers"] == "3|4|5" and d["tensors"] == "q|k"
    again = DecompositionSpec.from_args({k: d[k] for k in ("rank", "layers", "tensors")})
    assert again == spec


def test_solver_tol_is_checked_and_defaults_to_the_krylov_bound():
    from lm_eval_lowrank.methods.tucker import KRYLOV_TOL

    assert DecompositionSpec().solver_tol == KRYLOV_TOL
    assert DecompositionSpec.from_args({"rank": 4, "solver_tol": "0.001"}).solver_tol == 0.001
    for bad in ("0", "1", "-0.1", "tight", True):
        with pytest.raises(SpecError, match=r"^solver_tol=.* is invalid: expected .* 0 < solver_tol < 1"):
            DecompositionSpec.from_args({"rank": 4, "solver_tol": bad})


def test_tensor_patterns_stand_for_every_name_they_match():
    """Experts kept in a list (transformers 4, remote code) are named one by one; a shell-style pattern names them
    all, in tensors= and in per-tensor ranks (an exact name's rank first, then the first matching pattern's)."""
    avail = ("q_proj", "k_proj", "experts.0.w1", "experts.0.w2", "experts.1.w1", "experts.1.w2")
    spec = DecompositionSpec.from_args({"rank": "8|*.w1:4|experts.1.w1:3", "tensors": "*.w1|q_proj"})
    assert spec.selected_tensors(avail) == ("experts.0.w1", "experts.1.w1", "q_proj")  # the order given
    assert [spec.rank_for(t) for t in spec.selected_tensors(avail)] == [4, 3, 8]
    only_overrides = DecompositionSpec.from_args({"rank": "experts.*:2"})
    assert only_overrides.selected_tensors(avail) == avail[2:] and {only_overrides.rank_for(t) for t in avail[2:]} == {2}
    for args, message in (
        ({"rank": 8, "tensors": "*.w9"}, "tensors: matches no tensor '*.w9' for this architecture; valid: q_proj|k_proj|"),
        ({"rank": "8|zz*:2"}, "rank: matches no tensor 'zz*' for this architecture; valid: q_proj|"),
        ({"rank": 8, "tensors": "v_proj"}, "tensors: unknown tensor 'v_proj' for this architecture; valid: q_proj|"),
    ):
        with pytest.raises(SpecError, match="^" + re.escape(message)):
            DecompositionSpec.from_args(args).selected_tensors(avail)


def test_a_pattern_decomposes_every_expert_kept_in_a_list():
    from conftest import list_experts_model

    from lm_eval_lowrank import compress_model
    from lm_eval_lowrank.modules import LowRankLinear

    model = list_experts_model()
    report = compress_model(model, {"rank": "1|*.w1:2", "tensors": "*.w1"}, progress=False)
    assert [(t.layer, t.tensor, t.rank) for t in report.plan.targets] == [(layer, f"experts.{e}.w1", 2) for layer in (1, 2) for e in range(6)]
    assert all(isinstance(block.experts[e].w1, LowRankLinear) for block in model.layers for e in range(6))
    assert not isinstance(model.layers[0].q_proj, LowRankLinear)


@pytest.mark.parametrize(
    "args",
    [
        {"rank": 1, "layers": "3|15|28"},
        {"rank": "8|q:4|*.w1:2", "tensors": "q|k|*.w1", "solver_tol": 0.05, "seed": 3, "layout": "tucker"},
        {"method": "asvd", "budget": 0.7, "layers": "3-30:3", "asvd_alpha": 0.25, "allocator": "output_error"},
        {"method": "asvd", "rank": 4, "asvd_stat": "rms"},
        {"method": "whiten", "rank": 16, "calib": "arc_easy_local", "calib_n": 32, "calib_target": "dense", "calib_staged": False},
    ],
)
def test_the_recorded_spec_rebuilds_the_same_spec(args):
    """to_dict() is what the results JSON records (decomposition.spec): every argument, defaults included, and
    from_args of it gives the same spec, so a run can be redone from its JSON."""
    spec = DecompositionSpec.from_args(args)
    recorded = spec.to_dict()
    assert DecompositionSpec.from_args(recorded) == spec
    assert ("asvd_alpha" in recorded) == (spec.method == "asvd")  # another method's option is not recorded
    with pytest.raises(SpecError, match=r"^asvd_alpha=0\.5 is invalid: it applies to method=asvd only, not method=whiten$"):
        DecompositionSpec.from_args({"method": "whiten", "rank": 4, "asvd_alpha": 0.5})
    with pytest.raises(SpecError, match=r"^asvd_stat='max' is invalid: valid: mean_abs, rms$"):
        DecompositionSpec.from_args({"method": "asvd", "rank": 4, "asvd_stat": "max"})


def test_the_results_json_records_the_whole_spec(tiny_llama):
    from lm_eval_lowrank.api import compress_model

    d = compress_model(tiny_llama, {"rank": 2, "layers": "2", "solver_tol": 0.05}, progress=False).to_dict()
    assert d["spec"]["solver_tol"] == 0.05 and d["spec"]["layers"] == "2" and d["spec"]["seed"] == 0
    assert DecompositionSpec.from_args(d["spec"]) == DecompositionSpec.from_args({"rank": 2, "layers": "2", "solver_tol": 0.05})


def test_missing_local_paths_are_refused_and_hub_ids_pass(tmp_path, monkeypatch):
    from lm_eval_lowrank.spec import check_local_paths

    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    # Hub ids, existing paths and non-strings are left to transformers.
    for ok in ("meta-llama/Llama-2-7b-hf", "gpt2", str(tmp_path / "model"), "./model", "model", None, 3):
        check_local_paths({"pretrained": ok, "tokenizer": ok, "peft": ok, "delta": ok})
    for key in ("pretrained", "tokenizer", "peft", "delta"):
        for missing in ("/no/such/model", "./nope", "../nope", "a/b/c"):
            with pytest.raises(SpecError, match=rf"^{key}='{re.escape(missing)}' is invalid: no such local file or folder; give an existing path or a Hub id such as org/name$"):
                check_local_paths({key: missing})
    # "~" reaches transformers unexpanded inside quoted model_args: the message says what to write.
    expanded = re.escape(str(tmp_path / "model"))
    with pytest.raises(SpecError, match=rf"^pretrained='~/model' is invalid: no such local file or folder \('~' is not expanded inside quotes: write '{expanded}'\)"):
        check_local_paths({"pretrained": "~/model"})


def test_a_bad_per_tensor_rank_names_the_whole_argument():
    for value, part in (("8|q:abc", "abc"), ("8|q:", ""), ("x|q:4", "x")):
        with pytest.raises(SpecError) as err:
            DecompositionSpec.from_args({"rank": value})
        assert str(err.value).startswith(f"rank={value!r} is invalid: cannot parse {part!r} as a rank")


def test_a_long_layer_range_is_parsed_in_linear_time():
    import time

    t0 = time.perf_counter()
    assert len(parse_layers("1-100000")) == 100000  # the duplicate check was quadratic: 1-30000 took 23 s
    assert time.perf_counter() - t0 < 5
    with pytest.raises(SpecError, match=r"duplicate layer\(s\) \[3\]"):
        parse_layers("1-5|3")


def test_a_removed_argument_is_refused_with_its_reason_not_passed_to_hflm():
    """hooi_iters was validated, recorded and keyed the caches, yet nothing read it: a 2-D weight's Tucker-2 is the
    truncated SVD. It is refused with the reason, not sent on to HFLM as an unknown keyword."""
    ours, rest = split_model_args({"pretrained": "x", "rank": 1, "hooi_iters": 5})
    assert ours == {"rank": 1, "hooi_iters": 5} and "hooi_iters" not in rest
    with pytest.raises(SpecError, match=r"^hooi_iters is not an argument any more: .*truncated SVD") as e:
        DecompositionSpec.from_args(ours)
    assert "\n" not in str(e.value)
    assert "hooi_iters" not in DecompositionSpec.from_args({"rank": 1}).to_dict()


def test_arguments_that_change_nothing_are_said_and_not_recorded_as_used(capsys):
    """method=whiten alone ran dense without a word; rank=2 with calib_n ran tucker without calibration; with rank=
    the spec recorded allocator and rank_multiple as if they had placed the ranks."""
    DecompositionSpec.from_args({"method": "whiten", "calib_n": 16})
    assert "calib_n, method unused: without rank= or budget= nothing is decomposed" in capsys.readouterr().err
    DecompositionSpec.from_args({"rank": 2, "calib_n": 16})
    assert "calib_n unused: method=tucker reads no calibration data" in capsys.readouterr().err
    spec = DecompositionSpec.from_args({"rank": 2})
    assert "allocator" not in spec.to_dict() and "rank_multiple" not in spec.to_dict()
    assert DecompositionSpec.from_args(spec.to_dict()) == spec and capsys.readouterr().err == ""  # quiet round trip
    budget = DecompositionSpec.from_args({"budget": 0.5, "allocator": "tail", "rank_multiple": 8})
    assert budget.to_dict()["allocator"] == "tail" and DecompositionSpec.from_args(budget.to_dict()) == budget
    for stray in ({"allocator": "tail"}, {"rank_multiple": 8}):
        with pytest.raises(SpecError, match=r"is invalid: it applies to budget=F only"):
            DecompositionSpec.from_args({"rank": 2, **stray})


def test_calib_target_outside_whiten_and_fwhiten_is_said_unused(capsys):
    """rom and asvd fit the compressed model's own outputs: calib_target was taken silently and recorded as if it
    had changed something."""
    from lm_eval_lowrank.methods import BUILTIN_MODULES, uses_reference
    from lm_eval_lowrank.spec import REFERENCE_METHODS

    assert set(REFERENCE_METHODS) == {m for m in BUILTIN_MODULES if uses_reference(m)}
    for method in ("rom", "asvd", "fwsvd"):
        spec = DecompositionSpec.from_args({"method": method, "rank": 4, "calib_target": 0.5})
        assert f"calib_target unused: method={method} fits the compressed model's own outputs" in capsys.readouterr().err
        assert spec.calib_target == 0.5 and spec.effective().calib_target == 0.25
    for method in REFERENCE_METHODS:
        spec = DecompositionSpec.from_args({"method": method, "rank": 4, "calib_target": 0.5})
        assert capsys.readouterr().err == "" and spec.effective() == spec
    exact = DecompositionSpec.from_args({"rank": 4, "solver": "exact", "solver_tol": 0.05, "seed": 3})
    assert "solver_tol, seed unused" in capsys.readouterr().err
    assert exact.effective() == DecompositionSpec.from_args({"rank": 4, "solver": "exact"})
