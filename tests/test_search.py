"""Definition-1 search with an injected evaluate function (no model)."""

from __future__ import annotations

import math
import random

import pytest

from lm_eval_lowrank.latency_stats import LatencyRatio
from lm_eval_lowrank.search import (
    DENSE,
    Candidate,
    accuracy_drop,
    default_candidates,
    objective_value,
    pareto_front,
    search,
)
from lm_eval_lowrank.spec import SpecError, parse_layers


def test_default_candidates_follow_pruning_rules() -> None:
    cands = default_candidates(30, ranks=(1, 8), max_k=4, table4=False)
    assert len(cands) == 8
    for c in cands:
        layers = parse_layers(c.spec["layers"])
        assert c.spec["tensors"] == "all"  # whole layers
        assert min(layers) >= 3 and max(layers) <= 29  # not the first two, not the last
        if len(layers) > 1:
            assert min(b - a for a, b in zip(layers, layers[1:])) >= 8  # spread apart
    with_t4 = default_candidates(30, ranks=(1,), max_k=2)
    assert any("t4:" in c.name for c in with_t4)
    with pytest.raises(SpecError):
        default_candidates(3, ranks=(1,), table4=False)


def test_candidates_with_strides_keep_fractions_and_a_method() -> None:
    from lm_eval_lowrank.search import stride_layer_sets

    assert stride_layer_sets(30, 3) == (3, 6, 9, 12, 15, 18, 21, 24, 27)  # never layer 1, 2 or 30
    cands = default_candidates(30, ranks=(), max_k=1, table4=False, keeps=(0.7,), strides=(3,), method="whiten")
    by_name = {c.name: c.spec for c in cands}
    assert by_name == {
        "whiten keep0.7 spread1 [16]": {"budget": "0.7", "layers": "16", "tensors": "all", "method": "whiten"},
        "whiten keep0.7 every3 [3|6|9|12|15|18|21|24|27]": {"budget": "0.7", "layers": "3|6|9|12|15|18|21|24|27", "tensors": "all", "method": "whiten"},
    }
    # every candidate spec is valid model_args
    from lm_eval_lowrank.spec import DecompositionSpec

    for spec in by_name.values():
        DecompositionSpec.from_args(spec)
    with pytest.raises(SpecError, match="keep"):
        default_candidates(30, ranks=(), keeps=(1.2,))
    with pytest.raises(SpecError, match="at least one"):
        default_candidates(30, ranks=(), keeps=())


def test_search_cli_rejects_bad_candidate_options(tmp_path) -> None:
    from click.testing import CliRunner

    from lm_eval_lowrank.cli import cli

    store = str(tmp_path / "s.jsonl")
    for args, hint in ((["--keeps", "0.7,abc"], "--keeps"), (["--method", "svd"], "--method"), (["--ranks", "none"], "--ranks"), (["--prune-margin", "-0.1"], "--prune-margin"), (["--family-wise"], "--family-wise"), (["--budgets", "0.9,1"], "--budgets"), (["--budgets", "0.9", "--allocator", "measured"], "--allocator")):
        res = CliRunner().invoke(cli, ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", store, *args])
        assert res.exit_code == 2 and hint in res.output and "Usage:" not in res.output, res.output


def test_budget_candidates_let_the_allocator_place_the_cut() -> None:
    """A --budgets candidate names no layers of ours: the whole model's matrices, with a rank per module from the
    allocator; alone they are enough for a search."""
    from lm_eval_lowrank.spec import DecompositionSpec

    cands = default_candidates(30, ranks=(), table4=False, budgets=(0.95, 0.9), method=("tucker", "whiten"))
    assert {c.name: c.spec for c in cands} == {
        "budget0.95 fisher [all]": {"budget": "0.95", "allocator": "fisher", "layers": "all", "tensors": "all"},
        "budget0.9 fisher [all]": {"budget": "0.9", "allocator": "fisher", "layers": "all", "tensors": "all"},
        "whiten budget0.95 fisher [all]": {"budget": "0.95", "allocator": "fisher", "layers": "all", "tensors": "all", "method": "whiten"},
        "whiten budget0.9 fisher [all]": {"budget": "0.9", "allocator": "fisher", "layers": "all", "tensors": "all", "method": "whiten"},
    }
    for c in cands:
        spec = DecompositionSpec.from_args(c.spec)
        assert spec.allocator == "fisher" and spec.budget in (0.95, 0.9) and spec.layers is None
    assert len(default_candidates(30, ranks=(8,), max_k=2, table4=False, budgets=(0.9,), allocator="sensitivity")) == 3
    with pytest.raises(SpecError, match="budget=1.0 is invalid"):
        default_candidates(30, ranks=(), budgets=(1.0,))
    with pytest.raises(SpecError, match="allocator='measured' is invalid"):
        default_candidates(30, ranks=(), budgets=(0.9,), allocator="measured")


def _row(acc: float, red: float, spt: float, energy: float | None = None) -> dict:
    return {
        "status": "ok", "accuracy": {"t": acc}, "param_reduction": red, "seconds_per_token": spt,
        "energy_available": energy is not None, "joules_per_token": energy, "energy_reason": None if energy else "no CUDA GPU visible",
        "params_after": int(100 * (1 - red)), "memory_bytes": 1,
    }


def test_objective_falls_back_to_latency_without_energy() -> None:
    assert objective_value(_row(0.5, 0.1, 2.0), "latency*energy") == (2.0, "latency")
    assert objective_value(_row(0.5, 0.1, 2.0, 3.0), "latency*energy") == (6.0, "latency*energy")
    assert objective_value(_row(0.5, 0.1, 2.0), "params") == (90.0, "params")
    assert accuracy_drop({"accuracy": {"a": 0.5, "b": 0.4}}, {"accuracy": {"a": 0.4, "b": 0.4}}) == pytest.approx(0.05)
    assert accuracy_drop({"accuracy": {"a": 0.5, "b": 0.4}}, {"accuracy": {"a": 0.4, "b": 0.4}}, "max") == pytest.approx(0.1)


# name -> (true accuracy, reduction, seconds per token); screening adds noise of +-0.02
TRUTH = {
    "dense": (0.60, 0.0, 1.00),
    "a": (0.59, 0.02, 0.99),  # feasible, barely faster
    "b": (0.58, 0.05, 0.97),  # feasible and the fastest feasible: the answer
    "c": (0.50, 0.08, 0.95),  # 10 points: infeasible
    "d": (0.20, 0.20, 0.85),  # collapses: pruned at screening
    "e": (0.25, 0.30, 0.80),  # collapses: pruned at screening
}


def _evaluator(calls: list):
    def evaluate(spec, limit, phase="", label=""):
        name = spec.get("name", "dense")
        calls.append((name, limit, phase))
        acc, red, spt = TRUTH[name]
        noise = 0.02 if limit < 50 and name in ("a", "c") else 0.0
        return _row(acc - noise, red, spt)

    return evaluate


def _cands() -> list[Candidate]:
    return [Candidate(n, {"name": n}) for n in TRUTH if n != "dense"]


def test_search_prunes_at_screening_and_decides_at_full_fidelity() -> None:
    calls: list = []
    res = search(_cands(), _evaluator(calls), tolerance=0.03, limits=(10, 50), objective="latency*energy", eta=2, prune_margin=0.1)
    assert res.best.candidate.name == "b"
    assert res.best.limit == 50 and res.best.drop == pytest.approx(0.02)
    screened = {n for n, lim, _ in calls if lim == 10}
    full = {n for n, lim, _ in calls if lim == 50}
    assert screened == set(TRUTH)  # dense + every candidate screened
    assert "d" not in full and "e" not in full  # far beyond tau: pruned
    assert len(full - {"dense"}) <= math.ceil(5 / 2)  # the best 1/eta go on
    assert any("falls back to latency" in n for n in res.notes)
    front = pareto_front(res.final)
    assert [e.candidate.name for e in front][0] == "dense"
    assert all(front[i].row["param_reduction"] < front[i + 1].row["param_reduction"] for i in range(len(front) - 1))


def test_search_keeps_dense_when_nothing_is_feasible() -> None:
    res = search(_cands(), _evaluator([]), tolerance=0.0, limits=(10, 50), objective="latency", prune_margin=0.0)
    assert res.best.candidate is DENSE
    assert any("keep the dense model" in n for n in res.notes)


def test_search_bad_arguments() -> None:
    ev = _evaluator([])
    with pytest.raises(SpecError, match="objective"):
        search(_cands(), ev, 0.03, objective="speed")
    with pytest.raises(SpecError, match="tolerance"):
        search(_cands(), ev, -1)
    with pytest.raises(SpecError, match="eta"):
        search(_cands(), ev, 0.03, eta=1)


def _paired_row(accuracy: float, scores: list[float], reduction: float) -> dict:
    row = _row(accuracy, reduction, 0.01)
    row["doc_scores"] = {"t": [[i, f"h{i}", v] for i, v in enumerate(scores)]}
    return row


def test_confidence_makes_feasibility_a_paired_upper_bound() -> None:
    """Both candidates drop 0.02 on 200 documents. 'steady' loses 4 answers the dense model had right; 'shaky'
    loses 24 and gains 20, so its paired bound is far wider. At 95 % only 'steady' is within 0.04."""
    dense = [1.0] * 100 + [0.0] * 100
    steady = [0.0] * 4 + [1.0] * 96 + [0.0] * 100
    shaky = [0.0] * 24 + [1.0] * 76 + [1.0] * 20 + [0.0] * 80
    rows = {"dense": _paired_row(0.5, dense, 0.0), "steady": _paired_row(0.48, steady, 0.05), "shaky": _paired_row(0.48, shaky, 0.10)}
    bare = dict(rows["steady"], doc_scores=None)
    rows["stored-bare"] = bare | {"param_reduction": 0.01}

    def evaluate(spec, limit, phase="", label=""):
        return rows[spec.get("name", "dense")]

    cands = [Candidate(n, {"name": n}) for n in ("steady", "shaky", "stored-bare")]
    plain = search(cands, evaluate, tolerance=0.04, limits=(50,), objective="params")
    assert {e.candidate.name for e in plain.feasible} == {"steady", "shaky", "stored-bare"}
    res = search(cands, evaluate, tolerance=0.04, limits=(50,), objective="params", confidence=0.95)
    by_name = {e.candidate.name: e.row for e in res.final}
    d = [1.0] * 4 + [0.0] * 196
    se = math.sqrt(sum((x - 0.02) ** 2 for x in d) / 199 / 200)
    assert by_name["steady"]["drop_stderr"] == pytest.approx(se) and by_name["steady"]["drop_upper"] == pytest.approx(0.02 + 1.6448536 * se)
    assert by_name["steady"]["feasible"] and not by_name["shaky"]["feasible"]
    assert by_name["stored-bare"]["feasible"] and "drop_upper" not in by_name["stored-bare"]
    assert any(n.startswith("stored-bare: judged on its drop alone (t: no per-document scores") for n in res.notes)
    assert res.best.candidate.name == "steady"  # shaky cuts more, but is not shown to be within tolerance
    with pytest.raises(SpecError, match="confidence=1.5 is invalid"):
        search(cands, evaluate, tolerance=0.04, limits=(50,), confidence=1.5)


def _flip(dense: list[float], lose: int, gain: int) -> list[float]:
    """The dense scores with the first ``lose`` right answers made wrong and the first ``gain`` wrong ones right."""
    out, lost, gained = list(dense), 0, 0
    for i, v in enumerate(dense):
        if v == 1.0 and lost < lose:
            out[i], lost = 0.0, lost + 1
        elif v == 0.0 and gained < gain:
            out[i], gained = 1.0, gained + 1
    return out


def test_confidence_screens_on_the_paired_lower_bound() -> None:
    """Screening on 100 documents, deciding on 400, tolerance 0.03. 'noisy' screens at a 0.15 drop from 40 answers
    lost and 25 gained, yet is exact at full fidelity; 'steady' screens at 0.10 from 10 answers lost and nothing
    gained. The fixed margin (tau + 0.1) prunes the wrong one; the lower bound prunes the right one."""
    rows: dict[tuple[str, int], dict] = {}
    for limit in (100, 400):
        dense = [float(i % 2 == 0) for i in range(limit)]
        flips = {"noisy": (40, 25) if limit == 100 else (0, 0), "steady": (limit // 10, 0), "exact": (0, 0)}
        rows["dense", limit] = _paired_row(sum(dense) / limit, dense, 0.0)
        for name, (lose, gain) in flips.items():
            scores = _flip(dense, lose, gain)
            rows[name, limit] = _paired_row(sum(scores) / limit, scores, {"noisy": 0.10, "steady": 0.20, "exact": 0.05}[name])
    calls: list[tuple[str, int]] = []

    def evaluate(spec, limit, phase="", label=""):
        calls.append((spec.get("name", "dense"), limit))
        return rows[spec.get("name", "dense"), limit]

    cands = [Candidate(n, {"name": n}) for n in ("noisy", "steady", "exact")]
    plain = search(cands, evaluate, tolerance=0.03, limits=(100, 400), objective="params", eta=1.01)
    assert {n for n, lim in calls if lim == 400} == {"dense", "steady", "exact"}  # noisy pruned on its point estimate
    assert plain.best.candidate.name == "exact"

    calls.clear()
    logged: list[str] = []
    res = search(cands, evaluate, tolerance=0.03, limits=(100, 400), objective="params", eta=1.01, confidence=0.95, log=logged.append)
    assert {n for n, lim in calls if lim == 400} == {"dense", "noisy", "exact"}  # steady is surely beyond tau
    screened = {e.candidate.name: e.row for e in res.history if e.limit == 100 and not e.candidate.is_dense}
    d = [1.0] * 10 + [0.0] * 90
    se = math.sqrt(sum((x - 0.1) ** 2 for x in d) / 99 / 100)
    assert screened["steady"]["drop_lower"] == pytest.approx(0.1 - 1.6448536 * se)
    assert screened["steady"]["drop_lower"] > 0.03 >= screened["noisy"]["drop_lower"]
    assert res.best.candidate.name == "noisy"  # the most compressed, and within tau at 400 documents
    assert any("1 pruned (lower 0.95 bound beyond tau+0)" in line for line in logged)
    # an explicit margin is added to the lower bound
    calls.clear()
    search(cands, evaluate, tolerance=0.03, limits=(100, 400), objective="params", eta=1.01, confidence=0.95, prune_margin=0.05)
    assert {n for n, lim in calls if lim == 400} == {"dense", "noisy", "steady", "exact"}
    with pytest.raises(SpecError, match="prune_margin=-0.1 is invalid"):
        search(cands, evaluate, tolerance=0.03, limits=(100, 400), prune_margin=-0.1)


def test_paired_bounds_over_two_tasks_mean_and_max() -> None:
    from lm_eval_lowrank.search import paired_drop_bounds

    def row(scores: dict[str, list[float]]) -> dict:
        return {"accuracy": {t: sum(s) / len(s) for t, s in scores.items()}, "doc_scores": {t: [[i, f"h{i}", v] for i, v in enumerate(s)] for t, s in scores.items()}}

    dense = {"a": [1.0] * 50 + [0.0] * 50, "b": [1.0] * 50 + [0.0] * 50}
    comp = {"a": _flip(dense["a"], 10, 0), "b": _flip(dense["b"], 20, 16)}  # drops 0.10 (steady) and 0.04 (noisy)

    def se(lose: int, gain: int) -> float:
        d = [1.0] * lose + [-1.0] * gain + [0.0] * (100 - lose - gain)
        m = sum(d) / 100
        return math.sqrt(sum((x - m) ** 2 for x in d) / 99 / 100)

    z = 1.6448536
    sa, sb = se(10, 0), se(20, 16)
    (lo, up, s), why = paired_drop_bounds(row(dense), row(comp), "mean", z)
    assert why is None and s == pytest.approx(math.hypot(sa, sb) / 2)
    assert (lo, up) == (pytest.approx(0.07 - z * s), pytest.approx(0.07 + z * s))
    (lo, up, s), _ = paired_drop_bounds(row(dense), row(comp), "max", z)
    z2 = 1.9599640  # the lower bound is a union over the 2 tasks: each at 1 - 0.05/2 (Bonferroni)
    assert lo == pytest.approx(max(0.10 - z2 * sa, 0.04 - z2 * sb))
    assert up == pytest.approx(max(0.10 + z * sa, 0.04 + z * sb)) and s == pytest.approx(sa if 0.10 + z * sa > 0.04 + z * sb else sb)
    bounds, why = paired_drop_bounds(row(dense), {"accuracy": {"a": 0.4, "b": 0.46}}, "mean", z)
    assert bounds is None and why.startswith("a: no per-document scores")


def test_candidates_cross_several_methods_for_one_search() -> None:
    one = default_candidates(30, ranks=(8,), max_k=2, table4=False)
    both = default_candidates(30, ranks=(8,), max_k=2, table4=False, method=("tucker", "asvd", "tucker"))
    assert len(both) == 2 * len(one) and len({c.name for c in both}) == len(both)  # tucker once, names distinct
    assert [c.spec for c in both[: len(one)]] == [c.spec for c in one]  # tucker: no method argument at all
    assert all(c.spec["method"] == "asvd" and c.name.startswith("asvd r8 ") for c in both[len(one):])
    assert [c.name for c in default_candidates(30, ranks=(8,), max_k=2, table4=False, method="asvd")] == [c.name for c in both[len(one):]]
    with pytest.raises(SpecError, match="at least one method"):
        default_candidates(30, ranks=(8,), method=())


def test_family_wise_spreads_the_level_over_a_rungs_candidates() -> None:
    """Ten candidates, each 4 answers lost of 200: upper 95 % bound +0.036, within 0.04. Over ten of them, each bound
    at 1 - 0.05 / 10 = 0.995 is +0.046: none is shown within tolerance for all ten at once."""
    dense = [1.0] * 100 + [0.0] * 100
    steady = [0.0] * 4 + [1.0] * 96 + [0.0] * 100
    rows = {"dense": _paired_row(0.5, dense, 0.0), **{f"c{i}": _paired_row(0.48, steady, 0.01 * (i + 1)) for i in range(10)}}

    def evaluate(spec, limit, phase="", label=""):
        return rows[spec.get("name", "dense")]

    cands = [Candidate(n, {"name": n}) for n in rows if n != "dense"]
    plain = search(cands, evaluate, tolerance=0.04, limits=(200,), objective="params", confidence=0.95)
    assert len(plain.feasible) == 10 and plain.best.candidate.name == "c9"
    logged: list[str] = []
    fw = search(cands, evaluate, tolerance=0.04, limits=(200,), objective="params", confidence=0.95, family_wise=True, log=logged.append)
    assert fw.feasible == [] and fw.best.candidate is DENSE
    se = fw.final[1].row["drop_stderr"]
    assert fw.final[1].row["drop_upper"] == pytest.approx(0.02 + 2.5758293 * se)
    assert "rung 0 (limit=200): 10 candidates, each bound at 0.995 (family-wise 0.95)" in logged
    # one candidate: family-wise changes nothing
    one = search(cands[:1], evaluate, tolerance=0.04, limits=(200,), objective="params", confidence=0.95, family_wise=True)
    assert [e.candidate.name for e in one.feasible] == ["c0"]
    with pytest.raises(SpecError, match="family_wise needs a confidence level"):
        search(cands, evaluate, tolerance=0.04, limits=(200,), family_wise=True)


def _timed_row(reduction: float, factor: float, rng: random.Random, calls: int = 60) -> dict:
    """A feasible row whose 60 timed calls run ``factor`` times a shared base, each with 5 % noise of its own."""
    base = [0.1 * (1 + 0.3 * math.sin(i)) for i in range(calls)]
    seconds = [b * factor * (1 + rng.gauss(0, 0.05)) for b in base]
    row = _row(0.6, reduction, sum(seconds) / (100 * calls))
    row["latency_calls"] = {"per_call_seconds": seconds, "per_call_tokens": [100] * calls}
    return row


def test_latency_ties_are_paired_and_params_breaks_them() -> None:
    """A and B differ by 1 % of latency in 5 %-noisy calls: tied, whichever reads faster. C is 40 % slower: not
    tied. The default keeps the fastest reading; tie_break=params takes B, more compressed and within the noise,
    never C."""
    rng = random.Random(7)
    rows = {"dense": _timed_row(0.0, 1.0, rng), "a": _timed_row(0.05, 0.90, rng), "b": _timed_row(0.10, 0.91, rng), "c": _timed_row(0.20, 1.26, rng)}

    def evaluate(spec, limit, phase="", label=""):
        return rows[spec.get("name", "dense")]

    cands = [Candidate(n, {"name": n}) for n in ("a", "b", "c")]
    res = search(cands, evaluate, tolerance=0.01, limits=(50,), objective="latency")
    assert res.fastest is not None and res.best is res.fastest
    assert res.fastest.row["seconds_per_token"] == min(rows[n]["seconds_per_token"] for n in "abc")
    assert {res.fastest.candidate.name, *(e.candidate.name for e, _ in res.latency_ties)} == {"a", "b"}
    (_, tie), = res.latency_ties
    assert tie.lower <= 1.0 <= tie.upper and tie.ratio >= 1.0 and tie.calls == 60
    vs = res.latency_vs_dense
    assert isinstance(vs, LatencyRatio) and vs.upper < 1.0 and vs.lower <= 0.91 and vs.upper >= 0.90
    by_params = search(cands, evaluate, tolerance=0.01, limits=(50,), objective="latency", tie_break="params")
    assert by_params.best.candidate.name == "b" and by_params.fastest is not None
    assert isinstance(by_params.latency_vs_dense, LatencyRatio)
    # ties and the tie-break are about timings: another objective leaves the choice alone, and says so
    on_params = search(cands, evaluate, tolerance=0.01, limits=(50,), objective="params", tie_break="params")
    assert on_params.best.candidate.name == "c" and not on_params.latency_ties
    assert any("tie_break=params applies to the latency objective" in n for n in on_params.notes)
    # rows stored before the per-call timings: no ties, and a note saying why
    for r in rows.values():
        r["latency_calls"] = None
    old = search(cands, evaluate, tolerance=0.01, limits=(50,), objective="latency", tie_break="params")
    assert old.best is old.fastest and not old.latency_ties and isinstance(old.latency_vs_dense, str)
    assert any("latency ties not checked for 2 candidate(s)" in n and "no per-call timings" in n for n in old.notes)
    with pytest.raises(SpecError, match="tie_break='fast' is invalid: valid: objective, params"):
        search(cands, evaluate, tolerance=0.01, tie_break="fast")


def test_screening_lets_candidates_tied_with_the_cut_go_on() -> None:
    """Four feasible candidates, eta 2: two go on by their readings. A third within 1 % of the cut (5 %-noisy
    calls) goes on too, at most doubling the rung; one 40 % slower does not. Latencies far apart prune as before."""
    rng = random.Random(3)
    rows = {"dense": _timed_row(0.0, 1.0, rng), "a": _timed_row(0.05, 0.90, rng), "b": _timed_row(0.06, 0.905, rng), "c": _timed_row(0.07, 0.91, rng), "d": _timed_row(0.2, 1.26, rng)}
    seen: dict[int, list[str]] = {}

    def evaluate(spec, limit, phase="", label=""):
        seen.setdefault(limit, []).append(spec.get("name", "dense"))
        return rows[spec.get("name", "dense")]

    cands = [Candidate(n, {"name": n}) for n in "abcd"]
    logged: list[str] = []
    search(cands, evaluate, tolerance=0.01, limits=(10, 50), objective="latency", eta=2, log=logged.append)
    assert sorted(seen[50]) == ["a", "b", "c", "dense"]
    assert any("1 of them read slower than the cut" in line for line in logged), logged
    spread = {"dense": rows["dense"], "a": _timed_row(0.05, 0.6, rng), "b": _timed_row(0.06, 0.8, rng), "c": _timed_row(0.07, 1.0, rng), "d": _timed_row(0.2, 1.2, rng)}
    rows.update(spread)
    seen.clear()
    search(cands, evaluate, tolerance=0.01, limits=(10, 50), objective="latency", eta=2)
    assert sorted(seen[50]) == ["a", "b", "dense"]
    seen.clear()
    search(cands, evaluate, tolerance=0.01, limits=(10, 50), objective="params", eta=2)  # no timings in the ranking
    assert len(seen[50]) == 3


def test_max_aggregate_screening_prunes_a_feasible_candidate_at_most_one_minus_level() -> None:
    """With aggregate=max any task's lower bound beyond tau prunes: a union over the tasks. A candidate losing
    exactly tau on each of 6 tasks is within tolerance, so at 95 % it must be pruned in at most about 5 % of
    searches (bounds at the plain level per task pruned about 23 %)."""
    rng = random.Random(1234)
    tasks, docs, tau, trials = 6, 200, 0.10, 300

    def one_search() -> bool:
        dense: dict = {"status": "ok", "accuracy": {}, "doc_scores": {}, "seconds_per_token": 1.0}
        cand: dict = {"status": "ok", "accuracy": {}, "doc_scores": {}, "seconds_per_token": 0.5, "param_reduction": 0.1}
        for t in range(tasks):
            b = [1.0 if rng.random() < 0.7 else 0.0 for _ in range(docs)]
            c = [0.0 if x == 1.0 and rng.random() < tau / 0.7 else x for x in b]  # expected drop: exactly tau
            for row, scores in ((dense, b), (cand, c)):
                row["accuracy"][f"t{t}"] = sum(scores) / docs
                row["doc_scores"][f"t{t}"] = [[i, f"h{i}", v] for i, v in enumerate(scores)]
        res = search([Candidate("c", {"rank": "8"})], lambda spec, limit, **kw: cand if spec else dense, tolerance=tau, limits=(docs, docs + 1), objective="latency", aggregate="max", confidence=0.95)  # the rows ignore the limit
        return not any(e.candidate.name == "c" and e.rung == 1 for e in res.history)  # pruned at screening

    rate = sum(one_search() for _ in range(trials)) / trials
    assert rate <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials), rate  # the promise, with room for the draw


def test_a_missing_cost_never_makes_a_candidate_win() -> None:
    """A row without params_after or memory_bytes costs inf, as one without latency does, not 0."""
    for objective, field in (("params", "params_after"), ("memory", "memory_bytes"), ("latency", "seconds_per_token")):
        assert objective_value({**_row(0.5, 0.1, 2.0), field: None}, objective) == (math.inf, objective)
    assert objective_value({**_row(0.5, 0.1, 2.0), "memory_bytes": 0}, "memory") == (0.0, "memory")  # 0 is a value
    rows = {"dense": _row(0.60, 0.0, 1.0), "measured": _row(0.60, 0.05, 1.0), "unmeasured": _row(0.60, 0.02, 1.0)}
    for objective, field in (("params", "params_after"), ("memory", "memory_bytes")):
        rows["unmeasured"] = {**_row(0.60, 0.02, 1.0), field: None}
        cands = [Candidate(n, {"name": n}) for n in ("unmeasured", "measured")]
        res = search(cands, lambda spec, limit, **kw: rows[spec.get("name", "dense")], tolerance=0.01, limits=(50,), objective=objective)
        assert res.best.candidate.name == "measured", objective


def test_limits_must_ascend(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Screening on 50 documents and deciding feasibility on 10 is upside down, and a repeated rung would halve again
    on documents already scored: both refused by the core and the CLI."""
    from click.testing import CliRunner

    from lm_eval_lowrank import sweep as sweep_mod
    from lm_eval_lowrank.cli import cli

    ev = _evaluator([])
    with pytest.raises(SpecError, match=r"limits=\[50, 10\] is invalid: give documents per rung in strictly ascending order"):
        search(_cands(), ev, 0.03, limits=(50, 10))
    with pytest.raises(SpecError, match="ascending"):
        search(_cands(), ev, 0.03, limits=(None, 10))  # None = every document
    for repeated in ((10, 10, 50), (10, None, None)):
        with pytest.raises(SpecError, match="strictly ascending"):
            search(_cands(), ev, 0.03, limits=repeated)
    assert search(_cands(), ev, 0.03, limits=(10, 50)).best.limit == 50  # ascending: fine
    store = str(tmp_path / "s.jsonl")
    res = CliRunner().invoke(cli, ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", store, "--limits", "50,10"])
    assert res.exit_code == 2 and "'--limits'" in res.output and "ascend" in res.output and "10,50" in res.output, res.output
    assert "Usage:" not in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", store, "--limits", "10,10,50"])
    assert res.exit_code == 2 and "'--limits'" in res.output and "strictly ascend" in res.output, res.output

    def reached(model: str):  # an ascending list gets past the check, to the model
        raise RuntimeError("reached model_info")

    monkeypatch.setattr(sweep_mod, "model_info", reached)
    ok = CliRunner().invoke(cli, ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", store, "--limits", "10,20,50"])
    assert isinstance(ok.exception, RuntimeError) and str(ok.exception) == "reached model_info", ok.output


# -- review fixes ---------------------------------------------------------------------------------
def test_energy_objective_falls_back_for_every_row_compared_when_one_lacks_energy() -> None:
    """B's energy counter failed: its seconds per token must not compete with the others' seconds x joules. Every
    row of the rung is then ranked on latency, and the note names the row without energy."""
    rows = {
        "dense": _row(0.60, 0.0, 0.020, 2.0),
        "a": _row(0.60, 0.2, 0.010, 2.0),  # the fastest
        "b": _row(0.60, 0.1, 0.015),  # slower, no energy reading
    }
    logged: list[str] = []
    cands = [Candidate(n, {"name": n}) for n in ("a", "b")]
    res = search(cands, lambda spec, limit, **kw: rows[spec.get("name", "dense")], 0.03, limits=(10,), objective="latency*energy", log=logged.append)
    assert res.best.candidate.name == "a" and res.objective_used == "latency"
    assert {e.candidate.name: e.objective for e in res.final} == {"dense": 0.020, "a": 0.010, "b": 0.015}
    assert any(n.startswith("energy unavailable at limit=10 for b: the objective falls back to latency") for n in res.notes), res.notes
    assert any("no energy reading for b: every row of this rung is ranked on latency" in line for line in logged)
    # every row with energy: the product, as asked
    rows["b"] = _row(0.60, 0.1, 0.015, 1.0)
    both = search(cands, lambda spec, limit, **kw: rows[spec.get("name", "dense")], 0.03, limits=(10,), objective="latency*energy")
    assert both.best.candidate.name == "b" and both.objective_used == "latency*energy" and not any("energy" in n for n in both.notes)
    # the dense row lacks energy: latency for all, even at a screening rung
    rows["dense"] = _row(0.60, 0.0, 0.020)
    screened = search(cands, lambda spec, limit, **kw: rows[spec.get("name", "dense")], 0.03, limits=(5, 10), objective="energy", eta=1.5)
    assert [e.objective for e in screened.history if e.limit == 5] == [0.020, 0.010, 0.015]
    assert screened.best.candidate.name == "a"


def test_search_keeps_dense_when_it_is_cheaper_than_every_feasible_candidate() -> None:
    """The space holds the dense model (the +1 of |S|), which always meets the tolerance: a feasible candidate slower
    than dense is no answer. The cheapest candidate is kept in the result to show by how much."""
    rows = {"dense": _row(0.60, 0.0, 0.010, 1.0), "keep0.9": _row(0.60, 0.01, 0.014, 1.3), "keep0.8": _row(0.60, 0.02, 0.016, 1.3)}
    cands = [Candidate(n, {"name": n}) for n in ("keep0.9", "keep0.8")]
    res = search(cands, lambda spec, limit, **kw: rows[spec.get("name", "dense")], 0.03, limits=(10,), objective="latency*energy")
    assert res.best.candidate is DENSE and res.fastest is res.dense
    assert res.cheapest_candidate is not None and res.cheapest_candidate.candidate.name == "keep0.9"
    assert len(res.feasible) == 2
    assert any(n.startswith("dense is cheaper than every feasible candidate (latency*energy 0.01 against 0.0182 for the cheapest, keep0.9)") and n.endswith("keep the dense model") for n in res.notes), res.notes
    rows["keep0.8"] = _row(0.60, 0.02, 0.005, 1.0)  # cheaper than dense: chosen as before
    assert search(cands, lambda spec, limit, **kw: rows[spec.get("name", "dense")], 0.03, limits=(10,), objective="latency*energy").best.candidate.name == "keep0.8"


def test_a_candidate_tied_with_a_faster_dense_is_what_tie_break_params_picks() -> None:
    """Dense reads fastest, a candidate 1 % slower in 5 %-noisy calls: tied. The default keeps dense and lists the
    tie; tie_break=params takes the compressed one, as it does among candidates."""
    rng = random.Random(11)
    rows = {"dense": _timed_row(0.0, 0.90, rng), "a": _timed_row(0.05, 0.91, rng), "slow": _timed_row(0.10, 1.30, rng)}
    assert rows["dense"]["seconds_per_token"] < rows["a"]["seconds_per_token"]

    def evaluate(spec, limit, phase="", label=""):
        return rows[spec.get("name", "dense")]

    cands = [Candidate(n, {"name": n}) for n in ("a", "slow")]
    res = search(cands, evaluate, tolerance=0.01, limits=(50,), objective="latency")
    assert res.best is res.dense is res.fastest and [e.candidate.name for e, _ in res.latency_ties] == ["a"]
    assert res.cheapest_candidate is not None and res.cheapest_candidate.candidate.name == "a"
    assert isinstance(res.latency_vs_dense, LatencyRatio) and res.latency_vs_dense.lower <= 1.0  # a's, against dense
    by_params = search(cands, evaluate, tolerance=0.01, limits=(50,), objective="latency", tie_break="params")
    assert by_params.best.candidate.name == "a" and by_params.fastest is by_params.dense


@pytest.mark.parametrize("field", ["tolerance", "eta", "prune_margin"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_search_refuses_values_that_are_not_finite(field: str, value: float) -> None:
    kw = {"tolerance": 0.03, "eta": 3.0, "prune_margin": 0.1, field: value}
    calls: list = []
    with pytest.raises(SpecError, match=rf"^{field}={value:g} is invalid: expected a finite"):
        search(_cands(), _evaluator(calls), kw.pop("tolerance"), limits=(10, 50), **kw)
    assert calls == []  # before any evaluation


@pytest.mark.parametrize("option", ["--tolerance", "--eta", "--prune-margin"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_search_cli_refuses_values_that_are_not_finite(tmp_path, option: str, value: str) -> None:
    from click.testing import CliRunner

    from lm_eval_lowrank.cli import cli

    res = CliRunner().invoke(cli, ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(tmp_path / "s.jsonl"), option, value])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and f"'{option}'" in lines[0] and "finite" in lines[0], res.output


def _fake_search_runs(monkeypatch: pytest.MonkeyPatch, rows: dict) -> None:
    """Runner rows by label (nothing loads); lm-eval knows arc_easy_local."""
    from lm_eval_lowrank.sweep import Runner

    class Tasks:
        all_tasks = ["arc_easy_local"]

    def fake_run(self, key, spec_args, limit, label, phase, meta):
        name = "dense" if not spec_args else "candidate"
        return {"key": key, "label": label, "device": self.device, "batch_size": str(self.batch_size), **rows[name]}

    monkeypatch.setattr(Runner, "_run", fake_run)
    monkeypatch.setattr(Runner, "task_manager", lambda self: Tasks())


def test_search_cli_reports_dense_beating_every_feasible_candidate(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from lm_eval_lowrank.cli import cli

    _fake_search_runs(monkeypatch, {"dense": _row(0.60, 0.0, 0.010), "candidate": _row(0.60, 0.01, 0.014)})
    res = CliRunner().invoke(cli, ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(tmp_path / "s.jsonl"),
                                   "--objective", "latency", "--ranks", "8", "--max-k", "1", "--no-table4", "--limits", "5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "chosen: dense (no decomposition)" in lines
    assert any(x.startswith("cheapest feasible candidate: r8 spread1 [17]: drop +0.0 pts, parameter reduction 1.00%, objective 0.014 (dense 0.01)") for x in lines), res.output
    assert any(x.startswith("note: dense is cheaper than every feasible candidate") for x in lines)
    assert "--model_args 'pretrained=meta-llama/Llama-2-7b-hf'" in lines


def test_search_cli_a_failed_dense_baseline_is_one_error_line(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from lm_eval_lowrank.cli import cli
    from lm_eval_lowrank.search import BaselineError

    failed = {"status": "error", "error": "OutOfMemoryError: CUDA out of memory.\nTried to allocate 2.00 GiB"}
    _fake_search_runs(monkeypatch, {"dense": failed, "candidate": _row(0.60, 0.01, 0.014)})
    res = CliRunner().invoke(cli, ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(tmp_path / "s.jsonl"),
                                   "--ranks", "8", "--max-k", "1", "--no-table4", "--limits", "5"])  # fmt: skip
    assert res.exit_code == 1 and "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    assert res.output.strip().splitlines()[-1] == "Error: the dense baseline failed at limit=5, so no candidate can be compared with it: OutOfMemoryError: CUDA out of memory."
    with pytest.raises(BaselineError):  # a RuntimeError, as before, for callers of the library
        search(_cands(), lambda spec, limit, **kw: failed, 0.03, limits=(10,))


@pytest.mark.parametrize("value", ["1.5", "3"])
def test_a_tolerance_above_a_whole_accuracy_is_refused(tmp_path, value: str) -> None:
    """--tolerance 3 (meant as 3 points) made every candidate feasible without a word."""
    from click.testing import CliRunner

    from lm_eval_lowrank.cli import cli
    from lm_eval_lowrank.search import search

    res = CliRunner().invoke(cli, ["search", "--model", "meta-llama/Llama-2-7b-hf", "--tasks", "arc_easy_local", "--store", str(tmp_path / "s.jsonl"), "--tolerance", value])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "'--tolerance'" in lines[0] and "0.03 = 3 points" in lines[0], res.output
    with pytest.raises(SpecError, match=r"^tolerance=.* is invalid: expected a finite drop in accuracy, 0 <= x <= 1"):
        search([], lambda *a, **k: {}, tolerance=float(value), limits=(10,))
