"""Fisher-weighted whitening: the method as a tensor function, and the whole path with both statistics."""

from __future__ import annotations

import pytest
import torch

from lm_eval_lowrank.methods import LayerStats, get_method
from lm_eval_lowrank.spec import DecompositionSpec, SpecError


def _inputs(n: int = 400, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few large channels, as activations have."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    X[:, :3] *= 8.0
    return X


def _stats(X: torch.Tensor, f: torch.Tensor | None, P: torch.Tensor | None = None) -> LayerStats:
    return LayerStats(X.mT @ X / len(X), len(X), P, output_fisher=None if f is None else f.double())


def _err(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor, f: torch.Tensor) -> float:
    """||D (W - W_hat) X^T||_F^2 / N: the loss change of the K-FAC expansion with a diagonal output factor."""
    return float((f.double().sqrt()[:, None] * ((W.double() - W_hat.double()) @ X.mT)).square().sum()) / len(X)


@pytest.fixture
def weight():
    return torch.randn(48, 32, generator=torch.Generator().manual_seed(1))


def test_fwhiten_with_equal_row_weights_is_whiten(weight):
    fwhiten, whiten = get_method("fwhiten"), get_method("whiten")
    X = _inputs()
    for r in (1, 6):
        got = fwhiten(weight, r, _stats(X, torch.full((48,), 2.5)), solver="exact").dense()
        assert torch.allclose(got, whiten(weight, r, _stats(X, None), solver="exact").dense(), atol=1e-4)
    P = _stats(_inputs(seed=2), None).input_cov * 0.3 + _stats(X, None).input_cov * 0.7  # a cross-covariance
    got = fwhiten(weight, 4, _stats(X, torch.ones(48), P), solver="exact").dense()
    assert torch.allclose(got, whiten(weight, 4, _stats(X, None, P), solver="exact").dense(), atol=1e-4)


def test_fwhiten_is_the_best_rank_r_fit_of_the_weighted_output_error(weight):
    """The weighted output error is the tail of D W S's spectrum (Eckart-Young), below whiten's (inputs alone),
    fwsvd's (outputs alone) and plain SVD's; rows no gradient reached are floored and stay finite."""
    X = _inputs()
    f = torch.logspace(2, -2, 48, dtype=torch.float64)
    f[44:] = 0.0
    stats = _stats(X, f)
    S = torch.linalg.cholesky(stats.input_cov)
    d = f.clamp_min(1e-6 * float(f.mean())).sqrt()
    for r in (2, 8):
        got = get_method("fwhiten")(weight, r, stats, solver="exact")
        assert all(bool(torch.isfinite(t).all()) for t in (got.left, got.core, got.right))
        optimum = float(torch.linalg.svdvals(d[:, None] * weight.double() @ S)[r:].square().sum())
        mine = _err(weight, got.dense(), X, f)
        assert mine == pytest.approx(optimum, rel=1e-3, abs=1e-6)
        others = {
            "whiten": get_method("whiten")(weight, r, _stats(X, None), solver="exact"),
            "fwsvd": get_method("fwsvd")(weight, r, stats, solver="exact"),
            "tucker": get_method("tucker")(weight, r, solver="exact"),
        }
        for name, other in others.items():
            assert mine < 0.9 * _err(weight, other.dense(), X, f), name
    # the default (truncated) solver finds the same fit
    assert torch.allclose(get_method("fwhiten")(weight, 4, stats).dense(), get_method("fwhiten")(weight, 4, stats, solver="exact").dense(), atol=1e-3)


def test_fwhiten_against_the_dense_model_fits_its_outputs(weight):
    """With a cross-covariance P = X^T X_ref / N the fit is to the dense outputs X_ref W^T: over W_hat of rank r,
    ||D (W X_ref^T - W_hat X^T)||^2 is smallest at fwhiten's W_hat, below whiten's for the same P."""
    X = _inputs()
    X_ref = X + 0.3 * _inputs(seed=5)
    P = X.mT @ X_ref / len(X)
    f = torch.logspace(1, -1, 48, dtype=torch.float64)

    def err(W_hat: torch.Tensor) -> float:
        return float((f.sqrt()[:, None] * (weight.double() @ X_ref.mT - W_hat.double() @ X.mT)).square().sum())

    got = get_method("fwhiten")(weight, 4, _stats(X, f, P), solver="exact").dense()
    S = torch.linalg.cholesky(X.mT @ X / len(X))
    T = torch.linalg.solve_triangular(S, P @ weight.double().mT, upper=False).mT  # W P^T S^-T
    U, s, Vh = torch.linalg.svd(f.sqrt()[:, None] * T, full_matrices=False)
    best = (U[:, :4] * s[:4] @ Vh[:4] / f.sqrt()[:, None]) @ torch.linalg.inv(S)
    assert err(got) == pytest.approx(err(best), rel=1e-6)
    assert err(got) < err(get_method("whiten")(weight, 4, _stats(X, None, P), solver="exact").dense())


def test_fwhiten_refuses_missing_or_broken_statistics(weight):
    fwhiten = get_method("fwhiten")
    X = _inputs()
    with pytest.raises(SpecError, match="needs the Fisher information of each output row"):
        fwhiten(weight, 2, _stats(X, None))
    with pytest.raises(SpecError, match="needs calibration statistics"):
        fwhiten(weight, 2, None)
    from lm_eval_lowrank.methods import LayerStats

    for name in ("fwhiten", "whiten", "rom", "asvd"):  # a gradient-only record: an AttributeError before
        with pytest.raises(SpecError, match=rf"^method='{name}' needs the input covariances"):
            get_method(name)(weight, 2, LayerStats(None, 10, None, None))
    with pytest.raises(SpecError, match="zero, negative or non-finite"):
        fwhiten(weight, 2, _stats(X, torch.zeros(48)))
    with pytest.raises(SpecError, match=r"shape \(32,\), expected \(48,\)"):
        fwhiten(weight, 2, _stats(X, torch.ones(32)))
    with pytest.raises(SpecError, match="allocator='output_error' is invalid with method='fwhiten'"):
        DecompositionSpec.from_args({"method": "fwhiten", "budget": 0.8, "allocator": "output_error"})
    assert DecompositionSpec.from_args({"method": "fwhiten", "rank": 2}).calib == "wikitext_local"


def test_fwhiten_through_compress_model_attaches_each_modules_own_fisher(tiny_llama_dir, benchmark_data, monkeypatch):
    """The whole path: the sequential covariances with the gradient pass's row sums attached per module (q, k and
    v share their inputs but not their outputs: GQA gives k and v fewer rows), factors in place, and the report
    gives both statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.methods import fwhiten as fwhiten_module
    from lm_eval_lowrank.modules import LowRankLinear

    seen: dict[tuple[int, int], LayerStats] = {}
    real = fwhiten_module.fwhiten_method

    def spy(weight, rank, stats=None, **kw):
        seen[tuple(weight.shape)] = stats
        return real(weight, rank, stats, **kw)

    monkeypatch.setitem(__import__("lm_eval_lowrank.methods", fromlist=["_REGISTRY"])._REGISTRY, "fwhiten", spy)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = {"method": "fwhiten", "rank": 4, "layers": "2|3", "tensors": "q|k|down", "calib_n": 4, "calib_len": 32, "cache": False}
    report = compress_model(model, spec, tokenizer=tok, progress=False)
    assert isinstance(model.model.layers[1].self_attn.k_proj, LowRankLinear) and isinstance(model.model.layers[2].mlp.down_proj, LowRankLinear)
    assert report.solvers and all(name.startswith("fwhiten-") for name in report.solvers)
    q, k = model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.k_proj
    assert q.out_features != k.out_features
    for shape in ((q.out_features, q.in_features), (k.out_features, k.in_features)):
        s = seen[shape]
        assert s.input_cov is not None and s.output_fisher is not None and s.output_fisher.shape == (shape[0],) and float(s.output_fisher.min()) > 0
    fisher = report.calibration["fisher"]
    assert fisher["statistics"].startswith("Fisher row sums") and fisher["seconds"] > 0
    # grad_checkpoint=auto: 4 x 32 tokens through a tiny model stay far under half the free memory, and say so
    assert fisher["grad_checkpoint"] == "auto" and fisher["checkpoint_layers"] is False
    assert 0 < fisher["held_bytes_first_batch"] < 1 << 20 < fisher["held_budget_bytes"] and fisher["linears_in_fp32"] is False  # fp32
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
