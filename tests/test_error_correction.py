"""Error correction (fit the dense model's outputs: calib_target=dense) and staged calibration within a layer."""

from __future__ import annotations

import copy

import pytest
import torch

from lm_eval_lowrank.methods import LayerStats, get_method
from lm_eval_lowrank.spec import DecompositionSpec, SpecError


def _stats(X: torch.Tensor, X_ref: torch.Tensor | None = None) -> LayerStats:
    X = X.double()
    cross = None if X_ref is None else X.mT @ X_ref.double() / X.shape[0]
    return LayerStats(X.mT @ X / X.shape[0], X.shape[0], cross)


def _err(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor, X_ref: torch.Tensor) -> float:
    return float((X_ref.double() @ W.double().mT - X.double() @ W_hat.double().mT).norm())


def _optimum(W: torch.Tensor, X: torch.Tensor, X_ref: torch.Tensor, r: int) -> float:
    """min over rank-r W' of ||X_ref W^T - X W'^T||, another way: QR of X, then a full SVD (fp64)."""
    Y = X_ref.double() @ W.double().mT
    Q, _ = torch.linalg.qr(X.double())  # X W'^T ranges over the column space of Q
    inside = Q.mT @ Y
    outside = Y - Q @ inside  # out of reach of any W'
    s = torch.linalg.svdvals(inside)
    return float((outside.norm() ** 2 + s[r:].square().sum()).sqrt())


@pytest.fixture
def shifted():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 24, generator=g)
    X_ref = torch.randn(600, 24, generator=g) * torch.logspace(1, -1, 24)  # dense inputs, anisotropic
    mix = torch.eye(24) + 0.3 * torch.randn(24, 24, generator=g)
    X = X_ref @ mix + 0.2 * torch.randn(600, 24, generator=g)  # what the compressed model feeds instead
    return W, X, X_ref


# -- the closed form ------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 5, 12])
def test_reference_equal_to_input_is_plain_whitening(shifted, r):
    W, X, _ = shifted
    plain = get_method("whiten")(W, r, _stats(X), solver="exact")
    same = get_method("whiten")(W, r, _stats(X, X), solver="exact")
    assert plain.info["whiten_target"] == "compressed" and same.info["whiten_target"] == "dense"
    # Equal up to fp32 rounding (W S versus W C S^-T) ...
    assert float((same.dense() - plain.dense()).norm()) < 1e-3 * float(plain.dense().norm())
    # ... and exactly in fp64.
    from lm_eval_lowrank.methods.whiten import whitened_target, whitening_factor

    C = _stats(X).input_cov
    S, _, _ = whitening_factor(C, fp32_lambdas=())
    assert torch.allclose(whitened_target(W.double(), S, C), W.double() @ S, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("r", [1, 5, 12, 24])
def test_error_correction_reaches_the_optimum(shifted, r):
    W, X, X_ref = shifted
    corrected = get_method("whiten")(W, r, _stats(X, X_ref), solver="exact")
    plain = get_method("whiten")(W, r, _stats(X), solver="exact")
    opt = _optimum(W, X, X_ref, r)
    assert _err(W, corrected.dense(), X, X_ref) == pytest.approx(opt, rel=1e-3)
    assert _err(W, plain.dense(), X, X_ref) > 1.05 * opt  # plain whitening fits W X, not the dense outputs


def test_error_correction_with_the_randomized_solver(shifted):
    W, X, X_ref = shifted
    f = get_method("whiten")(W, 4, _stats(X, X_ref), solver="randomized", seed=1)
    assert _err(W, f.dense(), X, X_ref) == pytest.approx(_optimum(W, X, X_ref, 4), rel=1e-2)


def test_bad_cross_covariance_is_one_line():
    W = torch.randn(6, 5)
    st = LayerStats(torch.eye(5, dtype=torch.float64), 10, torch.eye(4, dtype=torch.float64))
    with pytest.raises(SpecError, match=r"cross-covariance has shape \(4, 4\)"):
        get_method("whiten")(W, 2, st)


# -- the spec -------------------------------------------------------------------------------------


def test_calib_target_and_staged_validate():
    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 2, "calib_target": "Dense", "calib_staged": "false"})
    assert spec.calib_target == 1.0 and spec.calib_staged is False
    assert DecompositionSpec.from_args({"calib_target": "compressed"}).calib_target == 0.0
    assert DecompositionSpec.from_args({"calib_target": 0.5}).calib_target == 0.5  # lm-eval types 0.5 as a float
    assert DecompositionSpec.from_args({"calib_target": "0"}).calib_target == 0.0
    d = DecompositionSpec()
    assert d.calib_target == 0.25 and d.calib_staged is True  # the measured best for whiten (README)
    msg = r" is invalid: valid: compressed, dense, or the weight of the dense model's outputs in the target, 0..1 \(e.g. 0.25\)$"
    for bad in ("exact", 1.5, -0.1, "nan", True):
        with pytest.raises(SpecError, match=r"^calib_target=" + repr(bad).replace(".", r"\.") + msg):
            DecompositionSpec.from_args({"calib_target": bad})
    with pytest.raises(SpecError, match=r"^calib_staged='maybe' is invalid: expected true or false$"):
        DecompositionSpec.from_args({"calib_staged": "maybe"})


def test_new_arguments_key_the_decomposition_cache():
    from lm_eval_lowrank.checkpoint import _FACTOR_FIELDS

    assert {"calib_target", "calib_staged"} <= set(_FACTOR_FIELDS)


# -- the provider -------------------------------------------------------------------------------


def _ids(n=8, length=16):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(5))


def _provider(model, target, spec=None, cache_dir=None):
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import SequentialStatsProvider, model_fingerprint

    key = model_fingerprint(model, "tiny") if cache_dir else None
    rec = {"source": "test", "n": 8, "len": 16, "seed": 0}
    return SequentialStatsProvider(model, adapter_for_model(model), _ids(), batch_size=4, record=rec, cache_dir=cache_dir, model_key=key, spec=spec, target=target)


def _inputs(model, path, ids):
    seen = []
    h = model.get_submodule(path).register_forward_hook(lambda _m, a, _o: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    return torch.cat(seen)


class Recorder:
    """Wraps a provider; records, per request, the targets and which modules of that layer were already low-rank."""

    def __init__(self, inner):
        self.inner, self.calls, self.stats = inner, [], {}

    def layer_stats(self, model, layer, targets):
        from lm_eval_lowrank.modules import LowRankLinear

        done = sorted(n for n, m in model.model.layers[layer - 1].named_modules() if isinstance(m, LowRankLinear))
        self.calls.append((layer, [t.tensor for t in targets], done))
        out = self.inner.layer_stats(model, layer, targets)
        self.stats.update(out)
        return out

    def describe(self):
        return self.inner.describe()


def _decompose(model, target, staged, layers="1|3", cache_dir=None):
    from lm_eval_lowrank.decompose import decompose_model

    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 8, "layers": layers, "calib_target": target, "calib_staged": staged})
    prov = Recorder(_provider(model, target, spec, cache_dir))
    report = decompose_model(model, spec, stats_provider=prov, progress=False)
    return prov, report


def test_staged_calibration_order(tiny_llama):
    dense = copy.deepcopy(tiny_llama)
    prov, report = _decompose(tiny_llama, "compressed", True)
    attn = ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    mlp = ["mlp.gate_proj", "mlp.up_proj"]
    for layer in (1, 3):
        calls = [c for c in prov.calls if c[0] == layer]
        assert calls == [
            (layer, ["q", "k", "v"], []),
            (layer, ["o"], attn),
            (layer, ["gate", "up"], sorted(attn + ["self_attn.o_proj"])),
            (layer, ["down"], sorted(attn + ["self_attn.o_proj"] + mlp)),
        ]
    assert report.to_dict()["calibration"]["layers_computed"] == [1, 1, 1, 1, 3, 3, 3, 3]
    # o and down were calibrated on the inputs they get in the final model (their own layer's earlier stages replaced).
    ids = prov.inner.input_ids
    for path in ("model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj"):
        X = _inputs(tiny_llama, path, ids)
        assert torch.allclose(prov.stats[path].input_cov, X.mT @ X / X.shape[0], rtol=1e-4, atol=1e-6)
        Xd = _inputs(dense, path, ids)
        assert not torch.allclose(prov.stats[path].input_cov, Xd.mT @ Xd / Xd.shape[0], rtol=1e-2, atol=1e-4)
        assert prov.stats[path].cross_cov is None


def test_unstaged_calibration_is_one_request_per_layer(tiny_llama):
    prov, _ = _decompose(tiny_llama, "compressed", False)
    assert [(c[0], c[2]) for c in prov.calls] == [(1, []), (3, [])]


def test_tucker_is_not_staged(tiny_llama):
    from lm_eval_lowrank.decompose import decompose_model

    spec = DecompositionSpec.from_args({"method": "tucker", "rank": 8, "layers": "1|3", "calib_staged": True})
    prov = Recorder(_provider(tiny_llama, "compressed", spec))
    decompose_model(tiny_llama, spec, stats_provider=prov, progress=False)
    assert [c[0] for c in prov.calls] == [1, 3]


@pytest.mark.parametrize("staged", [False, True])
def test_dense_target_cross_covariance(tiny_llama, staged):
    dense = copy.deepcopy(tiny_llama)
    prov, _ = _decompose(tiny_llama, "dense", staged)
    ids = prov.inner.input_ids
    st = prov.stats
    # Layer 1, first stage: nothing compressed upstream, so X_ref = X and no cross term is sent.
    assert st["model.layers.0.self_attn.q_proj"].cross_cov is None
    # Layer 3: inputs after the compressed layer 1 (and, staged, this layer's earlier stages) against the dense model's.
    # Unstaged, only q's input is what it is in the final model (gate's follows this layer's dense attention).
    checked = ["model.layers.2.self_attn.q_proj"]
    if staged:
        checked += ["model.layers.2.mlp.gate_proj", "model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    else:
        assert st["model.layers.0.self_attn.o_proj"].cross_cov is None
    for path in checked:
        X, X_ref = _inputs(tiny_llama, path, ids), _inputs(dense, path, ids)
        n = X.shape[0]
        assert torch.allclose(st[path].cross_cov, X.mT @ X_ref / n, rtol=1e-4, atol=1e-6), path
        assert torch.allclose(st[path].input_cov, X.mT @ X / n, rtol=1e-4, atol=1e-6), path
        assert not torch.allclose(X, X_ref, rtol=1e-3, atol=1e-4)
    assert st["model.layers.2.self_attn.k_proj"].cross_cov is st["model.layers.2.self_attn.q_proj"].cross_cov
    assert prov.inner.describe()["target"] == 1.0
    # The dense modules are lent back only for the reference runs: the model stays compressed.
    from lm_eval_lowrank.modules import LowRankLinear

    assert isinstance(tiny_llama.get_submodule("model.layers.0.self_attn.q_proj"), LowRankLinear)


def test_blended_target(tiny_llama):
    """calib_target=0.25: cross_cov = C + 0.25 (P - C), the cross-covariance against 0.75 X + 0.25 X_ref."""
    dense = copy.deepcopy(tiny_llama)
    prov, _ = _decompose(tiny_llama, 0.25, True)
    ids = prov.inner.input_ids
    for path in ("model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        X, X_ref = _inputs(tiny_llama, path, ids), _inputs(dense, path, ids)
        n = X.shape[0]
        C, P = X.mT @ X / n, X.mT @ X_ref / n
        assert torch.allclose(prov.stats[path].cross_cov, C + 0.25 * (P - C), rtol=1e-4, atol=1e-6)
    assert prov.stats["model.layers.0.self_attn.q_proj"].cross_cov is None


def test_dense_target_fits_the_dense_outputs_better(tiny_llama):
    """The whole model: calibration-set logits closer to the dense model's with error correction."""
    ids = _ids()
    with torch.no_grad():
        ref = tiny_llama(input_ids=ids).logits
    errs = {}
    for target in ("compressed", "dense"):
        m = copy.deepcopy(tiny_llama)
        _decompose(m, target, True, layers="1-4")
        with torch.no_grad():
            errs[target] = float((m(input_ids=ids).logits - ref).norm())
    assert errs["dense"] < errs["compressed"]


def test_dense_target_stats_cache(tiny_llama, tmp_path):
    state = copy.deepcopy(tiny_llama.state_dict())
    first, _ = _decompose(tiny_llama, "dense", True, cache_dir=tmp_path)
    assert (first.inner.hits, first.inner.misses) == (0, 8)

    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    again = LlamaForCausalLM(tiny_llama_config()).eval()
    again.load_state_dict(state)
    second, _ = _decompose(again, "dense", True, cache_dir=tmp_path)
    assert (second.inner.hits, second.inner.misses) == (8, 0)
    for (k, a), (_, b) in zip(tiny_llama.state_dict().items(), again.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), k
    other = LlamaForCausalLM(tiny_llama_config()).eval()
    other.load_state_dict(state)
    third, _ = _decompose(other, "compressed", True, cache_dir=tmp_path)
    assert third.inner.hits == 1  # only layer 1's first stage is the same without error correction


# -- stages read off the forward, for architectures whose adapter lists none -------------------------------------
def test_forward_stages_reproduce_the_declared_llama_stages(tiny_llama):
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.decompose import calibration_stages
    from lm_eval_lowrank.plan import make_plan

    adapter = adapter_for_model(tiny_llama)
    targets = [t for t in make_plan(DecompositionSpec.from_args({"rank": 2, "layers": "2"}), tiny_llama.config, adapter=adapter).targets]
    read = _provider(tiny_llama, "compressed").forward_stages(tiny_llama, 2, targets)
    assert [[t.tensor for t in g] for g in read] == [[t.tensor for t in g] for g in calibration_stages(targets, adapter)]
    assert [[t.tensor for t in g] for g in read] == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


def _tiny_generic(kind):
    import transformers

    torch.manual_seed(0)
    if kind == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, vocab_size=128)
        return transformers.GPTNeoXForCausalLM(cfg).eval()
    cfg = transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4, vocab_size=128, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(cfg).eval()


class StagedRecorder(Recorder):
    def forward_stages(self, model, layer, targets):
        return self.inner.forward_stages(model, layer, targets)

    def layer_stats(self, model, layer, targets):
        self.calls.append((layer, [t.tensor for t in targets]))
        return self.inner.layer_stats(model, layer, targets)


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("gpt_neox", [["query_key_value"], ["dense"], ["dense_h_to_4h"], ["dense_4h_to_h"]]),
        ("opt", [["k_proj", "v_proj", "q_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
    ],
)
def test_generic_architectures_are_staged_in_forward_order(kind, expected):
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import SequentialStatsProvider
    from lm_eval_lowrank.decompose import decompose_model

    model = _tiny_generic(kind)
    adapter = adapter_for_model(model)
    assert adapter.name == "generic" and adapter.stages is None
    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 4, "layers": "1|3"})
    inner = SequentialStatsProvider(model, adapter, _ids(), batch_size=4, record={"source": "test"}, spec=spec)
    prov = StagedRecorder(inner)
    report = decompose_model(model, spec, stats_provider=prov, progress=False)
    assert prov.calls == [(layer, group) for layer in (1, 3) for group in expected]
    assert report.to_dict()["calibration"]["stage_order"] == "forward"
    # Unstaged, the same model takes one request per layer.
    model2 = _tiny_generic(kind)
    spec2 = spec.with_(calib_staged=False)
    prov2 = StagedRecorder(SequentialStatsProvider(model2, adapter_for_model(model2), _ids(), batch_size=4, record={"source": "test"}, spec=spec2))
    decompose_model(model2, spec2, stats_provider=prov2, progress=False)
    assert [c[0] for c in prov2.calls] == [1, 3]


def test_every_spec_field_that_changes_the_factors_keys_the_cache():
    """A field left out of the cache key would serve one setting's factors for another (asvd_alpha was nearly)."""
    import dataclasses

    from lm_eval_lowrank.checkpoint import _FACTOR_FIELDS

    keyed_elsewhere = {"rank", "rank_overrides", "layers", "tensors", "layout"}  # through the plan's ranks and layout
    no_effect = {"cache", "grad_batch", "grad_checkpoint"}  # the same Fisher sums: batched otherwise (round-off), recomputed (bitwise)
    fields = {f.name for f in dataclasses.fields(DecompositionSpec)}
    assert fields - keyed_elsewhere - no_effect == set(_FACTOR_FIELDS)
