"""Mixture-of-experts projections stored as 3-D parameters (transformers 5: Mixtral, Qwen-MoE, OLMoE, GPT-OSS).

Each expert's matrix is decomposed on its own; the experts module keeps its gating, activation and biases
and multiplies by the factors. Checked against transformers' own experts forward on the same (reconstructed)
weights, for the layouts that differ: concatenated and interleaved gate/up, transposed storage, biases.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import transformers

from lm_eval_lowrank.api import compress_model, validate_against_config
from lm_eval_lowrank.architectures import GenericAdapter, adapter_for_model
from lm_eval_lowrank.decompose import count_parameters
from lm_eval_lowrank.modules import LowRankExperts, LowRankExpertWeights, LowRankLinear
from lm_eval_lowrank.plan import make_plan
from lm_eval_lowrank.spec import DecompositionSpec, SpecError

_BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, head_dim=8, num_experts_per_tok=2)
_CONFIGS = {
    "mixtral": dict(intermediate_size=40, num_local_experts=4),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4),
    "olmoe": dict(intermediate_size=24, num_experts=4),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4),  # transposed storage, biases, interleaved gate/up
}
EXPERTS = "experts.gate_up_proj|experts.down_proj"


def _config(model_type: str, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoConfig.for_model(model_type, **{**_BASE, **_CONFIGS[model_type], **overrides})


def _model(model_type: str, **overrides):
    return _built(_config(model_type, **overrides))


def _built(config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random experts of a realistic scale (from_config leaves some at 0 or 1)
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.2)
    return model


def _reconstruct_into(model, reference) -> None:
    """Give ``reference`` (a dense copy) the weights ``model``'s factors represent, in their stored layouts."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, LowRankExpertWeights):
                owner, _, param = name.rpartition(".")
                getattr(reference.get_submodule(owner), param).copy_(mod[:])
            elif isinstance(mod, LowRankLinear):
                reference.get_submodule(name).weight.copy_(mod.dense_weight())


def _experts(model, layer=0):
    return model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("model_type", sorted(_CONFIGS))
def test_adapter_offers_expert_projections_config_side_and_model_side(model_type):
    config = _config(model_type)
    model = _model(model_type)
    for adapter in (adapter_for_model(model), GenericAdapter.from_config(config)):
        assert adapter.expert_counts == {"experts.gate_up_proj": 4, "experts.down_proj": 4}
        assert adapter.tensor_paths["experts.down_proj"] == "mlp.experts.down_proj"
        inter = config.moe_intermediate_size if hasattr(config, "moe_intermediate_size") else config.intermediate_size
        shapes = adapter.tensor_shapes(config)
        assert shapes["experts.gate_up_proj"] == (2 * inter, 32)  # (out, in) of one expert, whatever the storage
        assert shapes["experts.down_proj"] == (32, inter)
    assert GenericAdapter.from_config(config).param_count(config) == count_parameters(model)
    if model_type == "qwen2_moe":  # the shared expert's linears keep their own names
        assert {"gate_proj", "up_proj", "down_proj"} <= set(adapter.tensor_names())


@pytest.mark.parametrize("model_type", sorted(_CONFIGS))
@pytest.mark.parametrize("layout", ["folded", "tucker"])
def test_decomposed_experts_compute_what_transformers_computes_on_the_same_weights(model_type, layout):
    """The factored forward against the model's own experts forward, whose weights are set to the factors'
    products: equal to float32 rounding, so the only change is the approximation itself."""
    model = _model(model_type)
    report = compress_model(model, {"rank": 3, "tensors": EXPERTS, "layout": layout}, progress=False)
    reference = _model(model_type)
    for layer, experts in enumerate(m.mlp.experts for m in model.model.layers):
        assert isinstance(experts, LowRankExperts) and type(experts).__name__.startswith("LowRank")
        ref = _experts(reference, layer)
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(experts, name)
                assert isinstance(w, LowRankExpertWeights) and w.rank == 3 and w.layout == layout
                assert w.shape == getattr(ref, name).shape
                getattr(ref, name).copy_(w[:])  # stored orientation, every expert
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the accounting the plan promised is what happened
    assert report.params_before - report.params_after == report.plan.params_removed > 0
    assert count_parameters(model) == report.params_after
    assert len(report.plan.targets) == 4 and all(t.experts == 4 for t in report.plan.targets)
    assert sum(report.solvers.values()) == 4 * 4  # one solve per expert matrix


def test_each_expert_gets_its_best_rank_r_approximation():
    model = _model("gpt_oss")  # transposed storage: the factors must be of W[e]^T
    dense = _experts(model).gate_up_proj.detach().clone()  # (E, in, out)
    compress_model(model, {"rank": 4, "tensors": "experts.gate_up_proj", "layers": "1"}, progress=False)
    w = _experts(model).gate_up_proj
    approx = w.dense_weight().detach()  # (E, out, in)
    for e in range(dense.shape[0]):
        target = dense[e].mT
        s = torch.linalg.svdvals(target.double())
        err = torch.linalg.matrix_norm((approx[e] - target).double())
        assert float(err) == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4)  # Eckart-Young
    assert isinstance(_experts(model, 1).gate_up_proj, nn.Parameter)  # layer 2 untouched


def test_expert_factors_are_seeded_per_expert_and_reproducible():
    a, b = _model("mixtral"), _model("mixtral")
    for m in (a, b):
        compress_model(m, {"rank": 2, "tensors": "experts.down_proj", "solver": "randomized"}, progress=False)
    fa, fb = _experts(a).down_proj.first, _experts(b).down_proj.first
    assert torch.equal(fa, fb)


def test_expert_solves_run_in_parallel_threads_with_the_one_thread_results(solve_pools):
    """With two torch threads the experts' Krylov solves run in a pool of two, one thread each, and give the
    factors of a one-thread run bit for bit."""
    before, states = torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = _model("mixtral", intermediate_size=160, hidden_size=128, head_dim=32)
            report = compress_model(model, {"rank": 2, "tensors": EXPERTS, "cache": False}, progress=False)
            assert torch.get_num_threads() == threads
            states[threads] = model.state_dict()
    finally:
        torch.set_num_threads(before)
    assert report.solvers == {"krylov": 16} and solve_pools == [2] * 4  # the 2-thread run: a pool per stacked projection
    for k in states[1]:
        assert torch.equal(states[1][k], states[2][k]), k


def test_plan_counts_expert_parameters_before_any_weights_load():
    config = _config("mixtral")
    spec = DecompositionSpec.from_args({"rank": 2, "tensors": EXPERTS, "layers": "2"})
    validate_against_config(spec, config)
    plan = make_plan(spec, config, adapter=GenericAdapter.from_config(config))
    gate_up = next(t for t in plan.targets if t.tensor == "experts.gate_up_proj")
    assert gate_up.dense_params == 4 * 80 * 32 and gate_up.lowrank_params("folded") == 4 * 2 * (80 + 32)
    with pytest.raises(SpecError, match=r"rank=40 is invalid for tensor 'experts.gate_up_proj' \(80x32\): valid 1..32"):
        validate_against_config(spec.with_(rank=40), config)


def test_parameter_budgets_rank_experts_one_rank_per_projection():
    from lm_eval_lowrank.allocation import allocate_ranks

    model = _model("mixtral")
    adapter = adapter_for_model(model)
    for allocator in ("uniform", "tail"):
        spec = DecompositionSpec.from_args({"budget": 0.5, "allocator": allocator, "tensors": f"q_proj|{EXPERTS}"})
        ranks = allocate_ranks(spec, model, adapter=adapter)
        plan = make_plan(spec, model.config, adapter=adapter, ranks=ranks)
        experts = [t for t in plan.targets if t.experts]
        assert experts and all(t.experts == 4 for t in experts)
        kept = ranks.info["kept_params"]
        assert kept == sum(t.lowrank_params("folded") for t in plan.targets) + sum(
            t.dense_params for t in make_plan(spec.with_(budget=None, rank=1), model.config, adapter=adapter).targets if t.path not in ranks
        )
        assert kept <= 0.5 * ranks.info["selected_params"] and ranks.info["realised_keep"] > 0.45
    report = compress_model(model, {"budget": 0.5, "tensors": EXPERTS}, progress=False)
    assert report.allocation["realised_keep"] <= 0.5 and isinstance(_experts(model, 1).gate_up_proj, LowRankExpertWeights)
    assert report.params_before - report.params_after == report.plan.params_removed


def _calibration(model, smollm2_dir, **args):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.calibration import build_stats_provider

    values = {"rank": 2, "method": "whiten", "calib_n": 6, "calib_len": 16, "calib_batch": 4, "cache": False, **args}
    spec = DecompositionSpec.from_args({k: v for k, v in values.items() if v is not None})  # None: leave it out
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return spec, tokenizer, build_stats_provider(spec, model, tokenizer, model_id=None)


def test_expert_statistics_are_each_experts_own_routed_inputs(smollm2_dir):
    """The covariance the provider gives expert e is X_e^T X_e / n_e over the tokens the router sent to e
    (its gated intermediate for down_proj), as a plain forward of the model sees them."""
    model = _model("mixtral", vocab_size=49152)
    spec, _tok, provider = _calibration(model, smollm2_dir, calib_target="compressed")
    plan = make_plan(spec.with_(tensors=("experts.gate_up_proj", "experts.down_proj"), layers=(1,)), model.config, adapter=adapter_for_model(model))
    stats = provider.layer_stats(model, 1, plan.targets)
    experts = _experts(model, 0)
    seen = {}
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0], index=args[1]))
    with torch.no_grad():
        model(input_ids=provider.input_ids)
    handle.remove()
    x, index = seen["x"], seen["index"]
    for e in range(4):
        tokens = (index == e).any(-1).nonzero().flatten()
        xe = x[tokens]
        gated = experts._apply_gate(torch.nn.functional.linear(xe, experts.gate_up_proj[e]))
        for path, inputs in (("model.layers.0.mlp.experts.gate_up_proj", xe), ("model.layers.0.mlp.experts.down_proj", gated)):
            s = stats[path][e]
            assert s.tokens == len(tokens) > 0
            torch.testing.assert_close(s.input_cov.float(), (inputs.mT @ inputs / len(tokens)).float(), rtol=1e-4, atol=1e-5)


def test_whiten_beats_plain_svd_on_each_experts_own_inputs(smollm2_dir):
    """whiten minimises ||(W - W_hat) X_e|| for the tokens routed to e: never worse than the weight-only SVD."""
    from lm_eval_lowrank.methods import get_method

    model = _model("mixtral", vocab_size=49152)
    spec, _tok, provider = _calibration(model, smollm2_dir, calib_target="compressed")
    plan = make_plan(spec.with_(tensors=("experts.gate_up_proj",), layers=(2,)), model.config, adapter=adapter_for_model(model))
    stats = provider.layer_stats(model, 2, plan.targets)["model.layers.1.mlp.experts.gate_up_proj"]
    W = _experts(model, 1).gate_up_proj.detach()
    ratios = []
    for e, s in enumerate(stats):
        C = s.input_cov.double()
        errors = []
        for factors in (get_method("whiten")(W[e].float(), 2, s), get_method("tucker")(W[e].float(), 2, None)):
            D = W[e].double() - factors.dense().double()
            errors.append(float(torch.trace(D @ C @ D.mT)))
        ratios.append(errors[0] / errors[1])
    assert max(ratios) <= 1 + 1e-6 and min(ratios) < 0.99, ratios


@pytest.mark.parametrize("method,target", [("whiten", "0.25"), ("rom", "compressed"), ("asvd", "compressed"), ("fwhiten", "0.25")])
def test_calibrated_methods_decompose_experts_staged_in_forward_order(smollm2_dir, method, target):
    model = _model("mixtral", vocab_size=49152)
    spec, tokenizer, provider = _calibration(model, smollm2_dir, method=method, calib_target=target)
    stages = provider.forward_stages(model, 1, make_plan(spec, model.config, adapter=adapter_for_model(model)).targets[:6])
    assert [[t.tensor for t in stage] for stage in stages] == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["experts.gate_up_proj"], ["experts.down_proj"]]
    report = compress_model(model, spec, tokenizer=tokenizer, progress=False)
    assert sum(t.experts == 4 for t in report.plan.targets) == 4
    assert isinstance(_experts(model, 1).down_proj, LowRankExpertWeights)
    assert sum(n for name, n in report.solvers.items() if name.startswith(method)) >= 4 * 4
    assert report.calibration["stage_order"] == "forward"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 49152, (1, 8))).logits).all()


def test_an_expert_no_calibration_token_reached_is_solved_without_data():
    from lm_eval_lowrank.decompose import _decompose_experts, _PageReleaser
    from lm_eval_lowrank.methods import LayerStats, get_method
    from lm_eval_lowrank.plan import Plan, Target

    model = _model("mixtral")
    experts = _experts(model)
    x = torch.randn(50, 40)
    stats = [LayerStats(x.mT @ x / 50, 50), None, LayerStats(x.mT @ x / 50, 50), None]
    solvers = {}
    t = Target(1, "experts.down_proj", "model.layers.0.mlp.experts.down_proj", 32, 40, 2, experts=4)
    spec = DecompositionSpec.from_args({"rank": 2, "method": "whiten", "calib": "wikitext"})
    _decompose_experts(model, spec, Plan("generic", 2, "folded"), get_method("whiten"), t, stats, solvers, [], _PageReleaser())
    assert sum(n for k, n in solvers.items() if "without calibration tokens" in k) == 2
    assert sum(n for k, n in solvers.items() if k.startswith("whiten")) == 2
    assert isinstance(experts.down_proj, LowRankExpertWeights)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])  # stored (E, out, in), and transposed (E, in, out)
def test_fwsvd_weighs_each_expert_by_its_own_fisher_rows(smollm2_dir, model_type):
    """Each expert's Fisher row sums are its slice of the stacked parameter's per-sequence squared gradient,
    summed over its inputs, as plain autograd gives them; the whole fwsvd path then factors every expert."""
    model = _model(model_type, vocab_size=49152)
    spec, tokenizer, provider = _calibration(model, smollm2_dir, method="fwsvd", tensors=EXPERTS, calib_batch=None)
    plan = make_plan(spec, model.config, adapter=adapter_for_model(model))
    flags = [p.requires_grad for p in model.parameters()]
    stats = provider.layer_stats(model, 1, plan.targets)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())  # no trace
    assert provider.describe()["batch"] == 2  # stacked experts too take grad_batch: each expert sees its routed tokens
    experts = _experts(model, 1)
    want = {name: torch.zeros(4, getattr(experts, name).shape[-1 if experts.is_transposed else -2], dtype=torch.float64) for name in ("gate_up_proj", "down_proj")}
    params = {name: getattr(experts, name) for name in want}
    ids = provider.input_ids
    for i in range(ids.shape[0]):
        loss = model(input_ids=ids[i : i + 1], labels=ids[i : i + 1], use_cache=False).loss
        for (name, g) in zip(params, torch.autograd.grad(loss, list(params.values()))):
            want[name] += g.double().square().sum(dim=-2 if experts.is_transposed else -1)
    for name, w in want.items():
        got = stats[f"model.layers.1.mlp.experts.{name}"]
        assert len(got) == 4 and all(s is not None for s in got)  # every expert was routed some token
        torch.testing.assert_close(torch.stack([s.output_fisher for s in got]), w, rtol=1e-5, atol=0)
    report = compress_model(model, spec, tokenizer=tokenizer, progress=False)
    assert isinstance(experts.gate_up_proj, LowRankExpertWeights) and isinstance(_experts(model, 0).down_proj, LowRankExpertWeights)
    assert sum(n for name, n in report.solvers.items() if name.startswith("fwsvd-")) == 2 * 2 * 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 49152, (1, 8))).logits).all()


def test_fwsvd_solves_an_expert_no_gradient_reached_without_data(smollm2_dir, monkeypatch):
    """An expert the router never chose has zero Fisher rows: it is solved data-free, and its solver says so."""
    from lm_eval_lowrank import calibration

    real = calibration.fisher_row_sums

    def expert_2_unrouted(*args, **kwargs):
        sums, tokens = real(*args, **kwargs)
        for f in sums.values():
            f[2] = 0.0
        return sums, tokens

    monkeypatch.setattr(calibration, "fisher_row_sums", expert_2_unrouted)
    model = _model("mixtral", vocab_size=49152)
    spec, tokenizer, _ = _calibration(model, smollm2_dir, method="fwsvd", tensors="experts.down_proj", layers="2", calib_batch=None)
    report = compress_model(model, spec, tokenizer=tokenizer, progress=False)
    assert sum(n for name, n in report.solvers.items() if "without calibration tokens" in name) == 1
    assert sum(n for name, n in report.solvers.items() if name.startswith("fwsvd-")) == 3


def test_an_experts_class_with_another_forward_is_refused_before_anything_changes():
    model = _model("mixtral")
    experts = _experts(model)

    class OddExperts(type(experts)):
        def forward(self, hidden_states, top_k_index, top_k_weights):  # e.g. a custom routing rule
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    for layer in model.model.layers:
        layer.mlp.experts.__class__ = OddExperts
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(SpecError, match="OddExperts do not follow transformers' experts contract"):
        compress_model(model, {"rank": 2, "tensors": EXPERTS}, progress=False)
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert type(_experts(model)) is OddExperts


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_compressed_checkpoint_round_trip_with_expert_factors(model_type, tmp_path):
    from lm_eval_lowrank.checkpoint import CheckpointError, CompressedCheckpoint, load_compressed, save_compressed

    model = _model(model_type)
    report = compress_model(model, {"rank": 3, "tensors": f"q_proj|{EXPERTS}", "layers": "2", "layout": "tucker"}, progress=False)
    path = save_compressed(model, tmp_path / "ckpt", report)
    ckpt = CompressedCheckpoint.open(path)
    assert ckpt.manifest["format_version"] == 2  # older readers are told to upgrade, not handed experts as linears
    entry = ckpt.manifest["modules"]["model.layers.1.mlp.experts.gate_up_proj"]
    assert entry == {"rank": 3, "in_features": 32, "out_features": entry["out_features"], "layout": "tucker", "bias": False, "experts": 4, "transposed": model_type == "gpt_oss"}
    assert ckpt.manifest["params"]["after"] == report.params_after
    loaded = load_compressed(path)
    assert isinstance(_experts(loaded, 1), LowRankExperts) and not isinstance(_experts(loaded, 0), LowRankExperts)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert count_parameters(loaded) == report.params_after
    # expert factors of the wrong size are caught by the integrity check, before any model is built
    manifest = ckpt.manifest
    manifest["modules"]["model.layers.1.mlp.experts.gate_up_proj"]["experts"] = 3
    with pytest.raises(CheckpointError, match=r"experts.gate_up_proj.first is \(4, 3, 32\) in the file, the manifest implies \(3, 3, 32\)"):
        CompressedCheckpoint(path, manifest).verify(checksums=False)


def test_cache_hit_puts_the_same_expert_factors_back(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_LOWRANK_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "src"
    _model("olmoe").save_pretrained(source)
    spec = {"rank": 2, "tensors": f"k_proj|{EXPERTS}", "solver": "krylov"}
    runs = []
    for _ in range(2):
        model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
        runs.append((model, compress_model(model, spec, model_id=str(source), progress=False)))
    (m1, r1), (m2, r2) = runs
    assert not r1.cache["hit"] and r1.cache["stored"] and r2.cache["hit"]
    assert isinstance(_experts(m2), LowRankExperts) and isinstance(_experts(m2).down_proj, LowRankExpertWeights)
    assert r2.params_after == r1.params_after == count_parameters(m2)
    assert r2.sv_error_bound_modules == r1.sv_error_bound_modules == 2 * (1 + 2 * 4)  # per expert, and reported back
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


def test_attention_only_runs_keep_the_experts_untouched():
    model = _model("olmoe")
    dense = copy.deepcopy(_experts(model).state_dict())
    report = compress_model(model, {"rank": 2, "tensors": "q_proj|k_proj"}, progress=False)
    assert not isinstance(_experts(model), LowRankExperts)
    assert all(torch.equal(v, _experts(model).state_dict()[k]) for k, v in dense.items())
    assert report.plan.targets and not any(t.experts for t in report.plan.targets)


def test_lm_eval_hf_tucker_on_a_mixtral_decomposes_its_experts(tmp_path, smollm2_dir):
    """Through the real ``lm_eval`` command: the experts decomposed on load, the JSON saying so, and the
    parameter figures matching the model."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_arc_task
    from transformers import AutoTokenizer

    model_dir = tmp_path / "tiny_mixtral"
    _model("mixtral", vocab_size=49152).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(model_dir)
    (tmp_path / "tasks").mkdir()
    tasks = write_arc_task(tmp_path / "tasks", "arc_moe")
    lm_eval = Path(sys.executable).parent / "lm_eval"
    if not lm_eval.exists():
        pytest.skip("lm_eval not installed")
    out = tmp_path / "out"
    args = [
        str(lm_eval), "--model", "hf-tucker",
        "--model_args", f"pretrained={model_dir},dtype=float32,rank=2,layers=2,tensors=q_proj|{EXPERTS}",
        "--tasks", "arc_moe", "--include_path", str(tasks), "--limit", "4", "--device", "cpu", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LM_EVAL_LOWRANK_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    dec = res["config"]["lowrank"]["decomposition"]
    assert dec["modules"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    assert dec["tensors"] == ["q_proj", "experts.gate_up_proj", "experts.down_proj"]
    assert dec["expert_modules"] == {"model.layers.1.mlp.experts.gate_up_proj": 4, "model.layers.1.mlp.experts.down_proj": 4}
    assert dec["experts_forward"] == {"path": "loop"}  # the CPU's path (grouped GEMMs on CUDA)
    removed = 32 * 32 - 2 * 64 + 4 * (80 * 32 - 2 * 112) + 4 * (32 * 40 - 2 * 72)
    assert dec["params_removed"] == removed
    assert dec["cache"]["stored"] and not dec["cache"]["hit"]
    assert 0 <= res["results"]["arc_moe"]["acc,none"] <= 1


def test_space_counts_a_tokens_flops_over_its_routed_experts_only():
    """A token multiplies by top-k of the E expert matrices: FLOPs scale by k/E, parameters by E."""
    from lm_eval_lowrank.design_space import calculate

    config = _config("mixtral").to_dict()  # 4 experts, top-2
    dense = calculate(config, {"layout": "folded"})
    r = calculate(config, {"rank": 4, "tensors": EXPERTS, "layout": "folded"})
    per_layer = 32 * 32 + 2 * 16 * 32 + 32 * 32 + 2 * (80 * 32 + 32 * 40) + 4 * 32  # attention + 2 routed experts + router
    assert dense.linear_flops_before == 2 * (2 * per_layer + 64 * 32)
    saved_params = 2 * 4 * (80 * 32 - 4 * 112 + 32 * 40 - 4 * 72)
    assert r.params_removed == saved_params
    assert dense.flops_before - r.flops_after == 2 * saved_params * 2 // 4  # 2 FLOPs a parameter, 2 of 4 experts


def test_healing_trains_the_expert_factors_and_nothing_else(smollm2_dir):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.heal import heal_model

    model = _model("mixtral", vocab_size=49152)
    compress_model(model, {"rank": 2, "tensors": "q_proj|experts.down_proj"}, progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = [f"The {i}th expert routes tokens to the factors it holds, one rank at a time." for i in range(40)]
    record = heal_model(model, tokenizer, texts, steps=3, lr=1e-2, seq_len=16, batch_size=2, holdout_blocks=2, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    factors = {n for n in before if n.endswith((".first", ".last"))}
    assert {n for n in factors if "experts.down_proj" in n} and changed == factors
    assert record["loss_after"] != record["loss_before"]


def test_analyze_summarises_each_expert_and_their_mean(smollm2_dir):
    from lm_eval_lowrank.analysis import analyze_weight, table_rows
    from lm_eval_lowrank.cli.analyze import analyze_model

    model = _model("gpt_oss", vocab_size=49152)  # transposed storage: each expert's matrix is W[e]^T
    out = analyze_model(model, layers="1", ranks=(1, 4), spectrum=False)
    assert set(out[1]) == {"q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"}
    entry = out[1]["experts.gate_up_proj"]
    per = entry["experts"]["weights"]
    W = _experts(model).gate_up_proj.detach()
    assert len(per) == 4 and per[2] == analyze_weight(W[2].mT, (1, 4)).to_dict(False)
    assert per[2]["shape"] == [48, 32] and entry["weights"]["experts"] == 4
    assert entry["weights"]["effective_rank"] == pytest.approx(sum(d["effective_rank"] for d in per) / 4)
    assert any(row[1] == "experts.gate_up_proj" for row in table_rows(out))
    _spec, _tok, provider = _calibration(model, smollm2_dir, calib_target="compressed")
    with_acts = analyze_model(model, layers="1", tensors="experts.down_proj", ranks=(1, 4), provider=provider, spectrum=False)
    acts = with_acts[1]["experts.down_proj"]
    assert 1 <= len(acts["experts"]["activations"]) <= 4 and acts["activations"]["experts"] == len(acts["experts"]["activations"])


def test_offloaded_expert_weights_are_named_before_any_solve():
    from lm_eval_lowrank.api import _check_weights_in_memory

    model = _model("mixtral")
    experts = _experts(model, 1)
    experts._parameters["down_proj"] = nn.Parameter(torch.empty(experts.down_proj.shape, device="meta"))
    spec = DecompositionSpec.from_args({"rank": 2, "tensors": EXPERTS})
    with pytest.raises(SpecError, match=r"^model.layers.1.mlp.experts.down_proj is offloaded"):
        _check_weights_in_memory(model, spec, adapter_for_model(model))


def _deepseek():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(
            "deepseek_v3", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=16,
            kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, vocab_size=64, n_group=1, topk_group=1,
        )  # fmt: skip
    return config, _built(config)


def test_layers_that_differ_offer_each_projection_in_the_layers_that_hold_it():
    """DeepSeek-V3: a dense first layer, then MoE layers with routed and shared experts."""
    config, model = _deepseek()
    reference = copy.deepcopy(model)
    for adapter in (adapter_for_model(model), GenericAdapter.from_config(config)):
        assert adapter.layers_of("q_a_proj", 3) == (1, 2, 3)
        assert adapter.layers_of("gate_proj", 3) == (1,)  # the dense MLP
        assert adapter.layers_of("experts.down_proj", 3) == adapter.layers_of("mlp.shared_experts.down_proj", 3) == (2, 3)
    report = compress_model(model, {"rank": 2}, progress=False)
    by_layer = {layer: [t.tensor for t in report.plan.targets if t.layer == layer] for layer in (1, 2, 3)}
    assert "gate_proj" in by_layer[1] and "experts.gate_up_proj" not in by_layer[1]
    assert {"experts.gate_up_proj", "experts.down_proj", "mlp.shared_experts.up_proj"} <= set(by_layer[2]) and "gate_proj" not in by_layer[2]
    assert report.params_before - report.params_after == report.plan.params_removed == report.params_before - count_parameters(model)
    _reconstruct_into(model, reference)  # the same as transformers' forward on the reconstructed weights
    with torch.no_grad():
        ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(SpecError, match=r"^layers=1 holds no experts.down_proj: in this architecture 'experts.down_proj' is in layers 2\|3 only"):
        validate_against_config(DecompositionSpec.from_args({"rank": 2, "layers": "1", "tensors": "experts.down_proj"}), config)
    # several tensors, some absent from the chosen layer: the others are decomposed
    plan = make_plan(DecompositionSpec.from_args({"rank": 2, "layers": "1", "tensors": "gate_proj|experts.down_proj"}), config, adapter=GenericAdapter.from_config(config))
    assert [t.path for t in plan.targets] == ["model.layers.0.mlp.gate_proj"]


def test_space_counts_each_projection_in_the_layers_that_hold_it():
    from lm_eval_lowrank.design_space import calculate

    config, model = _deepseek()
    linears = sum(m.weight.numel() for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear))
    routed = sum(p.numel() for name, p in model.model.layers.named_parameters() if ".experts." in name)
    routers = sum(p.numel() for name, p in model.model.layers.named_parameters() if name.endswith("mlp.gate.weight"))  # layers 2, 3
    assert routers == 2 * 4 * 32
    report = calculate(config.to_dict(), {"layout": "folded"})
    assert report.linear_flops_before == 2 * (linears + routers + routed * 2 // 4 + model.lm_head.weight.numel())
    assert report.params_total == count_parameters(model)


# Further families whose experts follow the shared contract (transformers 5.23), at tiny sizes. Config fields a
# family does not know are ignored by it.
_TINY_ANY = dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=64, num_experts_per_tok=2, num_experts=4, num_local_experts=4, n_routed_experts=4, n_shared_experts=1,
    first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1,
    shared_expert_intermediate_size=24, max_position_embeddings=64,
)  # fmt: skip
_MORE_FAMILIES = {
    "deepseek_v2": {},
    "glm4_moe": {},
    "phimoe": {},
    "granitemoe": {},
    "granitemoeshared": {},
    "minimax": {},
    "hunyuan_v1_moe": {},
    "ernie4_5_moe": {},
    "dots1": {},
    "flex_olmo": dict(pad_token_id=0, eos_token_id=1, bos_token_id=None),
    "jamba": dict(attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0),
    "qwen3_next": dict(layer_types=["full_attention", "linear_attention"]),
}


@pytest.mark.parametrize("model_type", sorted(_MORE_FAMILIES))
def test_more_moe_families_compute_what_transformers_computes(model_type, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.CONFIG_MAPPING[model_type](**{**_TINY_ANY, **_MORE_FAMILIES[model_type]})
    model = _built(config)
    reference = copy.deepcopy(model)
    report = compress_model(model, {"rank": 2, "tensors": EXPERTS}, progress=False)
    assert report.plan.targets and all(t.experts == 4 for t in report.plan.targets)
    _reconstruct_into(model, reference)
    with torch.no_grad():
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert report.params_before - report.params_after == report.plan.params_removed
    _assert_grouped_equals_loop(model, ids, monkeypatch)


def _assert_grouped_equals_loop(model, ids, monkeypatch):
    """The grouped-GEMM forward (picked on CUDA) computes what the loop over the experts (picked here) does."""
    import lm_eval_lowrank.modules as modules

    calls = []
    with torch.no_grad():
        loop = model(ids).logits
        monkeypatch.setattr(modules, "use_grouped_experts", lambda *_: True)
        monkeypatch.setattr(modules, "check_grouped_experts", lambda *_: None)  # so only the model's forwards count
        monkeypatch.setattr(modules, "_grouped_experts_forward", _spy(modules._grouped_experts_forward, calls))
        grouped = model(ids).logits
        monkeypatch.undo()
    assert calls, "the grouped forward did not run"
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)


def _spy(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("model_type", sorted(_CONFIGS))  # the other families: test_more_moe_families_...
@pytest.mark.parametrize("rank", [1, 3])  # rows of 1 and 3 fp32 factors: not 16-byte aligned if row-major
def test_grouped_experts_forward_equals_the_loop_dense_or_factored(model_type, rank, monkeypatch):
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(2))
    for tensors, layout in ((EXPERTS, "folded"), ("experts.down_proj", "tucker")):  # one projection left dense
        model = _model(model_type)
        compress_model(model, {"rank": rank, "tensors": tensors, "layout": layout}, progress=False)
        _assert_grouped_equals_loop(model, ids, monkeypatch)


def test_grouped_experts_forward_takes_zero_tokens_like_transformers():
    from lm_eval_lowrank.modules import experts_forward

    model = _model("mixtral")
    experts = _experts(model)
    x, index, weights = torch.randn(0, experts.down_proj.shape[1]), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    with torch.no_grad():
        expected = experts(x, index, weights).shape
        compress_model(model, {"rank": 3, "tensors": EXPERTS}, progress=False)
        assert experts_forward(experts, x, index, weights, grouped=True).shape == expected == (0, x.shape[1])


def test_experts_tried_and_put_back_dense_get_their_own_class_and_forward_back():
    """The sensitivity allocator installs factors, measures and puts the dense weights back: a module left with
    none factored is the model's own again (it ran the package's forward and was reported as decomposed)."""
    from lm_eval_lowrank.methods.tucker import tucker2
    from lm_eval_lowrank.modules import experts_forward_path, install_expert_weights, restore_expert_weights

    model = _model("mixtral")
    experts, original = _experts(model), type(_experts(model))
    dense = {n: getattr(experts, n) for n in ("gate_up_proj", "down_proj")}
    for name, w in dense.items():
        install_expert_weights(experts, name, LowRankExpertWeights.from_factors([tucker2(w[e].float(), 2) for e in range(w.shape[0])]))
    restore_expert_weights(experts, "down_proj", dense["down_proj"])
    assert isinstance(experts, LowRankExperts)  # gate_up_proj is still factored
    restore_expert_weights(experts, "gate_up_proj", dense["gate_up_proj"])
    assert type(experts) is original and experts_forward_path(model) is None
    assert all(getattr(experts, n) is w for n, w in dense.items())


def test_grouped_experts_forward_skips_expert_parallel_sentinels_and_matches_transformers_in_bf16(monkeypatch):
    """Indices >= num_experts (experts on another rank) add nothing, in both paths, even where the kernel leaves
    their rows as garbage; in bf16 at top-8 the grouped forward on dense weights gives what transformers' own
    grouped forward gives."""
    import lm_eval_lowrank.modules as modules
    from lm_eval_lowrank.modules import experts_forward

    def garbage_past_the_groups(x, weight, offsets):  # what the kernel may leave there (fresh pages read as 0)
        out = grouped_mm(x, weight, offsets)
        out[int(offsets[-1]) :] = float("nan")
        return out

    grouped_mm = modules.grouped_mm
    monkeypatch.setattr(modules, "grouped_mm", garbage_past_the_groups)

    experts = _experts(_model("qwen3_moe", hidden_size=256, moe_intermediate_size=128, head_dim=64, num_experts=16, num_experts_per_tok=8))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    index = torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(64)])
    weights = torch.softmax(torch.randn(64, 8, generator=g), -1)
    local = index.clone()
    local[local >= 12] = 16  # experts 12-15 live on another rank
    with torch.no_grad():
        kept = torch.where(local < 16, weights, 0)
        expected = experts_forward(experts, x, index.clamp(max=11), kept, grouped=False)  # sentinels as zero weights
        for grouped in (False, True):
            got = experts_forward(experts, x, local, weights, grouped=grouped)
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        experts.to(torch.bfloat16)
        xb, wb = x.to(torch.bfloat16), weights.to(torch.bfloat16)
        theirs, ours = experts(xb, index, wb).float(), experts_forward(experts, xb, index, wb, grouped=True).float()
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-3


@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_a_grouped_kernel_that_fails_its_check_is_refused_and_the_json_says_why(failure, monkeypatch):
    """The grouped forward is checked against the loop once, where the model lies, when the results JSON is made:
    a kernel that raises or computes something else is refused there for that dtype, and the loop runs."""
    import lm_eval_lowrank.modules as modules

    model = _model("mixtral")
    compress_model(model, {"rank": 2, "tensors": EXPERTS}, progress=False)
    monkeypatch.setattr(modules, "grouped_kernel_pays", lambda device: True)
    monkeypatch.setattr(modules, "GROUPED_REFUSED", {})
    monkeypatch.setattr(modules, "GROUPED_PASSED", set())

    def broken(x, weight, offs):
        if failure == "raises":
            raise RuntimeError("grouped gemm is not supported for these shapes\nmore")
        return torch.zeros(x.shape[0], weight.shape[-1], dtype=x.dtype)

    monkeypatch.setattr(modules, "_GROUPED_MM", broken)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    path = modules.experts_forward_path(model)
    assert path["path"] == "loop" and path["grouped_refused"] == (
        "RuntimeError: grouped gemm is not supported for these shapes" if failure == "raises" else "its result differs from the loop's"
    )
    assert modules.GROUPED_REFUSED == {("cpu", torch.float32): path["grouped_refused"]}
    with torch.no_grad():
        assert not modules.use_grouped_experts(_experts(model), torch.randn(2, 32))
        assert torch.isfinite(model(ids).logits).all()  # ran the loop
    assert modules.experts_forward_path(model) == path  # and says so again without re-running the check


def test_decomposition_checks_the_grouped_forward_once_where_it_would_run(monkeypatch):
    import lm_eval_lowrank.modules as modules

    checks = []
    monkeypatch.setattr(modules, "grouped_kernel_pays", lambda device: True)
    monkeypatch.setattr(modules, "GROUPED_PASSED", set())
    monkeypatch.setattr(modules, "check_grouped_experts", _spy(modules.check_grouped_experts, checks))
    model = _model("mixtral")
    compress_model(model, {"rank": 2, "tensors": EXPERTS}, progress=False)
    assert len(checks) == 1 and modules.GROUPED_PASSED == {("cpu", torch.float32)}  # 4 replacements, one check
    assert modules.experts_forward_path(model) == {"path": "grouped_gemm"} and len(checks) == 1


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_expert_factors_are_held_where_grouped_gemms_read_them_in_place(rank):
    """Every factor view the grouped GEMMs read is one the kernel takes without a copy of all experts' weights,
    at any rank, after a cast, and after a load that assigns the (row-major) saved tensors."""
    from lm_eval_lowrank.modules import _grouped_mm_layout_ok

    model = _model("mixtral")
    compress_model(model, {"rank": rank, "tensors": EXPERTS}, progress=False)
    weights = _experts(model).down_proj

    def ready(w):
        return all(_grouped_mm_layout_ok(t) for t in w().grouped_operands())

    assert ready(weights) and ready(copy.deepcopy(weights).to(torch.bfloat16))
    saved = {k: v.contiguous() for k, v in weights.state_dict().items()}
    skeleton = LowRankExpertWeights.empty(4, weights.in_features, 32, rank, device="meta")
    skeleton.load_state_dict(saved, assign=True)
    assert ready(skeleton) and torch.equal(skeleton.dense_weight(), weights.dense_weight())
    rebuilt = LowRankExpertWeights(4, weights.in_features, 32, rank, parameters=saved)
    assert ready(rebuilt) and torch.equal(rebuilt.dense_weight(), weights.dense_weight())


@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize(("model_type", "tensors"), [("mixtral", EXPERTS), ("gpt_oss", EXPERTS), ("qwen3_moe", "experts.down_proj")])
def test_decomposed_experts_compute_the_same_under_accelerate_offload(offload, model_type, tensors, tmp_path):
    """accelerate's CPU/disk offload keeps weights on the meta device between forwards and loads them in hooks on
    the modules that own them. The factors are owned by LowRankExpertWeights, which the experts forward reads
    rather than calls: it must call them, or it reads meta tensors and the logits are wrong (0.55 off here)."""
    import accelerate

    from lm_eval_lowrank.modules import execution_device

    model = _model(model_type)
    compress_model(model, {"rank": 2, "tensors": tensors}, progress=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids).logits
    if offload == "cpu":
        offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    else:
        offloaded = accelerate.disk_offload(copy.deepcopy(model), str(tmp_path), execution_device=torch.device("cpu"))
    experts = _experts(offloaded)
    assert next(experts.down_proj.parameters()).is_meta  # really offloaded between forwards
    assert execution_device(experts) == torch.device("cpu")  # where it runs, not where its weights rest
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["works", "wrong"])
def test_offloaded_experts_check_the_grouped_forward_at_their_first_forward(kernel, monkeypatch):
    """Weights offloaded when the model is decomposed or loaded cannot be checked then: the first forward checks the
    grouped path where it runs, uses it only if it agrees with the loop, and the JSON says what ran."""
    import accelerate

    import lm_eval_lowrank.modules as modules

    model = _model("mixtral")
    compress_model(model, {"rank": 2, "tensors": EXPERTS}, progress=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
    offloaded = accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    checks, grouped_runs = [], []
    monkeypatch.setattr(modules, "grouped_kernel_pays", lambda device: True)
    monkeypatch.setattr(modules, "GROUPED_REFUSED", {})
    monkeypatch.setattr(modules, "GROUPED_PASSED", set())
    monkeypatch.setattr(modules, "check_grouped_experts", _spy(modules.check_grouped_experts, checks))
    monkeypatch.setattr(modules, "_grouped_experts_forward", _spy(modules._grouped_experts_forward, grouped_runs))
    if kernel == "wrong":
        monkeypatch.setattr(modules, "_GROUPED_MM", lambda x, weight, offs: torch.zeros(x.shape[0], weight.shape[-1], dtype=x.dtype))
    modules.ensure_grouped_checked(_experts(offloaded))
    assert not checks  # nothing to check against before the weights are loaded
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        offloaded(ids)
    assert len(checks) == 1  # once for both layers and both forwards
    if kernel == "works":
        assert len(grouped_runs) > 1 and modules.experts_forward_path(offloaded) == {"path": "grouped_gemm"}
    else:
        assert modules.experts_forward_path(offloaded) == {"path": "loop", "grouped_refused": "its result differs from the loop's"}


def test_the_results_json_says_which_experts_forward_the_evaluation_ran(smollm2_dir, tmp_path, monkeypatch):
    """decomposition.experts_forward is what the forwards ran (read when the JSON is made), not only what was
    expected at load; "mixed" with a count per path when the modules differ."""
    from transformers import AutoTokenizer

    import lm_eval_lowrank.modules as modules
    from lm_eval_lowrank.harness import HFTuckerLM

    _model("mixtral", vocab_size=49152).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(tmp_path)
    # cache=False: factors from the memory-mapped cache lie 8-byte aligned, where the kernel wants 16 (on a GPU they
    # are copied to aligned memory; on this CPU the loop would run for that reason alone)
    lm = HFTuckerLM(pretrained=str(tmp_path), device="cpu", rank=2, tensors=EXPERTS, cache=False, energy_idle_seconds=0, measure_energy=False)
    assert lm._lowrank_report["experts_forward"] == {"path": "loop"}  # the CPU's choice, before any forward
    monkeypatch.setattr(modules, "grouped_kernel_pays", lambda device: True)
    monkeypatch.setattr(modules, "GROUPED_PASSED", {("cpu", torch.float32)})
    lm._model_call(torch.randint(0, 100, (2, 8)))
    assert lm.get_model_info()["lowrank"]["decomposition"]["experts_forward"] == {"path": "grouped_gemm"}
    use_grouped = modules.use_grouped_experts
    monkeypatch.setattr(modules, "use_grouped_experts", lambda m, *a: m is _experts(lm.model, 0) and use_grouped(m, *a))
    lm._model_call(torch.randint(0, 100, (2, 8)))
    assert lm.get_model_info()["lowrank"]["decomposition"]["experts_forward"] == {"path": "mixed", "modules": {"grouped_gemm": 1, "loop": 1}}


def test_grouped_experts_are_picked_for_inference_where_the_kernel_pays(monkeypatch):
    """CUDA is where grouped GEMMs pay; on this CPU they were not reliably faster, so the loop runs here. Training
    keeps the loop (the CPU kernel has no working backward), as does a model that asks for
    experts_implementation="eager"."""
    import lm_eval_lowrank.modules as modules

    model = _model("mixtral")
    compress_model(model, {"rank": 2, "tensors": EXPERTS}, progress=False)
    experts, x = _experts(model), torch.randn(4, 32)
    assert not modules.grouped_kernel_pays(torch.device("cpu")) and not modules.use_grouped_experts(experts, x)
    monkeypatch.setattr(modules, "grouped_kernel_pays", lambda device: True)
    with torch.no_grad():
        assert modules.use_grouped_experts(experts, x)
        assert not modules.use_grouped_experts(experts, x.double())  # no kernel for fp64
    assert not modules.use_grouped_experts(experts, x)  # grad enabled and the factors train
    experts.requires_grad_(False)
    assert modules.use_grouped_experts(experts, x)
    assert modules.experts_forward_path(model) == {"path": "grouped_gemm"}  # what the results JSON records
    monkeypatch.setattr(experts.config, "_experts_implementation", "eager")
    assert not modules.use_grouped_experts(experts, x) and modules.experts_forward_path(model) == {"path": "loop"}
    monkeypatch.undo()
    monkeypatch.setattr(modules, "grouped_kernel_pays", lambda device: True)
    tucker = _model("mixtral")
    compress_model(tucker, {"rank": 3, "tensors": EXPERTS, "layout": "tucker"}, progress=False)
    with torch.no_grad():  # a 3x3 core's rows are 12 bytes: the loop, rather than copying every core per call
        assert not modules.use_grouped_experts(_experts(tucker), x)


def test_grouped_mm_takes_any_layout_and_falls_back_to_a_loop_where_the_kernel_cannot(monkeypatch):
    """Odd widths, transposed views, size-1 dims, fp64 and bf16, empty groups: every group's rows times its
    matrix, whether the kernel or the loop ran; a left operand with unaligned rows is copied, not refused."""
    import itertools

    import lm_eval_lowrank.modules as modules

    g = torch.Generator().manual_seed(0)
    ran = {"kernel": 0}
    kernel = modules._GROUPED_MM

    def counted(*args, **kwargs):
        ran["kernel"] += 1
        return kernel(*args, **kwargs)

    monkeypatch.setattr(modules, "_GROUPED_MM", counted)
    for k, n, groups, dtype in itertools.product((1, 3, 8, 13), (1, 5, 32), (1, 4), (torch.float32, torch.bfloat16, torch.float64)):
        x = torch.randn(20, k, generator=g).to(dtype)
        ends = sorted(torch.randint(0, 21, (groups,), generator=g).tolist())
        for w in (torch.randn(groups, k, n, generator=g).to(dtype), torch.randn(groups, n, k, generator=g).to(dtype).mT):
            got = modules.grouped_mm(x, w, torch.tensor(ends, dtype=torch.int32))
            start = 0
            for e, end in enumerate(ends):
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(got[start:end], x[start:end] @ w[e], rtol=tol, atol=tol)
                start = end
    before = ran["kernel"]
    h = torch.randn(6, 3, generator=g)  # rows of 12 bytes (a rank-3 intermediate): copied to aligned rows
    w = torch.randn(4, 3, 8, generator=g)
    got = modules.grouped_mm(h, w, torch.tensor([2, 2, 5, 6], dtype=torch.int32))
    assert ran["kernel"] == before + 1
    torch.testing.assert_close(got[2:5], h[2:5] @ w[2])
    assert ran["kernel"] > 0


def test_experts_under_an_accelerate_hook_run_the_factored_forward(monkeypatch):
    """device_map/parallelize=True models carry accelerate hooks that call the forward they wrapped: after the
    replacement that must be the factored one, not the dense contract reading reconstructed weights."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = _model("qwen3_moe")
    for layer in model.model.layers:
        add_hook_to_module(layer.mlp.experts, ModelHook())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    compress_model(model, {"rank": 2, "tensors": EXPERTS}, progress=False)

    def dense_reconstruction(*_):
        raise AssertionError("the dense contract ran on reconstructed weights")

    with torch.no_grad():
        expected = model(ids).logits
        monkeypatch.setattr(LowRankExpertWeights, "__getitem__", dense_reconstruction)
        assert torch.equal(model(ids).logits, expected)


def test_output_error_curve_of_experts_weights_each_expert_by_its_tokens():
    from lm_eval_lowrank.allocation import error_curve, experts_error_curve
    from lm_eval_lowrank.methods import LayerStats

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    plain = experts_error_curve(W, None, "tucker")  # no statistics: every expert alike, C = I
    tails = [torch.linalg.svdvals(W[e]).square().flip(0).cumsum(0).flip(0) for e in range(3)]
    torch.testing.assert_close(plain[:5], sum(tails) / float(sum(tails)[0]))
    assert plain[0] == 1 and plain[5] == 0
    covs = [(lambda x: x.mT @ x / 40)(torch.randn(40, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
    stats = [LayerStats(covs[0], 40), None, LayerStats(covs[1], 10)]  # expert 1 got no token
    curve = experts_error_curve(W, stats, "whiten")
    weighted = [error_curve(W[0], covs[0], "whiten") * 40, error_curve(W[2], covs[1], "whiten") * 10]
    totals = [float(_tail0(W[0], covs[0])) * 40, float(_tail0(W[2], covs[1])) * 10]
    expected = (weighted[0] * totals[0] / 40 + weighted[1] * totals[1] / 10) / (totals[0] + totals[1])
    torch.testing.assert_close(curve, expected)


def _tail0(W, C):
    return torch.trace(W @ C @ W.mT)  # the whole output energy ||W X||^2 / N


def test_output_error_budget_ranks_experts_on_their_own_curves(smollm2_dir):
    from transformers import AutoTokenizer

    model = _model("mixtral", vocab_size=49152)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    spec = {"budget": 0.6, "allocator": "output_error", "method": "whiten", "calib_n": 6, "calib_len": 16, "cache": False, "tensors": f"q_proj|{EXPERTS}"}
    report = compress_model(model, spec, tokenizer=tokenizer, progress=False)
    assert report.allocation["realised_keep"] <= 0.6 and report.allocation["allocator"] == "output_error"
    assert any(t.experts for t in report.plan.targets)
    assert report.params_before - report.params_after == report.plan.params_removed


def test_fisher_curve_of_experts_sums_each_experts_own_estimate():
    """Each expert's estimate uses its own tokens' covariance and its own rows' Fisher sums (which already carry how
    often the router chose it); an expert without statistics adds nothing."""
    from lm_eval_lowrank.allocation import experts_fisher_loss_curve, fisher_error_tail
    from lm_eval_lowrank.methods import LayerStats

    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    covs = [(lambda x: x.mT @ x / 40)(torch.randn(40, 5, generator=g, dtype=torch.float64)) for _ in range(2)]
    rows = [torch.rand(6, generator=g, dtype=torch.float64) for _ in range(2)]
    stats = [LayerStats(covs[0], 40, output_fisher=rows[0]), None, LayerStats(covs[1], 10, output_fisher=rows[1])]
    curve = experts_fisher_loss_curve(W, stats, "whiten", None, 0.5)
    expected = sum(0.5 * fisher_error_tail(W[e], c, f, "whiten") / float(torch.trace(c)) for e, c, f in ((0, covs[0], rows[0]), (2, covs[1], rows[1])))
    torch.testing.assert_close(curve, expected)
    assert float(curve[-1]) == 0 and float(curve[0]) > 0
    with pytest.raises(SpecError, match="allocator=fisher needs statistics for every expert projection"):
        experts_fisher_loss_curve(W, None, "whiten", None, 0.5)


def test_fisher_budget_ranks_experts_on_their_loss_estimates(smollm2_dir):
    from transformers import AutoTokenizer

    model = _model("mixtral", vocab_size=49152)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    spec = {"budget": 0.6, "allocator": "fisher", "method": "whiten", "calib_n": 6, "calib_len": 16, "cache": False, "tensors": f"q_proj|{EXPERTS}"}
    report = compress_model(model, spec, tokenizer=tokenizer, progress=False)
    assert report.allocation["realised_keep"] <= 0.6 and report.allocation["predicted_loss_increase"] > 0
    assert any(t.experts for t in report.plan.targets)
    assert report.params_before - report.params_after == report.plan.params_removed


def test_bf16_experts_sum_a_tokens_experts_in_fp32_like_transformers_default():
    """Top-8 routing in bf16: summing the eight experts' outputs in bf16 (index_add_) drifted 0.6 % of the output's
    scale from transformers' default grouped forward, which sums in fp32; summed in fp32 it matches."""
    from lm_eval_lowrank.modules import experts_forward

    experts = _experts(_model("qwen3_moe", hidden_size=256, moe_intermediate_size=128, head_dim=64, num_experts=16, num_experts_per_tok=8)).to(torch.bfloat16)
    assert experts.config._experts_implementation == "grouped_mm"  # transformers' default for a model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g).to(torch.bfloat16)
    index = torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(512)])
    weights = torch.softmax(torch.randn(512, 8, generator=g), -1).to(torch.bfloat16)
    with torch.no_grad():
        theirs, ours = experts(x, index, weights).float(), experts_forward(experts, x, index, weights).float()
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-3


def test_a_model_with_factored_experts_pickles_and_deep_copies():
    """The LowRank<Class> is made at run time; torch.save / copy.deepcopy of the model must still work."""
    import io

    model = _model("mixtral")
    compress_model(model, {"rank": 2, "tensors": EXPERTS}, progress=False)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(6))
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert type(_experts(other)) is type(_experts(model)) and isinstance(_experts(other).down_proj, LowRankExpertWeights)
        with torch.no_grad():
            assert torch.equal(other(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "name,total,active",
    [("mixtral-8x7b", 46_702_792_704, 12.9e9), ("olmoe-1b-7b", 6_919_161_856, 1.3e9)],
)
def test_builtin_moe_configs_cost_what_their_model_cards_say(name, total, active):
    """`space --model mixtral-8x7b`: the published totals exactly, and the FLOPs of the active parameters
    (2 per active parameter in the projections and the head; the input embedding is a lookup)."""
    from lm_eval_lowrank.design_space import calculate, load_config

    config = load_config(name)
    report = calculate(config, {"layout": "folded"}, seq_len=0)
    assert report.params_total == total
    embedding = config["vocab_size"] * config["hidden_size"]
    assert report.flops_before / 2 + embedding == pytest.approx(active, rel=0.02)
    assert load_config({"mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1", "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924"}[name]) == config


def test_sensitivity_allocator_measures_expert_truncations_and_puts_the_dense_experts_back(smollm2_dir):
    """allocator=sensitivity swaps truncated experts into the model, scores it, and puts the very same dense
    parameters back before the real decomposition."""
    from lm_eval_lowrank.allocation import allocate_ranks

    model = _model("mixtral", vocab_size=49152)
    dense = {n: p for n, p in model.named_parameters() if "experts" in n}
    spec, tokenizer, provider = _calibration(model, smollm2_dir, budget=0.6, allocator="sensitivity", calib_n=8, rank=None, tensors=EXPERTS)
    ranks = allocate_ranks(spec, model, adapter=adapter_for_model(model), stats_provider=provider, tokenizer=tokenizer)
    assert {n: p for n, p in model.named_parameters() if "experts" in n} == dense  # the same Parameter objects
    assert all(isinstance(_experts(model, i).down_proj, nn.Parameter) for i in range(2))
    measured = ranks.info["measured"]
    assert set(measured["loss_increase"]) == {"1", "2"} and ranks.info["realised_keep"] <= 0.6
    assert set(ranks) <= {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")} and ranks
    report = compress_model(model, spec, tokenizer=tokenizer, progress=False)
    assert report.allocation["allocator"] == "sensitivity" and any(t.experts for t in report.plan.targets)
    assert report.params_before - report.params_after == report.plan.params_removed


def test_routed_gradient_row_sums_reader_both_ways_are_each_sequences_squared_gradient():
    """One expert's tokens come from several sequences at once: through the kernel masked to same-sequence pairs
    (few tokens) or the explicit products (many), the sum of each sequence's own squared weight gradient."""
    from lm_eval_lowrank.calibration import _routed_gradient_row_sums_reader

    gen = torch.Generator().manual_seed(5)
    for tokens, n_in, n_out in ((9, 16, 24), (60, 8, 6)):
        x, g = torch.randn(tokens, n_in, generator=gen), torch.randn(tokens, n_out, generator=gen)
        sequence = torch.randint(0, 3, (tokens,), generator=gen)
        expected = sum((g[sequence == n].double().mT @ x[sequence == n].double()).square().sum(dim=1) for n in range(3))
        read, kept = _routed_gradient_row_sums_reader(x, sequence, n_out)
        got = read(g)
        assert kept.shape == ((tokens, tokens) if tokens * (n_in + n_out) <= n_in * n_out else x.shape)  # the kernel, or the inputs
        assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=1e-5)
        pooled = (g.double().mT @ x.double()).square().sum(dim=1)  # one gradient for the whole batch: not the Fisher
        assert not torch.allclose(got, pooled, rtol=1e-3)


@pytest.mark.parametrize("model_type", sorted(_CONFIGS))
def test_batched_gradient_pass_of_experts_equals_the_per_sequence_one(model_type):
    """Experts take grad_batch like linears: batches of 2 and 4 over 5 sequences (short last batches) give the
    per-sequence weight-gradient pass's sums, for both projections beside a linear, and the experts module's own
    forward is back afterwards."""
    from lm_eval_lowrank import calibration
    from lm_eval_lowrank.calibration import fisher_row_sums

    model = _model(model_type)
    experts = _experts(model, 1)
    forward = experts.forward
    ids = torch.randint(0, model.config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(6))
    paths = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    per_sequence, _ = fisher_row_sums(model, paths, ids, batch_size=1)
    for batch in (2, 4):
        batched, tokens = fisher_row_sums(model, paths, ids, batch_size=batch)
        assert tokens == 60 and "forward" not in experts.__dict__ and experts.forward == forward
        for p in paths:
            assert batched[p].shape == per_sequence[p].shape and float(batched[p].min()) > 0
            torch.testing.assert_close(batched[p], per_sequence[p], rtol=1e-5, atol=0)
    # Layers recomputed in the backward (grad_checkpoint) route the same tokens again: the same bits, both ways.
    for batch, expected in ((1, per_sequence), (2, fisher_row_sums(model, paths, ids, batch_size=2)[0])):
        checkpointed, _ = fisher_row_sums(model, paths, ids, batch_size=batch, checkpoint_layers=True)
        assert "forward" not in experts.__dict__ and "forward" not in model.model.layers[1].__dict__
        assert all(torch.equal(checkpointed[p], expected[p]) for p in paths)
        # auto, with no room: the first batch's forward stops in layer 2's experts and the pass checkpoints instead
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(calibration, "free_memory_bytes", lambda device: 2000)
            report: dict = {}
            switched, _ = fisher_row_sums(model, paths, ids, batch_size=batch, report=report)
        assert report["checkpoint_layers"] is True and 1000 < report["held_bytes_first_batch"]
        assert "forward" not in experts.__dict__ and all(torch.equal(switched[p], expected[p]) for p in paths)
    # What each expert's reader keeps until the backward (its kernel or its tokens) is counted as held.
    kept: list[torch.Tensor] = []
    counted: set[int] = set()
    real_reader, real_hold = calibration._routed_gradient_row_sums_reader, calibration._HeldBytes.hold

    def reader(*args):
        read, tensor = real_reader(*args)
        kept.append(tensor)
        return read, tensor

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibration, "_routed_gradient_row_sums_reader", reader)
        mp.setattr(calibration._HeldBytes, "hold", lambda self, t: (counted.add(id(t)), real_hold(self, t))[1])
        fisher_row_sums(model, paths, ids[:2], batch_size=2)
    assert kept and all(id(t) in counted for t in kept)


def test_a_rank_past_a_tensor_that_all_brought_in_keeps_it_dense_and_is_an_error_only_where_named():
    """Qwen2-MoE's shared_expert_gate is a 1 x hidden linear: no rank saves parameters there. rank=8 on every
    tensor (the default) keeps it dense with the others decomposed; naming it, or a rank no selected tensor
    can take, is an error."""
    from lm_eval_lowrank.architectures import config_side_adapter

    config = _config("qwen2_moe")
    adapter = config_side_adapter(config)
    with pytest.warns(UserWarning, match="kept dense"):
        plan = make_plan(DecompositionSpec.from_args({"rank": 8}), config, adapter=adapter)
    assert {s["path"].rsplit(".", 1)[-1] for s in plan.skipped} == {"shared_expert_gate"}
    assert plan.targets and all(t.rank == 8 for t in plan.targets)
    with pytest.raises(SpecError, match=r"rank=8 is invalid for tensor 'shared_expert_gate' \(1x32\): valid 1\.\.1, and no rank saves parameters"):
        make_plan(DecompositionSpec.from_args({"rank": 8, "tensors": "q_proj|shared_expert_gate"}), config, adapter=adapter)
    with pytest.raises(SpecError, match=r"rank=5000 is invalid for tensor"):
        make_plan(DecompositionSpec.from_args({"rank": 5000}), config, adapter=adapter)
