"""The side-by-side table of hf-tucker runs (demo step 5)."""

from __future__ import annotations

import json

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
    assert r.exit_code != 0 and "not an lm-eval results file" in r.output


def test_compare_keeps_the_energy_reason_short(tmp_path):
    low = _low(["m"], 0.0787, 1.8, {"available": False, "reason": "no GPU in use, and no RAPL counters (/sys/class/powercap/intel-rapl:*)"})
    r = CliRunner().invoke(cli, ["compare", str(_write(tmp_path / "c.json", 0.4, low))])
    assert r.exit_code == 0, r.output
    row = {ln.split("|")[1].strip(): ln.split("|")[2].strip() for ln in r.output.splitlines()[2:]}
    assert row["energy"] == "n/a: no GPU in use, and no RAPL counters"  # the path stays in the JSON
