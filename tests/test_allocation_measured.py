"""The measured ``sensitivity`` allocator: per-layer loss measurement, the option choice, the budget."""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch

from lm_eval_lowrank.spec import DecompositionSpec, SpecError

from conftest import tiny_llama_config


def _low_rank_except_layer2():
    """A tiny Llama whose layers 1, 3 and 4 are exactly rank 4 (lossless to compress) and layer 2 is full rank.

    The tokens are sampled from the model itself (with a sharpened head), so any change to
    its outputs raises the expected loss: compressing layer 2 must cost, the others not.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for i in (0, 2, 3):
            for mod in model.model.layers[i].modules():
                if isinstance(mod, torch.nn.Linear):
                    o, n = mod.weight.shape
                    mod.weight.copy_(torch.randn(o, 4, generator=g) @ torch.randn(4, n, generator=g) * 0.01)
        ids = torch.zeros(16, 32, dtype=torch.long)
        ids[:, 0] = torch.randint(0, 128, (16,), generator=g)
        for t in range(1, ids.shape[1]):
            p = torch.softmax(model(input_ids=ids[:, :t]).logits[:, -1].float(), -1)
            ids[:, t] = torch.multinomial(p, 1, generator=g)[:, 0]
    return model, ids


@pytest.fixture(scope="module")
def constructed():
    return _low_rank_except_layer2()


def _provider(model, ids, cache_dir=None):
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import SequentialStatsProvider, model_fingerprint

    key = model_fingerprint(model, "tiny") if cache_dir else None
    rec = {"source": "test", "n": ids.shape[0], "len": ids.shape[1], "seed": 0}
    return SequentialStatsProvider(model, adapter_for_model(model), ids, batch_size=4, record=rec, cache_dir=cache_dir, model_key=key)


def _layers_of(ranks) -> set[int]:
    return {int(p.split(".")[2]) + 1 for p in ranks}


@pytest.mark.parametrize("method", ["whiten", "tucker", "fwhiten"])
def test_the_sensitive_layer_is_avoided(constructed, method):
    from lm_eval_lowrank.allocation import allocate_ranks
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import FisherStatsProvider

    model, ids = constructed
    spec = DecompositionSpec.from_args({"method": method, "budget": 0.7, "allocator": "sensitivity", "rank_multiple": 4})
    provider = _provider(model, ids)
    if method == "fwhiten":  # as build_stats_provider makes it: the sequential statistics carry a gradient pass
        provider.fisher = FisherStatsProvider(model, adapter_for_model(model), ids, spec)
    ranks = allocate_ranks(spec, model, stats_provider=provider)
    inc = ranks.info["measured"]["loss_increase"]
    assert min(inc["2"].values()) > 0.01  # full rank: every option costs
    assert max(abs(v) for L in ("1", "3", "4") for v in inc[L].values()) < 1e-4  # rank 4: lossless
    assert _layers_of(ranks) == {1, 3, 4} and set(ranks.info["chosen_layers"]) == {"1", "3", "4"}
    assert ranks.info["realised_keep"] <= 0.7
    uniform = allocate_ranks(spec.with_(allocator="uniform"), model)
    assert 2 in _layers_of(uniform)


@pytest.mark.parametrize("budget", [0.95, 0.8, 0.6, 0.4])
@pytest.mark.parametrize("multiple", [1, 4])
def test_budget_met_within_one_rounding_step(constructed, budget, multiple):
    from lm_eval_lowrank.allocation import allocate_ranks
    from lm_eval_lowrank.plan import make_plan

    model, ids = constructed
    spec = DecompositionSpec.from_args({"method": "whiten", "budget": budget, "allocator": "sensitivity", "rank_multiple": multiple})
    ranks = allocate_ranks(spec, model, stats_provider=_provider(model, ids))
    info = ranks.info
    assert info["kept_params"] <= budget * info["selected_params"]
    assert budget * info["selected_params"] - info["kept_params"] <= info["max_rounding_step"]
    assert all(r % multiple == 0 for r in ranks.values())
    plan = make_plan(spec, model.config, ranks=ranks)
    assert not plan.skipped and plan.params_removed == info["selected_params"] - info["kept_params"]
    keeps = info["measured"]["keeps"]
    assert (budget / 2 in keeps) == (budget < 0.5) and {0.5, 0.7, 0.85} <= set(keeps)
    assert info["selection"]["feasible"] and info["selection"]["dp"] == "exact"


def test_dense_modules_are_restored_exactly(constructed):
    from lm_eval_lowrank.allocation import allocate_ranks

    model, ids = constructed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [id(m) for m in model.modules()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    for method in ("whiten", "rom", "tucker"):
        spec = DecompositionSpec.from_args({"method": method, "budget": 0.8, "allocator": "sensitivity", "rank_multiple": 4})
        allocate_ranks(spec, model, stats_provider=_provider(model, ids))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert [id(m) for m in model.modules()] == modules and [p.data_ptr() for p in model.parameters()] == ptrs
    assert not model.training


@pytest.mark.parametrize("method", ["whiten", "tucker", "fwhiten", "fwsvd"])
def test_measured_loss_is_the_compressed_models_loss(constructed, method):
    """One (layer, fraction) entry equals the whole model's loss with that layer decomposed the ordinary way (for
    the gradient methods, with the same rows' Fisher sums)."""
    from lm_eval_lowrank.allocation import SENSITIVITY_SCORE_STRIDE, candidates, layer_options, measure_sensitivity
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import FisherStatsProvider
    from lm_eval_lowrank.decompose import decompose_model

    model, ids = constructed
    # The measurement fits every tensor of the layer to the dense layer's inputs: no staging, no blend.
    spec = DecompositionSpec.from_args({"method": method, "budget": 0.7, "layers": "2", "rank_multiple": 4, "calib_staged": False, "calib_target": "compressed"})
    adapter = adapter_for_model(model)
    options = layer_options(candidates(spec, model.config, adapter), (0.5, 0.7), 4, "folded")
    gradients = method in ("fwhiten", "fwsvd")
    fisher = FisherStatsProvider(model, adapter, ids, spec).row_sums(model) if gradients else None
    table = measure_sensitivity(spec, model, adapter, options, ids, "folded", batch_size=8, fisher=fisher)
    n_eval, n_stats = table["eval_sequences"], table["stats_sequences"]
    assert table["held_out"] and n_eval == 4 and n_stats == (0 if method == "tucker" else 12)
    stats_ids, eval_ids = ids[:12], ids[12:]
    for rho in (0.5, 0.7):
        other = copy.deepcopy(model)
        provider = _provider(other, stats_ids) if method != "tucker" else None
        if gradients:
            provider.fisher = FisherStatsProvider(other, adapter, ids, spec)
        if method == "fwsvd":
            provider = provider.fisher
        decompose_model(other, spec, ranks=options[2][rho], stats_provider=provider, progress=False)
        with torch.no_grad():
            z = other(input_ids=eval_ids).logits.float()
        pos = torch.arange(0, ids.shape[1] - 1, SENSITIVITY_SCORE_STRIDE)
        loss = torch.nn.functional.cross_entropy(z[:, pos].reshape(-1, z.shape[-1]), eval_ids[:, pos + 1].reshape(-1))
        assert table["loss"][2][rho] == pytest.approx(float(loss), abs=2e-4)
        assert table["loss"][2][rho] > table["dense_loss"]


def _brute_force(cost, removed, need):
    layers = sorted(cost)
    best = math.inf
    for combo in itertools.product(*[[None, *sorted(cost[L])] for L in layers]):
        rem = sum(removed[L][o] for L, o in zip(layers, combo) if o is not None)
        if rem >= need:
            best = min(best, sum(cost[L][o] for L, o in zip(layers, combo) if o is not None))
    return best


def test_option_choice_is_optimal():
    from lm_eval_lowrank.allocation import choose_options

    rng = random.Random(0)
    for _ in range(200):
        layers = range(1, rng.randint(2, 6))
        cost = {L: {rho: rng.uniform(-0.01, 1) for rho in (0.5, 0.7, 0.85)} for L in layers}
        removed = {L: {rho: int(rng.randint(80, 120) * (1 - rho) * 10) for rho in (0.5, 0.7, 0.85)} for L in layers}
        need = rng.randint(0, sum(max(r.values()) for r in removed.values()))
        choice, info = choose_options(cost, removed, need)
        assert info["feasible"] and info["dp"] == "exact"
        assert sum(removed[L][rho] for L, rho in choice.items()) >= need
        got = sum(cost[L][rho] for L, rho in choice.items())
        assert got == pytest.approx(_brute_force(cost, removed, need)) and got == pytest.approx(info["predicted_increase"])
    # A hand-made table: two cheap layers at 0.7 beat one at 0.5 next to an expensive one.
    cost = {1: {0.5: 0.30, 0.7: 0.10}, 2: {0.5: 0.25, 0.7: 0.12}, 3: {0.5: 5.0, 0.7: 2.0}}
    removed = {L: {0.5: 50, 0.7: 30} for L in cost}
    assert choose_options(cost, removed, 60)[0] == {1: 0.7, 2: 0.7}
    assert choose_options(cost, removed, 61)[0] == {1: 0.7, 2: 0.5}
    assert choose_options(cost, removed, 0)[0] == {}
    # A capped front (removals rounded down to a grid) stays feasible; an impossible need takes the smallest fractions.
    cost = {L: {rho: rng.uniform(0, 1) for rho in (0.5, 0.7, 0.85)} for L in range(1, 9)}
    removed = {L: {rho: int(rng.randint(80, 120) * (1 - rho) * 10) for rho in (0.5, 0.7, 0.85)} for L in cost}
    need = sum(r[0.5] for r in removed.values()) // 2
    choice, info = choose_options(cost, removed, need, max_states=3)
    assert sum(removed[L][rho] for L, rho in choice.items()) >= need and info["dp"] == "thinned"
    assert info["predicted_increase"] >= choose_options(cost, removed, need)[1]["predicted_increase"] - 1e-12
    cost = {1: {0.5: 0.30, 0.7: 0.10}, 2: {0.5: 0.25, 0.7: 0.12}, 3: {0.5: 5.0, 0.7: 2.0}}
    removed = {L: {0.5: 50, 0.7: 30} for L in cost}
    choice, info = choose_options(cost, removed, 1000)
    assert choice == {1: 0.5, 2: 0.5, 3: 0.5} and not info["feasible"]


def test_measurements_are_cached(constructed, tmp_path, monkeypatch):
    from lm_eval_lowrank.allocation import allocate_ranks

    monkeypatch.setenv("LM_EVAL_LOWRANK_CACHE", str(tmp_path))
    model, ids = constructed
    spec = DecompositionSpec.from_args({"method": "whiten", "budget": 0.8, "allocator": "sensitivity", "rank_multiple": 4})
    first = allocate_ranks(spec, model, stats_provider=_provider(model, ids, tmp_path))
    again = allocate_ranks(spec, model, stats_provider=_provider(model, ids, tmp_path))
    assert first.info["measured"]["cache"] == "miss" and again.info["measured"]["cache"] == "hit"
    assert again.info["measured"]["loss_increase"] == first.info["measured"]["loss_increase"] and dict(again) == dict(first)
    assert len(list((tmp_path / "sensitivity").rglob("*.json"))) == 1
    other = allocate_ranks(spec.with_(method="tucker"), model, stats_provider=_provider(model, ids, tmp_path))
    assert other.info["measured"]["cache"] == "miss"
    nocache = allocate_ranks(spec, model, stats_provider=_provider(model, ids))
    assert nocache.info["measured"]["cache"] == "disabled"


def test_errors_are_one_line(constructed):
    from lm_eval_lowrank.allocation import allocate_ranks

    model, ids = constructed
    with pytest.raises(SpecError) as err:
        DecompositionSpec.from_args({"budget": 0.8, "allocator": "measured"})
    assert str(err.value) == "allocator='measured' is invalid: valid: uniform, tail, sensitivity, output_error, fisher"
    spec = DecompositionSpec.from_args({"method": "tucker", "budget": 0.8, "allocator": "sensitivity"})
    with pytest.raises(SpecError, match="allocator=sensitivity needs calibration tokens"):
        allocate_ranks(spec, model)
    # The layer-by-layer run must reproduce the model's forward: a head it does not know is refused.
    odd = copy.deepcopy(model)
    odd.config.final_logit_softcapping = 1.0  # Llama's forward ignores it; the layer-by-layer head would apply it
    with pytest.raises(SpecError, match="one layer at a time .* use allocator=output_error") as err:
        allocate_ranks(spec, odd, stats_provider=_provider(odd, ids))
    assert "\n" not in str(err.value)


def test_output_error_is_the_former_proxy(constructed):
    from lm_eval_lowrank.allocation import allocate_ranks

    model, ids = constructed
    spec = DecompositionSpec.from_args({"method": "whiten", "budget": 0.8, "allocator": "output_error", "rank_multiple": 4})
    ranks = allocate_ranks(spec, model, stats_provider=_provider(model, ids))
    assert ranks.info["allocator"] == "output_error" and "proxy_error_sum" in ranks.info and ranks.info["calibrated"]
    assert ranks.info["realised_keep"] <= 0.8


def test_the_sensitivity_replay_runs_each_layer_with_its_own_mask_and_rope():
    """Gemma-3 gives its local and global layers their own RoPE and mask: replaying layer 1's call for every layer
    ran the global layer with the local RoPE (its logits off by 1e-2 on a scale of 0.5), which the measurement's
    self-check refused on sharp logits."""
    import warnings

    import transformers

    from lm_eval_lowrank import allocation as A
    from lm_eval_lowrank.architectures import adapter_for_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.AutoConfig.for_model(
            "gemma3_text", hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=64
        )
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert len(set(cfg.layer_types)) == 2
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)  # sharper attention: RoPE matters
        layers = adapter_for_model(model).layers(model)
        (h, kw, x), = A._layer_inputs(model, layers, ids, 1)
        for i, layer in enumerate(layers):
            h = A._first_tensor(layer(h, **kw[i]))
        head = A._Head(model, layers, 1)
        torch.testing.assert_close(head.scale(head.head(head.norm(h)).float()), model(input_ids=x).logits.float(), rtol=1e-5, atol=1e-5)
