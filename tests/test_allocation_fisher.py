"""``allocator=fisher``: the K-FAC estimate of each module's loss increase, its error formulas and the whole path."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from lm_eval_lowrank.methods import LayerStats, get_method
from lm_eval_lowrank.spec import METHODS, DecompositionSpec, SpecError

from test_allocation_measured import _layers_of, _low_rank_except_layer2, _provider


@pytest.fixture(scope="module")
def constructed():
    return _low_rank_except_layer2()


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=values.__getitem__)
    return [order.index(i) for i in range(len(values))]


def _with_gradients(model, ids, spec):
    """The provider build_stats_provider makes for allocator=fisher: sequential statistics carrying a gradient pass."""
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import FisherStatsProvider

    provider = _provider(model, ids)
    provider.fisher = FisherStatsProvider(model, adapter_for_model(model), ids, spec)
    return provider


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize("method", METHODS)
def test_fisher_error_tail_is_the_methods_own_weighted_error(method, shape):
    """tail[k] equals tr(diag(f) dW C dW^T) with dW what the method itself drops at rank k (exact solver)."""
    from lm_eval_lowrank.allocation import fisher_error_tail

    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = torch.randn(200, shape[1], generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, shape[1], dtype=torch.float64)
    C = X.T @ X / 200
    f = torch.rand(shape[0], generator=g, dtype=torch.float64) ** 3 + 0.01  # rows that matter unequally
    abs_mean = X.abs().mean(0)
    tail = fisher_error_tail(W, C, f, method, None, abs_mean)
    assert tail.shape == (min(shape) + 1,) and float(tail[-1]) == 0.0
    torch.testing.assert_close(tail[0], torch.trace(f[:, None] * W @ C @ W.mT))
    stats = LayerStats(C, 200, input_abs_mean=abs_mean, output_fisher=f)
    for k in (1, 3, 7, min(shape) - 1):
        dW = W - get_method(method)(W.float(), k, stats, solver="exact").dense().double()
        weighted = float(((f[:, None] * dW) @ C * dW).sum())
        assert abs(weighted - float(tail[k])) <= 1e-5 * float(tail[0]), (method, k)


def test_fisher_allocator_spares_the_layer_the_loss_needs(constructed):
    """Layers 1, 3 and 4 are exactly rank 4, layer 2 is full rank: the loss estimate puts the whole cut where it
    costs nothing, as the measured allocator does, without compressing a single layer to measure it."""
    from lm_eval_lowrank.allocation import allocate_ranks

    model, ids = constructed
    for method in ("whiten", "tucker", "fwsvd"):
        spec = DecompositionSpec.from_args({"method": method, "budget": 0.7, "allocator": "fisher", "rank_multiple": 4})
        ranks = allocate_ranks(spec, model, stats_provider=_with_gradients(model, ids, spec))
        assert _layers_of(ranks) == {1, 3, 4}, method
        assert ranks.info["realised_keep"] <= 0.7 and ranks.info["predicted_loss_increase"] < 1e-6
        assert ranks.info["proxy"].startswith("K-FAC estimate")
    uniform = allocate_ranks(spec.with_(allocator="uniform"), model)
    assert 2 in _layers_of(uniform)


def test_the_estimate_follows_the_measured_loss_increase(constructed):
    """Each tensor of the full-rank layer truncated alone to rank 8: the estimate orders the modules as the
    model's loss does, and lies within a small factor of it (it assumes uncorrelated token gradients, which
    overstates a sequence's Fisher; measured here 1.4-3.6x above)."""
    from lm_eval_lowrank.allocation import candidates, sensitivity_curves
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.decompose import decompose_model

    model, ids = constructed
    spec = DecompositionSpec.from_args({"method": "whiten", "budget": 0.8, "allocator": "fisher", "rank_multiple": 1, "calib_staged": False, "calib_target": "compressed"})
    cands = [c for c in candidates(spec, model.config, adapter_for_model(model)) if c.layer == 2]
    n, length = ids.shape
    curves = sensitivity_curves(spec, model, cands, _with_gradients(model, ids, spec), fisher_scale=(length - 1) / (2 * n))

    @torch.no_grad()
    def loss(m) -> float:
        return float(m(input_ids=ids, labels=ids).loss)

    dense = loss(model)
    estimated, measured = [], []
    for c in cands:
        one = copy.deepcopy(model)
        alone = spec.with_(budget=None, rank=8, layers=(2,), tensors=(c.tensor,))
        decompose_model(one, alone, stats_provider=_provider(one, ids), progress=False)
        estimated.append(float(curves[c.path][8]))
        measured.append(loss(one) - dense)
    assert statistics.correlation(_ranks(estimated), _ranks(measured)) > 0.8  # Spearman
    assert max(range(len(cands)), key=estimated.__getitem__) == max(range(len(cands)), key=measured.__getitem__)
    for e, m in zip(estimated, measured):
        if m > 5e-3:
            assert 0.5 <= e / m <= 8


def test_fisher_allocator_spec():
    for method in METHODS:
        assert DecompositionSpec.from_args({"method": method, "budget": 0.8, "allocator": "fisher"}).allocator == "fisher"
    with pytest.raises(SpecError, match="allocator='output_error' is invalid with method='fwhiten'.*fisher") as err:
        DecompositionSpec.from_args({"method": "fwhiten", "budget": 0.8, "allocator": "output_error"})
    assert "\n" not in str(err.value)


def test_fisher_allocator_without_gradients_says_so(constructed):
    from lm_eval_lowrank.allocation import allocate_ranks

    model, ids = constructed
    spec = DecompositionSpec.from_args({"method": "whiten", "budget": 0.8, "allocator": "fisher"})
    for provider in (None, _provider(model, ids)):
        with pytest.raises(SpecError, match="allocator=fisher needs calibration data with gradients"):
            allocate_ranks(spec, model, stats_provider=provider)


@pytest.mark.parametrize("method,allocator", [("tucker", "fisher"), ("tucker", "output_error"), ("fwsvd", "fisher"), ("whiten", "fisher")])
def test_compress_model_reads_the_calibration_data_once_per_purpose(tiny_llama_dir, benchmark_data, method, allocator):
    """The allocator's dense pass serves a data-free method's budget alone (the solves take no second pass), fwsvd
    solves from its gradient pass only, and the results JSON records the allocator's data and estimate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.api import compress_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = {"method": method, "budget": 0.7, "allocator": allocator, "calib_n": 4, "calib_len": 32, "cache": False}
    report = compress_model(model, spec, tokenizer=tok, progress=False)
    calibration = report.to_dict()["calibration"]
    assert report.allocation["allocator"] == allocator and report.allocation["realised_keep"] <= 0.7
    if method in ("tucker", "fwsvd"):
        assert calibration["layers_computed"] == [1, 2, 3, 4]  # the allocator's pass, and no other
        assert all(name.startswith(f"{method}-") or method == "tucker" for name in report.solvers)
    else:
        assert calibration["layers_computed"][:4] == [1, 2, 3, 4] and len(calibration["layers_computed"]) > 4
    if allocator == "fisher":
        assert calibration["fisher"]["statistics"].startswith("Fisher row sums") and calibration["allocation"]["predicted_loss_increase"] > 0


def test_an_allocator_that_reads_data_needs_a_tokenizer(tiny_llama):
    from lm_eval_lowrank.api import compress_model

    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(SpecError, match="^allocator='fisher' needs a tokenizer for its calibration data$"):
        compress_model(tiny_llama, {"method": "tucker", "budget": 0.8, "allocator": "fisher"}, tokenizer=None, progress=False)
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())  # nothing was touched


def _greedy_by_scanning(cands, curves, budget, multiple, layout):
    """The greedy descent written the slow way, as an oracle: from each module's current rank, scan every lower
    admissible rank for the least error per parameter saved (ties to the lowest rank), and take the cheapest
    step over all modules until the budget is met."""
    target = budget * sum(c.dense for c in cands)
    state = {c.path: 0 for c in cands}
    cur = sum(c.dense for c in cands)
    while cur > target:
        best = None
        for c in cands:
            s, cur_err = state[c.path], 0.0 if state[c.path] == 0 else float(curves[c.path][state[c.path]])
            for r in c.ranks(multiple, layout):
                if s and r >= s:
                    break
                saved = c.params(s, layout) - c.params(r, layout)
                slope = (float(curves[c.path][r]) - cur_err) / saved
                if best is None or slope < best[0]:
                    best = (slope, c, r)
        if best is None:
            break
        _, c, r = best
        cur -= c.params(state[c.path], layout) - c.params(r, layout)
        state[c.path] = r
    return state


@pytest.mark.parametrize("budget", [0.9, 0.6, 0.3])
def test_hull_descent_takes_the_scanning_greedys_steps(budget):
    """Each module's steps are precomputed as its lower convex hull (linear in its ranks, where scanning every
    lower rank at each step was quadratic): before the final give-back, the states equal the slow scan's, on
    convex, concave, flat-tailed and noisy curves."""
    from lm_eval_lowrank.allocation import Candidate, _descend_hulls

    g = torch.Generator().manual_seed(0)
    cands, curves = [], {}
    for i, (o, n) in enumerate([(48, 32), (32, 32), (16, 40), (40, 24), (24, 24)]):
        c = Candidate(layer=i + 1, tensor="t", path=f"m{i}", out_features=o, in_features=n)
        k = min(o, n)
        x = torch.arange(k + 1, dtype=torch.float64)
        shape = [(1 - x / k) ** 2, (1 - x / k) ** 0.5, torch.where(x < 5, 1 - x / 5, 0.0), torch.rand(k + 1, generator=g).sort(descending=True).values][i % 4]
        curves[c.path] = (shape * (i + 1)).clamp_min(0)
        curves[c.path][k] = 0.0
        cands.append(c)
    for multiple in (1, 4):
        expected = _greedy_by_scanning(cands, curves, budget, multiple, "folded")
        assert _descend_hulls(cands, curves, budget, multiple, "folded") == expected
