"""The side-by-side table of hf-tucker runs (demo step 5)."""

from __future__ import annotations

import json
import math
import statistics

from click.testing import CliRunner

from lm_eval_lowrank.cli import cli


def _write(path, acc, low):
    path.write_text(json.dumps({"results": {"arc_easy_local": {"alias": "arc_easy_local", "acc,none": acc, "acc_norm,none": acc + 0.01}}, "config": {"lowrank": low}}))
    return path


def _low(modules, reduction, seconds, energy):
    return {
        "decomposition": {"method": "tucker" if modules else None, "rank": 1 if modules else None, "layers": [3, 15] if modules else [], "modules": modules, "params_after": 100, "param_reduction": reduction, "decomposition_seconds": 0.5},
        "latency": {"total_seconds": seconds, "mean_seconds_per_batch": seconds / 4, "tokens_per_second": 400 / seconds},
        "energy": energy,
        "memory": {"kind": "process_peak_rss", "bytes": 2**30},
    }


def test_compare_lines_up_accuracy_and_efficiency(tmp_path):
    dense = _write(tmp_path / "d.json", 0.5, _low([], 0.0, 2.0, {"available": False, "reason": "no CUDA GPU visible"}))
    comp = _write(tmp_path / "c.json", 0.4, _low(["m"], 0.0787, 1.8, {"available": True, "method": "rapl_energy_counter", "total_joules": 12.5, "joules_per_token": 0.03}))
    r = CliRunner().invoke(cli, ["compare", str(dense), str(comp)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split("|")[2].strip() == "dense" and lines[0].split("|")[3].strip() == "tucker r=1 L=3,15"
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in lines[2:]}
    assert row["arc_easy_local acc_norm"] == ["0.5100", "0.4100"]
    assert row["param reduction"] == ["0.00 %", "7.87 %"]
    assert row["tokens/s"] == ["200.0", "222.2"]
    assert row["energy"] == ["n/a: no CUDA GPU visible", "12.5 J (CPU, RAPL)"]  # says what was measured
    assert row["energy per token"] == ["n/a", "0.0300 J (CPU, RAPL)"]
    assert row["decomposition time"] == ["none", "0.50 s"]


def test_compare_says_when_the_decomposition_came_from_the_cache(tmp_path):
    low = _low(["m"], 0.0787, 1.8, {"available": False, "reason": "no CUDA GPU visible"})
    low["decomposition"].update(decomposition_seconds=0.0029, cache={"enabled": True, "hit": True, "original_decomposition_seconds": 0.0878})
    comp = _write(tmp_path / "c.json", 0.4, low)
    r = CliRunner().invoke(cli, ["compare", str(comp)])
    assert r.exit_code == 0, r.output
    row = {ln.split("|")[1].strip(): ln.split("|")[2].strip() for ln in r.output.splitlines()[2:]}
    assert row["decomposition time"] == "0.003 s (cache hit; computed in 0.09 s)"


def test_compare_rejects_a_foreign_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    r = CliRunner().invoke(cli, ["compare", str(bad)])
    assert r.exit_code == 2 and "not an lm-eval results file" in r.output


def test_compare_says_which_tasks_a_run_lacks_and_refuses_an_empty_task_list(tmp_path):
    """Runs of different tasks printed n/a cells and nothing else; --tasks '' showed every task."""
    low = _low(["m"], 0.05, 1.0, {"available": False, "reason": "cpu"})
    base = _write(tmp_path / "b.json", 0.5, low)
    other = tmp_path / "o.json"
    other.write_text(json.dumps({"results": {"boolq_local": {"alias": "boolq_local", "acc,none": 0.6}}, "config": {"lowrank": low}}))
    r = CliRunner().invoke(cli, ["compare", str(base), str(other)])
    assert r.exit_code == 0 and "note: run 2 (" in r.output and "has no results for arc_easy_local: its cells read n/a" in r.output, r.output
    for empty in ("", ","):
        r = CliRunner().invoke(cli, ["compare", str(base), "--tasks", empty])
        assert r.exit_code == 2 and r.output.strip().splitlines() == [f"Error: Invalid value for '--tasks': {empty!r} names no task; give names separated by ',' (or leave --tasks out for all)"]


def test_compare_keeps_the_energy_reason_short(tmp_path):
    low = _low(["m"], 0.0787, 1.8, {"available": False, "reason": "no GPU in use, and no RAPL counters (/sys/class/powercap/intel-rapl:*)"})
    r = CliRunner().invoke(cli, ["compare", str(_write(tmp_path / "c.json", 0.4, low))])
    assert r.exit_code == 0, r.output
    row = {ln.split("|")[1].strip(): ln.split("|")[2].strip() for ln in r.output.splitlines()[2:]}
    assert row["energy"] == "n/a: no GPU in use, and no RAPL counters"  # the path stays in the JSON


def _run_with_samples(folder, stamp: str, correct: list[int], stderr: float | None, low: dict, samples: bool = True):
    """An lm-eval output folder: results_<stamp>.json whose acc_norm is the mean of ``correct``, and the
    samples file ``--log_samples`` writes beside it (one 0/1 per document)."""
    folder.mkdir(parents=True)
    value = sum(correct) / len(correct)
    entry = {"alias": "arc_easy_local", "acc_norm,none": value}
    if stderr is not None:
        entry["acc_norm_stderr,none"] = stderr
    path = folder / f"results_{stamp}.json"
    path.write_text(json.dumps({"results": {"arc_easy_local": entry}, "higher_is_better": {"arc_easy_local": {"acc_norm": True}}, "config": {"lowrank": low}}))
    if samples:
        lines = [{"doc_id": i, "doc_hash": f"h{i}", "filter": "none", "acc_norm": float(v)} for i, v in enumerate(correct)]
        (folder / f"samples_arc_easy_local_{stamp}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_compare_gives_each_drop_an_interval_paired_when_samples_were_logged(tmp_path):
    """200 documents; the compressed run loses 4 the dense one had right: a drop of 0.02. With the samples files
    the 95 % interval is paired over the documents; without them it comes from the two stderrs."""
    dense_low = _low([], 0.0, 2.0, {"available": False, "reason": "no CUDA GPU visible"})
    comp_low = _low(["m"], 0.0787, 1.8, {"available": False, "reason": "no CUDA GPU visible"})
    dense = _run_with_samples(tmp_path / "dense", "2026-01-01T00-00-00.0", [1] * 100 + [0] * 100, 0.0354, dense_low)
    comp = _run_with_samples(tmp_path / "comp", "2026-01-02T00-00-00.0", [0] * 4 + [1] * 96 + [0] * 100, 0.0353, comp_low)

    def table(*extra: str) -> dict[str, list[str]]:
        r = CliRunner().invoke(cli, ["compare", str(dense), str(comp), *extra])
        assert r.exit_code == 0, r.output
        return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in r.output.splitlines()[2:]}

    d = [1.0] * 4 + [0.0] * 196
    paired = math.sqrt(sum((x - 0.02) ** 2 for x in d) / 199 / 200)
    rows = table()
    assert rows["arc_easy_local acc_norm"] == ["0.5000 ± 0.0354", "0.4800 ± 0.0353"]
    z = 1.959964
    assert rows["drop, 95% interval"] == ["-", f"+0.0200 [{0.02 - z * paired:+.4f}, {0.02 + z * paired:+.4f}] (paired, 200 docs)"]
    assert table("--confidence", "0.8")["drop, 80% interval"][1].startswith(f"+0.0200 [{0.02 - 1.281552 * paired:+.4f}")
    for folder in (tmp_path / "dense", tmp_path / "comp"):
        next(folder.glob("samples_*.jsonl")).unlink()
    unpaired = math.hypot(0.0354, 0.0353)
    assert table()["drop, 95% interval"][1] == f"+0.0200 [{0.02 - z * unpaired:+.4f}, {0.02 + z * unpaired:+.4f}] (unpaired)"


def test_compare_drop_follows_the_metric_direction_and_bad_levels_are_usage_errors(tmp_path):
    def run(folder, ppl: float):
        folder.mkdir()
        path = folder / "results.json"
        entry = {"alias": "wikitext_local", "word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"}
        path.write_text(json.dumps({"results": {"wikitext_local": entry}, "higher_is_better": {"wikitext_local": {"word_perplexity": False}}, "config": {"lowrank": {}}}))
        return path

    dense, comp = run(tmp_path / "d", 20.0), run(tmp_path / "c", 25.0)
    r = CliRunner().invoke(cli, ["compare", str(dense), str(comp)])
    assert r.exit_code == 0, r.output
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in r.output.splitlines()[2:]}
    assert rows["wikitext_local word_perplexity"] == ["20.0000", "25.0000"]  # "N/A" is no stderr
    assert rows["drop, 95% interval"] == ["-", "+5.0000"]  # higher perplexity is worse; no stderr, no interval
    bad = CliRunner().invoke(cli, ["compare", str(dense), str(comp), "--confidence", "1.5"])
    assert bad.exit_code == 2 and bad.output.strip() == "Error: Invalid value for '--confidence': 1.5 is not a level in (0, 1), e.g. 0.95"


def test_compare_gives_the_mean_drop_of_the_top_level_accuracies(tmp_path):
    """Two accuracies and a perplexity, plus a group with its subtasks: the mean is over the top-level accuracies
    only (the group counts once, its subtasks are in it; a perplexity is not an accuracy), with their errors added
    in quadrature."""

    def run(name: str, arc: float, boolq: float, mmlu: tuple[float, float], ppl: float):
        results = {
            "arc": {"alias": "arc", "acc,none": arc, "acc_stderr,none": 0.03},
            "boolq": {"alias": "boolq", "acc,none": boolq, "acc_stderr,none": 0.04},
            "mmlu": {"alias": "mmlu", "acc,none": sum(mmlu) / 2, "acc_stderr,none": 0.02},
            "mmlu_a": {"alias": "a", "acc,none": mmlu[0], "acc_stderr,none": 0.05},
            "mmlu_b": {"alias": "b", "acc,none": mmlu[1], "acc_stderr,none": 0.05},
            "wiki": {"alias": "wiki", "word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A"},
        }
        hib = {"arc": {"acc": True}, "boolq": {"acc": True}, "mmlu": {"acc": True}, "wiki": {"word_perplexity": False}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"results": results, "group_subtasks": {"mmlu": ["mmlu_a", "mmlu_b"]}, "higher_is_better": hib, "config": {}}))
        return str(path)

    dense, comp = run("d", 0.60, 0.70, (0.40, 0.50), 20.0), run("c", 0.50, 0.66, (0.30, 0.40), 30.0)
    r = CliRunner().invoke(cli, ["compare", dense, comp])
    assert r.exit_code == 0, r.output
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in r.output.splitlines()[2:]}
    mean = (0.10 + 0.04 + 0.10) / 3
    se = math.sqrt(2 * 0.03**2 + 2 * 0.04**2 + 2 * 0.02**2) / 3
    z = 1.959964
    assert rows["mean drop of the accuracies, 95% interval"] == ["-", f"{mean:+.4f} [{mean - z * se:+.4f}, {mean + z * se:+.4f}] (3 tasks, unpaired)"]
    # a single run: no drops, no mean
    alone = CliRunner().invoke(cli, ["compare", dense])
    assert "mean drop" not in alone.output


def _ar1_run(rng, base, ratio, phi, sd):
    """Per-call times: the batch's own cost, times the run's ratio, times slow stretches (AR(1) in log time)."""
    e, out = 0.0, []
    for b in base:
        e = phi * e + math.sqrt(1 - phi * phi) * rng.gauss(0, sd)
        out.append(b * ratio * math.exp(e))
    return out


def test_latency_ratio_interval_covers_the_true_ratio_under_slow_stretches():
    """400 batches whose noise is correlated over ~9 calls (lag-1 correlation 0.8), as on a shared machine.
    Taking the calls as independent, the 95 % interval covers the true 0.9 in under half of the runs."""
    import random

    from lm_eval_lowrank.latency_stats import latency_ratio

    rng = random.Random(1)
    hits, widths = 0, []
    for _ in range(200):
        base = sorted((rng.uniform(0.05, 0.5) for _ in range(400)), reverse=True)  # lm-eval runs the longest first
        tokens = list(range(400))
        ref = {"per_call_seconds": _ar1_run(rng, base, 1.0, 0.8, 0.15), "per_call_tokens": tokens}
        run = {"per_call_seconds": _ar1_run(rng, base, 0.9, 0.8, 0.15), "per_call_tokens": tokens}
        got = latency_ratio(ref, run, 0.95)
        assert got.calls == 400 and got.blocks == 7 and got.lower < got.ratio < got.upper
        hits += got.lower <= 0.9 <= got.upper
        widths.append(got.upper - got.lower)
    assert hits / 200 >= 0.88
    assert statistics.median(widths) < 0.2  # and still says something: 0.9 is told apart from 1


def test_latency_ratio_needs_the_same_batches_and_enough_of_them():
    from lm_eval_lowrank.latency_stats import latency_ratio, t_quantile

    same = {"per_call_seconds": [1.0] * 9, "per_call_tokens": [5] * 9}
    assert "different batches (9 and 9 calls)" in latency_ratio(same, {**same, "per_call_tokens": [5] * 8 + [6]})
    assert "too few" in latency_ratio({"per_call_seconds": [1.0] * 8, "per_call_tokens": [5] * 8}, {"per_call_seconds": [1.0] * 8, "per_call_tokens": [5] * 8})
    assert "no per-call timings" in latency_ratio({"total_seconds": 2.0}, same)
    exact = latency_ratio(same, {**same, "per_call_seconds": [0.5] * 9})
    assert (exact.ratio, exact.lower, exact.upper, exact.blocks) == (0.5, 0.5, 0.5, 3)
    # a run whose blocks swing wildly (a busy machine): the interval stays on ratios a time can have, >= 0
    wild = latency_ratio(same, {**same, "per_call_seconds": [0.1, 0.1, 0.1, 30.0, 30.0, 30.0, 0.1, 0.1, 0.1]})
    assert wild.lower == 0.0 and wild.upper > wild.ratio > 1
    # Student's t, exactly: the tabulated 97.5 % points for 1, 2 and 10 degrees of freedom.
    assert [round(t_quantile(0.95, df), 3) for df in (1, 2, 10)] == [12.706, 4.303, 2.228]


def test_compare_shows_percentiles_and_the_paired_latency_ratio(tmp_path):
    dense_low = _low([], 0.0, 2.0, {"available": False, "reason": "no CUDA GPU visible"})
    comp_low = _low(["m"], 0.0787, 1.8, {"available": False, "reason": "no CUDA GPU visible"})
    dense_low["latency"].update(per_call_seconds=[0.1 + 0.01 * (i % 3) for i in range(27)], per_call_tokens=list(range(27)), seconds_per_batch_percentiles={"p50": 0.11, "p90": 0.12, "p99": 0.12, "max": 0.12})
    comp_low["latency"].update(per_call_seconds=[0.9 * t * (1 + 0.02 * ((7 * i) % 5 - 2)) for i, t in enumerate(dense_low["latency"]["per_call_seconds"])], per_call_tokens=list(range(27)))
    ratio = sum(comp_low["latency"]["per_call_seconds"]) / sum(dense_low["latency"]["per_call_seconds"])
    dense, comp = _write(tmp_path / "d.json", 0.5, dense_low), _write(tmp_path / "c.json", 0.4, comp_low)
    r = CliRunner().invoke(cli, ["compare", str(dense), str(comp)])
    assert r.exit_code == 0, r.output
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in r.output.splitlines()[2:]}
    assert row["latency p50 / p90 per batch"] == ["110.0 / 120.0 ms", "n/a"]
    cell = row["latency ratio, 95% interval"][1]
    assert cell.startswith(f"{ratio:.3f} [") and cell.endswith("(paired, 27 batches)")
    lower, upper = (float(x) for x in cell.split("[")[1].split("]")[0].split(", "))
    assert 0.8 < lower < ratio < upper < 1.0


def test_compare_shows_a_missing_figure_as_na_not_zero(tmp_path):
    dense = _write(tmp_path / "d.json", 0.5, _low([], 0.0, 2.0, {"available": False, "reason": "no CUDA GPU visible"}))
    bare = _low(["m"], 0.0787, 1.8, {"available": False, "reason": "no CUDA GPU visible"})
    bare["latency"], bare["memory"] = {}, {}
    bare["decomposition"].pop("param_reduction")
    r = CliRunner().invoke(cli, ["compare", str(dense), str(_write(tmp_path / "c.json", 0.4, bare))])
    assert r.exit_code == 0, r.output
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in r.output.splitlines()[2:]}
    assert row["latency per batch"] == ["500.0 ms", "n/a"]
    assert row["forward latency (total)"] == ["2.00 s", "n/a"]
    assert row["peak memory"] == ["1024 MiB (process_peak_rss)", "n/a"]
    assert row["param reduction"] == ["0.00 %", "n/a"]
