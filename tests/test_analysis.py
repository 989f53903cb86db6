"""Structural analysis: spectrum measures on known matrices, the analyze command, the heat map."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lm_eval_lowrank import analysis as A


def test_measures_on_known_spectra():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    e = A.energy_at(s, [1, 2, 4, 10])
    assert e[1] == pytest.approx(9 / 14) and e[2] == pytest.approx(13 / 14) and e[4] == 1.0 and e[10] == 1.0
    assert A.rank_for_energy(s, 0.9) == 2 and A.rank_for_energy(s, 0.95) == 3 and A.rank_for_energy(s, 13 / 14) == 2
    assert A.stable_rank(s) == pytest.approx(14 / 9)
    assert A.effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert A.effective_rank(torch.tensor([2.0, 0, 0])) == pytest.approx(1.0)
    assert A.stable_rank(torch.zeros(3)) == 0.0 and A.rank_for_energy(torch.zeros(3), 0.9) == 0
    with pytest.raises(ValueError, match="level=1.5 is invalid"):
        A.rank_for_energy(s, 1.5)


def test_weight_summary_low_rank_and_sparse():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)
    summ = A.analyze_weight(W, ranks=(1, 3, 8))
    assert summ.rank_for["99"] <= 3 and summ.energy[3] == pytest.approx(1.0, abs=1e-9)
    assert summ.shape == (30, 20) and len(summ.spectrum) == 20
    S = torch.zeros(10, 10)
    S[0, 0], S[1, 1] = 1.0, 1e-5
    assert A.sparsity(S, eps=1e-3) == pytest.approx(99 / 100)
    d = summ.to_dict(with_spectrum=False)
    assert "spectrum" not in d and d["energy"]["3"] == pytest.approx(1.0, abs=1e-9)


def test_activation_spectrum_equals_output_singular_values():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 12, generator=g)
    X = torch.randn(200, 12, generator=g) * torch.logspace(0, -2, 12)
    for Wm in (W, W.mT.contiguous()):  # out <= in and out > in paths
        Xm = X if Wm.shape[1] == 12 else torch.randn(200, 16, generator=g)
        C = Xm.mT.double() @ Xm.double() / 200
        ref = torch.linalg.svdvals(Wm.double() @ Xm.double().mT) / math.sqrt(200)
        got = A.output_singular_values(Wm, C)
        assert torch.allclose(got, ref[: len(got)], rtol=1e-6, atol=1e-8)


def test_table_and_heatmap_matrix():
    res = {
        1: {"q": {"weights": A.analyze_weight(torch.eye(4)).to_dict()}, "k": {"weights": A.analyze_weight(torch.ones(4, 2)).to_dict()}},
        2: {"q": {"weights": A.analyze_weight(torch.diag(torch.tensor([1.0, 0, 0, 0]))).to_dict()}},
    }
    rows = A.table_rows(res)
    assert [r[:3] for r in rows] == [["1", "q", "4x4"], ["1", "k", "4x2"], ["2", "q", "4x4"]]
    md = A.format_table(rows)
    assert md.splitlines()[0].startswith("| layer | tensor") and md.count("\n") == 4
    txt = A.format_table(rows, markdown=False)
    assert "r@95%" in txt.splitlines()[0] and "|" not in txt
    layers, tensors, grid = A.heatmap_matrix(res, "r95_frac")
    assert layers == [1, 2] and tensors == ["q", "k"]
    assert grid[0] == [1.0, 0.5] and grid[1][0] == 0.25 and math.isnan(grid[1][1])
    with pytest.raises(ValueError, match="metric='bogus' is invalid"):
        A.heatmap_matrix(res, "bogus")


def test_heatmap_with_activations_draws_weights_and_activations_on_one_scale(tmp_path, monkeypatch):
    """`analyze --activations --heatmap` drew the activations alone; the point of the flag is the comparison
    (weights are not low-rank, their outputs are), so both panels are drawn, on one colour scale."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lm_eval_lowrank.cli.analyze import write_heatmap

    low = torch.diag(torch.tensor([1.0, 0.01, 0.01, 0.01]))
    res = {L: {"q": {"weights": A.analyze_weight(torch.eye(4)).to_dict(), "activations": A.analyze_weight(low).to_dict()}} for L in (1, 2)}
    seen: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (seen.append(fig), save(fig, *a, **k))[1])
    png = tmp_path / "h.png"
    write_heatmap(res, str(png), "r95_frac", ("weights", "activations"), "m: r95_frac")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = [ax for ax in seen[0].axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["weights", "activations"]
    grids = [ax.images[0].get_array().tolist() for ax in panels]
    assert grids == [[[1.0], [1.0]], [[0.25], [0.25]]]  # full rank for 95 % against one direction of four
    assert panels[0].images[0].get_clim() == panels[1].images[0].get_clim() == (0.25, 1.0)


def test_analyze_model_with_activations(tiny_llama):
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import SequentialStatsProvider
    from lm_eval_lowrank.cli.analyze import analyze_model

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    prov = SequentialStatsProvider(tiny_llama, adapter_for_model(tiny_llama), ids, batch_size=2, track_sparsity=1e-3)
    res = analyze_model(tiny_llama, layers="1|3", tensors="q|down", ranks=(1, 4), provider=prov)
    assert sorted(res) == [1, 3] and list(res[1]) == ["q", "down"]
    act = res[3]["down"]["activations"]
    assert act["shape"] == [64, 160] and 0 <= act["sparsity"] <= 1 and act["rank_for"]["99"] >= 1
    assert res[1]["q"]["weights"]["energy"]["4"] < 1.0


def test_analyze_cli(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli import cli

    tiny_llama.save_pretrained(tmp_path / "m")
    png, js = tmp_path / "heat.png", tmp_path / "a.json"
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "m"), "--layers", "1-2", "--json", str(js), "--heatmap", str(png), "--format", "text"])
    assert r.exit_code == 0, r.output
    assert "eff. rank" in r.output and "gate" in r.output
    doc = json.loads(js.read_text())
    assert set(doc["layers"]) == {"1", "2"} and len(doc["layers"]["1"]["up"]["weights"]["spectrum"]) == 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(cli, ["analyze", str(tmp_path / "m"), "--layers", "9"])
    assert bad.exit_code != 0 and "layer 9 is past the end" in str(bad.exception or bad.output)


def test_analyze_bad_options_are_one_line_usage_errors(tmp_path):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli import cli

    (tmp_path / "m").mkdir()  # never loaded: the options fail first
    for args, line in (
        (["--ranks", "1,x"], "Error: Invalid value for '--ranks': '1,x': expected ints joined by ',' (e.g. 1,8,32,128)"),
        (["--metric", "rank"], "Error: Invalid value for '--metric': 'rank': valid r95_frac, r90_frac, r99_frac, effective_rank_frac, stable_rank, sparsity"),
        (["--dtype", "fp8"], "Error: Invalid value for '--dtype': 'fp8': expected float32, bfloat16 or float16"),
    ):
        r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "m"), *args])
        assert r.exit_code == 2 and r.output.strip() == line, r.output
    # A missing local folder: one line, not transformers' "Repo id must use alphanumeric chars".
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "missing")])
    assert r.exit_code != 0 and f"MODEL='{tmp_path / 'missing'}' is invalid: no such local file or folder" in str(r.exception or r.output)
