"""Budget allocation edge cases: a rank_multiple no module can take, high budgets, the measurement's data split and
its cache key."""

from __future__ import annotations

import pytest
import torch

from lm_eval_lowrank.spec import DecompositionSpec, SpecError, breakeven_rank

from conftest import tiny_llama_config


def _tiny(**overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _largest_multiple(config, layout: str) -> int:
    """The largest rank_multiple with an admissible rank somewhere: one below the largest break-even rank."""
    from lm_eval_lowrank.architectures import adapter_for_config

    return max(breakeven_rank(o, i, layout) for o, i in adapter_for_config(config).tensor_shapes(config).values()) - 1


def _next_step(c, rank: int, multiple: int, layout: str) -> int:
    """Parameters one rounding step up adds: the next multiple, or dense where that multiple saves nothing."""
    up = rank + multiple
    if up >= breakeven_rank(c.out_features, c.in_features, layout):
        return c.dense - c.params(rank, layout)
    return c.params(up, layout) - c.params(rank, layout)


# -- a rank_multiple that no selected module can take -------------------------------------------


class _Tokens:
    input_ids = torch.zeros(4, 8, dtype=torch.long)


@pytest.mark.parametrize("layout", ["folded", "tucker"])
@pytest.mark.parametrize("allocator", ["uniform", "tail", "sensitivity"])
def test_rank_multiple_past_every_break_even_is_refused(tiny, monkeypatch, allocator, layout):
    import lm_eval_lowrank.allocation as A
    from lm_eval_lowrank.api import validate_against_config

    def no_measurement(*_a, **_k):
        raise AssertionError("measured before the spec was checked")

    monkeypatch.setattr(A, "measure_sensitivity", no_measurement)
    largest = _largest_multiple(tiny.config, layout)
    spec = DecompositionSpec.from_args({"budget": 0.5, "allocator": allocator, "rank_multiple": largest + 1, "layout": layout})
    with pytest.raises(SpecError, match=rf"^rank_multiple={largest + 1} is invalid: .*valid 1\.\.{largest}$"):
        validate_against_config(spec, tiny.config)  # before the weights load
    with pytest.raises(SpecError, match=rf"^rank_multiple={largest + 1} is invalid: .*valid 1\.\.{largest}$"):
        A.allocate_ranks(spec, tiny, stats_provider=_Tokens())
    if allocator != "sensitivity":  # the bound itself is valid: the largest module takes that rank
        ok = spec.with_(rank_multiple=largest)
        validate_against_config(ok, tiny.config)
        assert A.allocate_ranks(ok, tiny).info["modules_compressed"] > 0


def test_no_compressible_shape_is_refused():
    from lm_eval_lowrank.plan import check_rank_multiple

    spec = DecompositionSpec.from_args({"budget": 0.5})
    with pytest.raises(SpecError, match="^budget: no rank saves parameters"):
        check_rank_multiple(spec, [(1, 64)], "folded")  # break-even 1: no rank at all
    check_rank_multiple(spec, [], "folded")  # an empty selection is reported elsewhere


# -- high budgets: a module at its largest rank steps back to dense -----------------------------


@pytest.mark.parametrize("layout", ["folded", "tucker"])
@pytest.mark.parametrize("allocator", ["uniform", "tail"])
def test_budget_met_within_one_step_at_every_budget(tiny, allocator, layout):
    from lm_eval_lowrank.allocation import allocate_ranks, candidates
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.plan import make_plan

    for budget in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        for multiple in (1, 4, 8, 16):
            spec = DecompositionSpec.from_args({"budget": budget, "allocator": allocator, "rank_multiple": multiple, "layout": layout})
            ranks = allocate_ranks(spec, tiny)
            info, cands = ranks.info, candidates(spec, tiny.config, adapter_for_model(tiny))
            where = f"{allocator} budget={budget} rank_multiple={multiple} {layout}"
            steps = [_next_step(c, ranks[c.path], multiple, layout) for c in cands if c.path in ranks]
            assert info["max_rounding_step"] == max(steps), where  # the record: the steps actually open
            assert all(r % multiple == 0 for r in ranks.values()), where
            plan = make_plan(spec, tiny.config, ranks=ranks)  # every rank saves parameters
            assert not plan.skipped and plan.params_removed == info["selected_params"] - info["kept_params"], where
            short = budget * info["selected_params"] - info["kept_params"]
            if short < 0:  # even the smallest ranks keep more: every compressed module is at its smallest
                assert all(r == multiple for r in ranks.values()), where
                continue
            assert info["realised_keep"] <= budget, where
            assert short < min(steps) and short <= info["max_rounding_step"], where  # no step up would still fit


def test_high_budget_at_smollm2_shapes():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm_eval_lowrank.allocation import allocate_ranks

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for allocator in ("uniform", "tail"):
        info = allocate_ranks(DecompositionSpec.from_args({"budget": 0.95, "allocator": allocator, "rank_multiple": 64}), model).info
        assert 0 <= 0.95 * info["selected_params"] - info["kept_params"] <= info["max_rounding_step"], allocator


def test_error_allocator_gives_back_a_largest_rank_to_dense():
    """The hull descent jumps l from dense to rank 12 after x took rank 24: the overshoot (1384 parameters) leaves
    no room for l's next rank (1536) but does for x's step back to dense (1024)."""
    from lm_eval_lowrank.allocation import Candidate, allocate_by_error

    x, l = Candidate(1, "q", "x", 64, 64), Candidate(1, "k", "l", 64, 64)
    curves = {"x": torch.ones(65), "l": torch.ones(65)}
    curves["x"][24], curves["x"][12] = 0.01, 0.9  # x: dense -> 24 -> 12 on its hull
    curves["l"][24], curves["l"][12] = 0.5, 0.6  # l: dense -> 12 at once
    total, need = x.dense + l.dense, 2200
    budget = (total - need) / total
    ranks, _ = allocate_by_error([x, l], curves, budget, 12, "folded")
    kept = sum(c.params(ranks.get(c.path, 0), "folded") for c in (x, l))
    assert kept <= budget * total
    assert all(budget * total - kept < _next_step(c, ranks[c.path], 12, "folded") for c in (x, l) if c.path in ranks)


# -- the measurement: its scored split and its cache key -----------------------------------------


def _options(model, spec):
    import lm_eval_lowrank.allocation as A
    from lm_eval_lowrank.architectures import adapter_for_model

    return A.layer_options(A.candidates(spec, model.config, adapter_for_model(model)), A.sensitivity_keeps(spec.budget), 1, "folded")


def test_scored_split_is_a_quarter_at_least_one():
    import lm_eval_lowrank.allocation as A
    from lm_eval_lowrank.architectures import adapter_for_model

    doc = " ".join(A.measure_sensitivity.__doc__.split())
    assert "at least one" in doc and "of 2 or 3 sequences, one" in doc  # what the measurement below does
    model = _tiny(num_hidden_layers=1)
    spec = DecompositionSpec.from_args({"method": "whiten", "budget": 0.5, "allocator": "sensitivity"})
    for n in (2, 3, 4, 9):
        ids = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(n))
        t = A.measure_sensitivity(spec, model, adapter_for_model(model), _options(model, spec), ids, "folded")
        assert t["eval_sequences"] == max(1, n // 4) and t["stats_sequences"] == n - t["eval_sequences"] and t["held_out"], n


def test_solver_tol_keys_the_sensitivity_cache(tmp_path):
    import lm_eval_lowrank.allocation as A
    from lm_eval_lowrank.architectures import adapter_for_model

    model = _tiny(num_hidden_layers=1)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    caches = []
    for tol in (0.5, 0.001, 0.001):
        spec = DecompositionSpec.from_args({"method": "tucker", "budget": 0.5, "allocator": "sensitivity", "solver": "krylov", "solver_tol": tol})
        caches.append(A.measure_sensitivity(spec, model, adapter_for_model(model), _options(model, spec), ids, "folded", cache_dir=tmp_path)["cache"])
    assert caches == ["miss", "miss", "hit"]  # another solver_tol is another measurement
    assert len(list(tmp_path.glob("*.json"))) == 2
