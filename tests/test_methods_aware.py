"""Data-aware methods (rom, whiten), calibration (sequential, cached, no-leak) and budget allocators."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lm_eval_lowrank.methods import LayerStats, get_method
from lm_eval_lowrank.spec import DecompositionSpec, SpecError


def _cov(X: torch.Tensor) -> LayerStats:
    return LayerStats((X.mT @ X / X.shape[0]).double(), X.shape[0], None, X.abs().mean(0).double())


def _out_err(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(((W.double() - W_hat.double()) @ X.double().mT).norm())


def _optimal_err(W: torch.Tensor, X: torch.Tensor, r: int) -> float:
    Y = W.double() @ X.double().mT
    s = torch.linalg.svdvals(Y)
    return float(s[r:].square().sum().sqrt())


@pytest.fixture
def aniso():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 32, generator=g)
    X = torch.randn(400, 32, generator=g) * torch.logspace(1, -2, 32)  # strongly anisotropic inputs
    return W, X


# -- exactness ----------------------------------------------------------------------------


def test_rom_recovers_low_rank_weight_exactly():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 5, generator=g) @ torch.randn(5, 30, generator=g)  # rank 5, so Y = W X has rank 5
    X = torch.randn(200, 30, generator=g)
    f = get_method("rom")(W, 5, _cov(X))
    assert torch.allclose(f.dense(), W, atol=1e-4, rtol=1e-4)
    assert torch.allclose(f.core, torch.eye(5))
    assert torch.allclose(f.left.mT @ f.left, torch.eye(5), atol=1e-5)  # V_r orthonormal
    assert f.info["output_energy_kept"] == pytest.approx(1.0, abs=1e-6)


def test_rom_exact_on_the_span_of_the_inputs():
    # Inputs in a 6-dim subspace: Y has rank <= 6, so rank 6 reproduces every output exactly.
    g = torch.Generator().manual_seed(2)
    W = torch.randn(50, 24, generator=g)
    X = torch.randn(300, 6, generator=g) @ torch.randn(6, 24, generator=g)
    f = get_method("rom")(W, 6, _cov(X))
    assert _out_err(W, f.dense(), X) < 1e-3 * float((W @ X.mT).norm())


def test_rom_uses_the_truncated_solvers_and_matches_the_exact_eigenvectors(aniso):
    # On a factorisable covariance rom solves W S with tucker's solvers, not a full fp64 eigh:
    # the same principal subspace as the exact path, and Krylov's certificate passes through.
    from lm_eval_lowrank.methods.rom import output_principal_basis

    W, X = aniso
    st = _cov(X)
    for r, solver in ((2, "krylov"), (6, "gram"), (6, "exact")):
        f = get_method("rom")(W, r, st, solver=solver, solver_tol=1e-3)
        assert f.info["solver"] == f"rom-{solver}" and f.info["rom_lambda"] == 0.0
        V_exact, _ = output_principal_basis(W, st.input_cov, r)
        # Same subspace: the projector onto it agrees, hence the same W_hat = V V^T W.
        P, P_exact = f.left.double() @ f.left.double().mT, V_exact @ V_exact.mT
        assert float((P - P_exact).norm()) < 1e-3
        if solver == "krylov":
            assert f.info["sv_error_bound"] <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_times_lower_is_the_product_with_a_triangular_factor(dtype):
    from lm_eval_lowrank.methods.covariance import all_finite, times_lower

    g = torch.Generator().manual_seed(8)
    X = torch.randn(80, 24, generator=g, dtype=dtype)
    S = torch.linalg.cholesky(X.mT @ X)
    for W in (torch.randn(30, 24, generator=g, dtype=dtype), torch.randn(24, 50, generator=g, dtype=dtype).mT):  # contiguous, transposed view
        got = times_lower(W, S)
        assert got.shape == (W.shape[0], 24) and got.dtype == dtype
        assert torch.allclose(got, W @ S, rtol=1e-5, atol=1e-5 * float(S.abs().max()))
    assert all_finite(S) and not all_finite(torch.tensor([1.0, float("nan")])) and not all_finite(torch.tensor([float("inf"), 0.0]))


def test_output_spectrum_equals_the_exact_eigenvalues():
    from lm_eval_lowrank.methods.rom import output_principal_basis, output_spectrum

    g = torch.Generator().manual_seed(6)
    X = torch.randn(300, 16, generator=g) * torch.logspace(1, -2, 16)
    C = (X.mT @ X / 300).double()
    singular = (X[:, :5] @ torch.randn(5, 16, generator=g)).double()
    for W in (torch.randn(10, 16, generator=g), torch.randn(40, 16, generator=g)):  # out <= in, out > in
        for cov in (C, singular.mT @ singular / 300):  # Cholesky, and the PSD square root it falls back to
            _, exact = output_principal_basis(W, cov, 1)
            values = output_spectrum(W, cov)
            k = min(W.shape)
            assert torch.allclose(values[:k], exact[:k], rtol=1e-8, atol=1e-10 * float(exact[0]))


def test_rom_takes_the_fast_path_on_a_rank_deficient_covariance_with_round_off():
    # Few calibration tokens for a wide input: C is rank deficient and its null eigenvalues come out slightly
    # negative. fp32 Cholesky fails even with 1e-6 mean(diag); the fp64 ridge of 1e-7 trace(C) succeeds, and
    # the principal directions are those of the exact path.
    from lm_eval_lowrank.methods.rom import ROM_RIDGE, output_principal_basis

    g = torch.Generator().manual_seed(9)
    n = 600
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    e = torch.zeros(n, dtype=torch.float64)
    e[:20] = torch.logspace(0, -2, 20, dtype=torch.float64)
    e[20:30] = -1e-8 * float(e.sum())  # round-off below zero
    C = (Q * e) @ Q.mT
    W = torch.randn(40, n, generator=g)
    f = get_method("rom")(W, 4, LayerStats(C, 100))
    assert f.info["solver"] != "rom-eig" and f.info["rom_dtype"] == "float64"
    assert f.info["rom_lambda"] == pytest.approx(ROM_RIDGE * n)
    V_exact, _ = output_principal_basis(W, C, 4)
    assert float((f.left.double() @ f.left.double().mT - V_exact @ V_exact.mT).norm()) < 1e-4


def test_rom_falls_back_to_the_exact_path_when_the_covariance_cannot_be_factorised():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(20, 12, generator=g)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    indefinite = M + M.mT  # not a covariance: no Cholesky, even regularised a little
    f = get_method("rom")(W, 3, LayerStats(indefinite, 10))
    assert f.info["solver"] == "rom-eig"
    assert torch.allclose(f.left.mT @ f.left, torch.eye(3), atol=1e-5)


@pytest.mark.parametrize("r", [1, 4, 12])
def test_whiten_is_optimal_and_beats_plain_svd(aniso, r):
    W, X = aniso
    st = _cov(X)
    opt = _optimal_err(W, X, r)
    whiten = _out_err(W, get_method("whiten")(W, r, st, solver="exact").dense(), X)
    rom = _out_err(W, get_method("rom")(W, r, st).dense(), X)
    plain = _out_err(W, get_method("tucker")(W, r, solver="exact").dense(), X)
    assert whiten == pytest.approx(opt, rel=1e-3)
    assert rom == pytest.approx(opt, rel=1e-3)  # both reach the same optimum
    assert plain > 1.2 * whiten


def test_whiten_with_an_inexact_solver_stays_optimal_on_ill_conditioned_inputs():
    # Input scales over 6 decades: S^-1 would multiply any rounding in the solver's V by ~1e6.
    # W_hat = U U^T W needs only U, so the Krylov solver (values certified to 1 %, vectors not
    # exact) must give the optimal output error too, and the same weight as the exact SVD.
    g = torch.Generator().manual_seed(5)
    W = torch.randn(96, 64, generator=g)
    X = torch.randn(2000, 64, generator=g) * torch.logspace(2, -4, 64)
    st = _cov(X)
    for r in (2, 8):
        exact = get_method("whiten")(W, r, st, solver="exact").dense()
        krylov = get_method("whiten")(W, r, st, solver="krylov")
        assert krylov.info["solver"] == "whiten-krylov"
        assert _out_err(W, krylov.dense(), X) == pytest.approx(_optimal_err(W, X, r), rel=1e-2)
        assert float((krylov.dense() - exact).norm()) <= 1e-2 * float(exact.norm())


def test_methods_keep_shapes_and_are_deterministic(aniso):
    W, X = aniso
    st = _cov(X)
    for name in ("rom", "whiten"):
        a, b = get_method(name)(W, 7, st, seed=3), get_method(name)(W, 7, st, seed=3)
        assert a.left.shape == (48, 7) and a.core.shape == (7, 7) and a.right.shape == (32, 7)
        assert torch.equal(a.dense(), b.dense())
        assert a.left.dtype == torch.float32


def test_methods_need_statistics_and_check_ranks():
    W = torch.randn(8, 6)
    for name in ("rom", "whiten"):
        with pytest.raises(SpecError, match=f"method='{name}' needs calibration"):
            get_method(name)(W, 2, None)
        with pytest.raises(SpecError, match="rank=7 is invalid"):
            get_method(name)(W, 7, LayerStats(torch.eye(6), 10))
        with pytest.raises(SpecError, match="expected \\(6, 6\\)"):
            get_method(name)(W, 2, LayerStats(torch.eye(5), 10))


# -- numerical fallbacks -------------------------------------------------------------------


def test_whiten_singular_covariance_takes_the_regularised_path():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(30, 40, generator=g)
    X = torch.randn(12, 40, generator=g)  # 12 tokens, 40 features: C has rank 12
    f = get_method("whiten")(W, 8, _cov(X), solver="exact")
    assert f.info["whiten_lambda"] > 0 or f.info["whiten_dtype"] == "float64"
    assert torch.isfinite(f.dense()).all()
    # Regularisation costs little: still close to the optimum, far better than plain SVD.
    opt = _optimal_err(W, X, 8)
    err = _out_err(W, f.dense(), X)
    assert err <= opt * 1.05 + 1e-3 * float((W @ X.mT).norm())
    assert err < _out_err(W, get_method("tucker")(W, 8, solver="exact").dense(), X)


def test_whitening_falls_back_to_fp64():
    from lm_eval_lowrank.methods.whiten import whitening_factor

    # Eigenvalues spanning 1e-12: fp32 pivots vanish, fp64 factors it unregularised.
    Q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    C = (Q * torch.logspace(0, -12, 20, dtype=torch.float64)) @ Q.mT
    S, lam, dtype = whitening_factor(C, fp32_lambdas=(0.0,))
    assert dtype == torch.float64 and lam == 0.0
    assert torch.allclose(S @ S.mT, C, atol=1e-12)


def test_whitening_clear_errors():
    from lm_eval_lowrank.methods.whiten import WhiteningError, whitening_factor

    indefinite = torch.diag(torch.tensor([1.0, -5.0, 1.0]))
    with pytest.raises(WhiteningError, match="not positive definite even regularised") as exc:
        whitening_factor(indefinite, fp32_lambdas=(0.0,), fp64_lambdas=(0.0, 1e-3))
    assert "\n" not in str(exc.value) and isinstance(exc.value, SpecError)
    with pytest.raises(WhiteningError, match="all zero"):
        whitening_factor(torch.zeros(4, 4))
    with pytest.raises(SpecError, match="NaN"):
        get_method("whiten")(torch.randn(3, 4), 1, LayerStats(torch.full((4, 4), float("nan")), 3))


# -- calibration: sequential order and cache -----------------------------------------------


class CharTokenizer:
    """A stand-in tokenizer for the tiny model (vocab 128)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}


def _provider(model, n=6, length=16, cache_dir=None, spec=None):
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import SequentialStatsProvider, model_fingerprint

    ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(5))
    key = model_fingerprint(model, "tiny") if cache_dir else None
    rec = {"source": "test", "n": n, "len": length, "seed": 0}
    return SequentialStatsProvider(model, adapter_for_model(model), ids, batch_size=4, record=rec, cache_dir=cache_dir, model_key=key, spec=spec)


def _q_input_cov(model, ids, layer0):
    seen = []
    mod = model.model.layers[layer0].self_attn.q_proj
    h = mod.register_forward_hook(lambda _m, a, _o: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h.remove()
    X = torch.cat(seen)
    return X.mT @ X / X.shape[0]


class Recorder:
    def __init__(self, inner):
        self.inner, self.calls, self.seen = inner, [], {}

    def layer_stats(self, model, layer, targets):
        from lm_eval_lowrank.modules import LowRankLinear

        self.calls.append(layer)
        # Which earlier layers were already compressed when this layer was calibrated.
        self.seen[layer] = sorted({i + 1 for i, L in enumerate(model.model.layers) if any(isinstance(m, LowRankLinear) for m in L.modules())})
        out = self.inner.layer_stats(model, layer, targets)
        self.last = out
        self.stats = getattr(self, "stats", {})
        self.stats.update(out)
        return out

    def describe(self):
        return self.inner.describe()


def test_sequential_calibration_sees_compressed_earlier_layers(tiny_llama):
    from lm_eval_lowrank.decompose import decompose_model

    dense = _q_input_cov(tiny_llama, _provider(tiny_llama).input_ids, 2)
    prov = Recorder(_provider(tiny_llama))
    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 2, "layers": "1-3", "calib_staged": False})
    report = decompose_model(tiny_llama, spec, stats_provider=prov, progress=False)
    assert prov.calls == [1, 2, 3]
    assert prov.seen == {1: [], 2: [1], 3: [1, 2]}
    # Layer 3's q input depends only on layers 1-2 (now compressed): the provider saw exactly that.
    after = _q_input_cov(tiny_llama, prov.inner.input_ids, 2)
    got = prov.stats["model.layers.2.self_attn.q_proj"].input_cov
    assert torch.allclose(got, after, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, dense, rtol=1e-2, atol=1e-4)  # and it is not the dense model's
    cal = report.to_dict()["calibration"]
    assert cal["sequential"] is True and cal["layers_computed"] == [1, 2, 3]
    assert report.to_dict()["solvers"]


def test_shared_inputs_share_one_covariance(tiny_llama):
    from lm_eval_lowrank.plan import make_plan

    prov = _provider(tiny_llama)
    plan = make_plan(DecompositionSpec.from_args({"rank": 2, "layers": "2"}), tiny_llama.config)
    st = prov.layer_stats(tiny_llama, 2, plan.targets)
    p = "model.layers.1."
    assert st[p + "self_attn.q_proj"].input_cov is st[p + "self_attn.v_proj"].input_cov
    assert st[p + "mlp.gate_proj"].input_cov is st[p + "mlp.up_proj"].input_cov
    assert st[p + "mlp.down_proj"].input_cov.shape == (160, 160)
    assert not torch.allclose(st[p + "self_attn.o_proj"].input_cov, st[p + "self_attn.q_proj"].input_cov)
    assert st[p + "q_proj".join(["self_attn.", ""])].tokens == 6 * 16


def test_siblings_share_one_factorisation_also_after_a_stats_cache_hit(tiny_llama, tmp_path):
    from lm_eval_lowrank.methods.covariance import factor_of
    from lm_eval_lowrank.plan import make_plan

    plan = make_plan(DecompositionSpec.from_args({"rank": 2, "layers": "2"}), tiny_llama.config)
    p = "model.layers.1."
    for attempt in ("computed", "cached"):
        prov = _provider(tiny_llama, cache_dir=tmp_path, spec=DecompositionSpec.from_args({"method": "whiten", "rank": 2, "layers": "2"}))
        st = prov.layer_stats(tiny_llama, 2, plan.targets)
        assert (prov.hits, prov.misses) == ((0, 1) if attempt == "computed" else (1, 0))
        q, k = st[p + "self_attn.q_proj"], st[p + "self_attn.k_proj"]
        assert q is k  # one statistics object for modules that see the same inputs
        S = factor_of(q)[0]
        assert factor_of(k)[0] is S  # the Cholesky is computed once for q, k, v
        q.input_cov.mul_(2.0)  # modified in place: the memo is not used
        assert torch.allclose(factor_of(q)[0], S * 2**0.5, rtol=1e-4, atol=1e-5)


def test_stats_cache_reuse_and_key(tiny_llama, tmp_path):
    from lm_eval_lowrank.decompose import decompose_model

    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    spec2 = DecompositionSpec.from_args({"method": "rom", "rank": 2, "layers": "1-2", "calib_staged": False})
    p1 = _provider(tiny_llama, cache_dir=tmp_path, spec=spec2)
    decompose_model(tiny_llama, spec2, stats_provider=p1, progress=False)
    assert (p1.hits, p1.misses) == (0, 2)

    def fresh(rank):
        from transformers import LlamaForCausalLM

        from conftest import tiny_llama_config

        m = LlamaForCausalLM(tiny_llama_config()).eval()
        m.load_state_dict(state)
        spec = DecompositionSpec.from_args({"method": "rom", "rank": rank, "layers": "1-2", "calib_staged": False})
        p = _provider(m, cache_dir=tmp_path, spec=spec)
        decompose_model(m, spec, stats_provider=p, progress=False)
        return m, p

    m_same, p_same = fresh(2)
    assert (p_same.hits, p_same.misses) == (2, 0)  # same model, data and earlier decomposition
    m_other, p_other = fresh(3)
    assert (p_other.hits, p_other.misses) == (1, 1)  # layer 1 reusable; layer 2 follows a different layer 1
    # The cached route gives the same model as computing afresh.
    for (k, a), (_, b) in zip(tiny_llama.state_dict().items(), m_same.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), k


# -- calibration data and the no-leak rule ---------------------------------------------------


def _data_or_skip():
    from lm_eval_lowrank.calibration import data_root

    try:
        return data_root()
    except SpecError:
        pytest.skip("benchmark data folder not available")


def test_no_leak_rule():
    from lm_eval_lowrank.calibration import check_no_leak

    root = _data_or_skip()
    with pytest.raises(SpecError, match="calib='wikitext_local' is invalid while evaluating 'wikitext_local'"):
        check_no_leak("wikitext_local", ["wikitext_local"], root)
    with pytest.raises(SpecError, match="wikitext/test.jsonl"):
        check_no_leak("arc_easy_local+wikitext_local", ["arc_easy_local", "wikitext"], root)
    with pytest.raises(SpecError, match="boolq_local"):
        check_no_leak("arc_easy_local+boolq_local", ["boolq_local"], root)
    ok = check_no_leak("arc_easy_local+boolq_local", ["arc_easy_local", "lambada_openai_local"], root)
    assert ok["status"] == "ok" and ok["calib_files"] == ["arc_easy/validation.jsonl", "boolq/validation.jsonl"]
    assert check_no_leak("mmlu_local+gsm8k_local", ["mmlu_local", "gsm8k_local", "arc_challenge"], root)["status"] == "ok"
    assert check_no_leak("wikitext_local", ["lambada_openai_local", "my_task"], root)["unrecognised_tasks"] == ["my_task"]
    assert check_no_leak("wikitext_local", None, root)["status"] == "unchecked"


def test_no_leak_rule_for_a_saved_checkpoint_against_the_tasks_evaluated_now():
    from lm_eval_lowrank.calibration import check_checkpoint_no_leak

    root = _data_or_skip()
    manifest = {
        "decomposition": {"calibration": {"source": "wikitext_local", "leak_check": {"status": "unchecked", "calib_files": ["wikitext/test.jsonl"]}}},
        "healing": [{"data": [str(root / "arc_easy" / "validation.jsonl"), str(root / "mmlu" / "dev")]}],
    }
    with pytest.raises(SpecError, match=r"pretrained=ck/: its calibration \(calib=wikitext_local\) read wikitext/test.jsonl, which wikitext_local scores"):
        check_checkpoint_no_leak(manifest, ["arc_easy_local", "wikitext_local"], where="ck/")
    ok = check_checkpoint_no_leak(manifest, ["arc_easy_local", "lambada_openai_local"])
    assert ok["status"] == "ok" and "arc_easy/validation.jsonl" in ok["files"] and "mmlu/dev/anatomy.jsonl" in ok["files"]
    manifest["healing"].append({"data": str(root / "arc_easy" / "test.jsonl")})  # healed on a scored split
    with pytest.raises(SpecError, match="its healing step 2 read arc_easy/test.jsonl, which arc_easy_local scores"):
        check_checkpoint_no_leak(manifest, ["arc_easy_local"])
    assert check_checkpoint_no_leak(manifest, None)["status"] == "unchecked"
    assert check_checkpoint_no_leak({"decomposition": {}}, ["wikitext_local"])["status"] == "ok"  # read no data


def test_evaluated_tasks_from_argv(monkeypatch):
    from lm_eval_lowrank.calibration import EVAL_TASKS_ENV, evaluated_tasks_from_env

    monkeypatch.delenv(EVAL_TASKS_ENV, raising=False)
    assert evaluated_tasks_from_env(["/x/bin/lm_eval", "--model", "hf-tucker", "--tasks", "a,b"]) == ["a", "b"]
    assert evaluated_tasks_from_env(["lm_eval", "--tasks=wikitext_local"]) == ["wikitext_local"]
    assert evaluated_tasks_from_env(["pytest", "--tasks", "a"]) is None
    monkeypatch.setenv(EVAL_TASKS_ENV, "x, y")
    assert evaluated_tasks_from_env(["pytest"]) == ["x", "y"]


def test_calibration_tokens_mix_sources_and_validate():
    from lm_eval_lowrank.calibration import calibration_tokens, parse_calib

    root = _data_or_skip()
    spec = DecompositionSpec.from_args({"method": "rom", "rank": 2, "calib": "arc_easy_local+gsm8k_local", "calib_n": 5, "calib_len": 32})
    ids, rec = calibration_tokens(spec, CharTokenizer(), root)
    assert ids.shape == (5, 32) and rec["per_source"] == {"arc_easy_local": 3, "gsm8k_local": 2}
    assert rec["split"] == {"arc_easy_local": "validation", "gsm8k_local": "train"} and rec["tokens"] == 160
    again, _ = calibration_tokens(spec, CharTokenizer(), root)
    assert torch.equal(ids, again)
    with pytest.raises(SpecError, match="calib='nope' is invalid: unknown source 'nope'; valid: wikitext_local"):
        parse_calib("nope")
    big = spec.with_(calib="mmlu_local", calib_n=100000, calib_len=512)
    with pytest.raises(SpecError, match="calib_n=100000 is invalid"):
        calibration_tokens(big, CharTokenizer(), root)


def test_compress_model_end_to_end_json(tiny_llama, monkeypatch, tmp_path):
    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.calibration import EVAL_TASKS_ENV

    _data_or_skip()
    monkeypatch.setenv("LM_EVAL_LOWRANK_CACHE", str(tmp_path))
    monkeypatch.setenv(EVAL_TASKS_ENV, "arc_easy_local")
    spec = {"method": "whiten", "budget": 0.7, "allocator": "sensitivity", "calib": "arc_easy_local", "calib_n": 4, "calib_len": 32, "rank_multiple": 4}
    dense = copy.deepcopy(tiny_llama)
    d = compress_model(tiny_llama, spec, tokenizer=CharTokenizer(), progress=False).to_dict()
    cal = d["calibration"]
    assert cal["leak_check"]["status"] == "ok" and cal["tokens"] == 128 and cal["split"] == {"arc_easy_local": "validation"}
    alloc = cal["allocation"]
    assert alloc["realised_keep"] <= 0.7 and 0.7 * alloc["selected_params"] - alloc["kept_params"] <= alloc["max_rounding_step"]
    assert alloc["allocator"] == "sensitivity" and alloc["measured"]["loss_increase"] and alloc["chosen_layers"]
    assert all(r % 4 == 0 for r in d["ranks"].values())
    assert d["params_removed"] == alloc["selected_params"] - alloc["kept_params"]
    monkeypatch.setenv(EVAL_TASKS_ENV, "arc_easy_local,boolq_local")
    with pytest.raises(SpecError, match="boolq"):
        compress_model(dense, {**spec, "calib": "boolq_local"}, tokenizer=CharTokenizer(), progress=False)


# -- allocators ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("allocator", ["uniform", "tail"])
@pytest.mark.parametrize("budget", [0.95, 0.9, 0.8, 0.5])
@pytest.mark.parametrize("multiple", [1, 8])
def test_budget_met_within_one_rounding_step(smollm2_meta, allocator, budget, multiple):
    from lm_eval_lowrank.allocation import allocate_ranks
    from lm_eval_lowrank.plan import make_plan

    spec = DecompositionSpec.from_args({"budget": budget, "allocator": allocator, "rank_multiple": multiple})
    ranks = allocate_ranks(spec, smollm2_meta)
    info = ranks.info
    assert info["kept_params"] <= budget * info["selected_params"]
    assert budget * info["selected_params"] - info["kept_params"] <= info["max_rounding_step"]
    assert all(r % multiple == 0 for r in ranks.values())
    plan = make_plan(spec, smollm2_meta.config, ranks=ranks)  # every rank saves parameters
    assert not plan.skipped and plan.params_removed == info["selected_params"] - info["kept_params"]
    assert 0 < info["model_param_reduction"] < 1 - budget


def test_tail_compresses_only_the_last_layers(smollm2_meta):
    from lm_eval_lowrank.allocation import TAIL_MIN_KEEP, allocate_ranks

    ranks = allocate_ranks(DecompositionSpec.from_args({"budget": 0.9, "allocator": "tail"}), smollm2_meta)
    layers = sorted({int(p.split(".")[2]) + 1 for p in ranks})
    assert layers == list(range(21, 31)) and ranks.info["tail_layers"] == layers
    assert ranks.info["tail_keep"] >= TAIL_MIN_KEEP
    uni = allocate_ranks(DecompositionSpec.from_args({"budget": 0.9, "allocator": "uniform", "layers": "2-4", "tensors": "q|down"}), smollm2_meta)
    assert set(uni) == {f"model.layers.{i}.{t}" for i in (1, 2, 3) for t in ("self_attn.q_proj", "mlp.down_proj")}


def test_error_curves_match_real_truncation(aniso):
    from lm_eval_lowrank.allocation import error_curve

    W, X = aniso
    st = _cov(X)
    total = float((W.double() @ X.double().mT).norm()) ** 2
    for method in ("whiten", "tucker"):
        curve = error_curve(W, st.input_cov, method)
        assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-9)
        for r in (1, 5, 20):
            real = _out_err(W, get_method(method)(W, r, st, solver="exact").dense(), X) ** 2 / total
            assert float(curve[r]) == pytest.approx(real, rel=1e-3, abs=1e-7)


def test_output_error_prefers_low_error_modules():
    from lm_eval_lowrank.allocation import Candidate, allocate_by_error

    a, b = Candidate(1, "q", "a", 64, 64), Candidate(1, "k", "b", 64, 64)
    k = torch.arange(65, dtype=torch.float64)
    curves = {"a": (1 - k / 64) ** 4, "b": 1 - k / 64}  # a's spectrum decays fast: cheap to cut
    ranks, info = allocate_by_error([a, b], curves, 0.6, 4, "folded")
    kept = sum(c.params(ranks.get(c.path, 0), "folded") for c in (a, b))
    assert kept <= 0.6 * 2 * 64 * 64 and 0.6 * 2 * 64 * 64 - kept <= 4 * 128
    # The greedy on the convex hull finds the brute-force optimum here (b's curve is linear).
    best = min(
        float(curves["a"][ra]) + float(curves["b"][rb])
        for ra in range(4, 32, 4)
        for rb in range(4, 32, 4)
        if 128 * (ra + rb) <= 0.6 * 2 * 64 * 64
    )
    assert info["proxy_error_sum"] == pytest.approx(best, abs=0.02)
    assert math.isfinite(info["proxy_error_sum"])


@pytest.mark.slow
def test_smollm2_whiten_beats_tucker_on_calibration(smollm2_dir, monkeypatch, tmp_path):
    """The issue's collapse: rank-1 on layers 3|15|28. Data-aware methods keep far lower perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.api import compress_model

    _data_or_skip()
    monkeypatch.setenv("LM_EVAL_LOWRANK_EVAL_TASKS", "lambada_openai_local")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    from lm_eval_lowrank.calibration import calibration_tokens

    eval_ids, _ = calibration_tokens(DecompositionSpec.from_args({"method": "rom", "rank": 1, "calib": "arc_challenge_local", "calib_n": 4, "calib_len": 64}), tok)

    def ppl(model):
        with torch.no_grad():
            return math.exp(float(model(input_ids=eval_ids, labels=eval_ids).loss))

    out = {}
    for method in ("tucker", "whiten"):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        spec = {"method": method, "rank": 1, "layers": "28", "tensors": "q|k|v|o|gate|up|down", "calib": "arc_easy_local", "calib_n": 8, "calib_len": 64, "cache": False}
        compress_model(model, spec, tokenizer=tok, progress=False)
        out[method] = ppl(model)
    assert out["whiten"] < out["tucker"]


def test_covariances_are_summed_in_place_with_the_bits_of_converting_first():
    """The calibration's running sums take fp32 products into fp64 in place: the same bits as
    converting each product to fp64 and adding, without the fp64 temporaries."""
    from lm_eval_lowrank.calibration import _accumulate

    gen = torch.Generator().manual_seed(0)
    sums: dict[str, torch.Tensor] = {}
    reference = torch.zeros(64, 64, dtype=torch.float64)
    for _ in range(5):
        x = torch.randn(200, 64, generator=gen) * 3
        product = x.mT @ x
        _accumulate(sums, "m", product)
        reference = reference + product.to(torch.float64)
    assert sums["m"].dtype == torch.float64 and torch.equal(sums["m"], reference)


# -- asvd ------------------------------------------------------------------------------------


def test_asvd_spans_plain_svd_to_diagonal_whitening(aniso):
    """alpha = 0 is plain SVD; with the RMS as the channel size, alpha = 1 is whitening when the channels are
    uncorrelated; between, the output error falls as alpha grows (independent columns of different scales)."""
    W, X = aniso
    st = _cov(X)
    diag = LayerStats(torch.diag(torch.diagonal(st.input_cov)), st.tokens)  # exactly uncorrelated channels
    asvd = get_method("asvd")
    for r in (2, 8):
        plain = get_method("tucker")(W, r, solver="exact").dense()
        assert torch.allclose(asvd(W, r, st, solver="exact", asvd_alpha=0.0).dense(), plain, atol=1e-4)
        whitened = get_method("whiten")(W, r, diag, solver="exact").dense()
        assert torch.allclose(asvd(W, r, diag, solver="exact", asvd_alpha=1.0, asvd_stat="rms").dense(), whitened, atol=1e-4)
        for stat in ("mean_abs", "rms"):
            errors = [_out_err(W, asvd(W, r, st, solver="exact", asvd_alpha=a, asvd_stat=stat).dense(), X) for a in (0.0, 0.5, 1.0)]
            assert errors[0] > 1.2 * errors[1] > 1.2 * errors[2]
            assert errors[2] >= _optimal_err(W, X, r) * (1 - 1e-6)  # never better than the optimum (whiten's)
    # mean |x| is ASVD's channel size: the scale of W's columns is that, to the power alpha
    from lm_eval_lowrank.methods.asvd import channel_scales

    assert torch.allclose(channel_scales(st, 0.5), X.abs().mean(0).double().sqrt())
    assert torch.allclose(channel_scales(st, 0.5, "rms"), X.square().mean(0).double().sqrt().sqrt())
    with pytest.raises(SpecError, match="no mean \\|x\\| per input channel; give asvd_stat=rms"):
        asvd(W, 4, diag)
    f = asvd(W, 4, st, seed=3)
    assert f.left.shape == (48, 4) and f.right.shape == (32, 4) and (f.info["asvd_alpha"], f.info["asvd_stat"]) == (0.5, "mean_abs")
    assert torch.equal(f.dense(), asvd(W, 4, st, seed=3).dense())


def test_asvd_ignores_dead_channels_and_checks_its_inputs(aniso):
    W, X = aniso
    X = X.clone()
    X[:, :5] = 0  # channels that never fire: their scale is 0, and D^-1 is never formed
    st = _cov(X)
    f = get_method("asvd")(W, 6, st, solver="exact")
    assert torch.isfinite(f.right).all()
    assert _out_err(W, f.dense(), X) < _out_err(W, get_method("tucker")(W, 6, solver="exact").dense(), X)
    with pytest.raises(SpecError, match="method='asvd' needs calibration"):
        get_method("asvd")(W, 2, None)
    with pytest.raises(SpecError, match="all zero"):
        get_method("asvd")(W, 2, LayerStats(torch.zeros(32, 32, dtype=torch.float64), 10, None, torch.zeros(32, dtype=torch.float64)))
    with pytest.raises(SpecError, match="asvd_alpha=1.5 is invalid"):
        get_method("asvd")(W, 2, st, asvd_alpha=1.5)


def test_asvd_spec_and_its_error_curve(aniso):
    from lm_eval_lowrank.allocation import error_curve

    spec = DecompositionSpec.from_args({"method": "asvd", "rank": 4, "asvd_alpha": "0.25"})
    assert spec.calib == "wikitext_local" and spec.method_options() == {"asvd_alpha": 0.25, "asvd_stat": "mean_abs"}
    assert DecompositionSpec.from_args({"method": "whiten", "rank": 4}).method_options() == {}
    for bad, match in (({"method": "asvd", "rank": 4, "asvd_alpha": "2"}, "asvd_alpha='2' is invalid: expected"), ({"rank": 4, "asvd_alpha": 0.5}, "applies to method=asvd only, not method=tucker")):
        with pytest.raises(SpecError, match=match):
            DecompositionSpec.from_args(bad)
    W, X = aniso
    st = _cov(X)
    total = float((W.double() @ X.double().mT).norm()) ** 2
    for alpha, stat in ((0.25, "mean_abs"), (1.0, "mean_abs"), (0.5, "rms")):
        curve = error_curve(W, st.input_cov, "asvd", {"asvd_alpha": alpha, "asvd_stat": stat}, st.input_abs_mean)
        assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-9)
        for r in (1, 5, 20):
            real = _out_err(W, get_method("asvd")(W, r, st, solver="exact", asvd_alpha=alpha, asvd_stat=stat).dense(), X) ** 2 / total
            assert float(curve[r]) == pytest.approx(real, rel=1e-3, abs=1e-7)


def test_stats_cache_key_follows_every_option_of_the_earlier_decompositions(tiny_llama, tmp_path):
    """Layer 2's statistics follow how layer 1 was decomposed: asvd_alpha and solver_tol move layer 1's factors, so
    each must miss layer 2's cached statistics (both were once left out of the key), while layer 1's still hit."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from lm_eval_lowrank.decompose import decompose_model

    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}

    def run(**extra):
        m = LlamaForCausalLM(tiny_llama_config()).eval()
        m.load_state_dict(state)
        spec = DecompositionSpec.from_args({"method": "asvd", "rank": 2, "layers": "1-2", "calib_staged": False, **extra})
        p = _provider(m, cache_dir=tmp_path, spec=spec)
        decompose_model(m, spec, stats_provider=p, progress=False)
        return p.hits, p.misses

    assert run() == (0, 2)
    assert run() == (2, 0)
    assert run(asvd_alpha=0.25) == (1, 1)
    assert run(solver_tol=0.05) == (1, 1)


def test_calibration_keeps_each_input_channels_mean_abs_through_the_cache(tiny_llama, tmp_path):
    """asvd's channel size: the calibrator's mean |x| per input channel of layer 3's q_proj, after layers 1-2 were
    compressed, equals that of the inputs the compressed model really feeds it; a cache hit gives it back."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from lm_eval_lowrank.decompose import decompose_model

    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}

    def run():
        m = LlamaForCausalLM(tiny_llama_config()).eval()
        m.load_state_dict(state)
        spec = DecompositionSpec.from_args({"method": "asvd", "rank": 2, "layers": "1-3", "calib_staged": False})
        prov = Recorder(_provider(m, cache_dir=tmp_path, spec=spec))
        decompose_model(m, spec, stats_provider=prov, progress=False)
        return m, prov

    model, prov = run()
    seen = []
    hook = model.model.layers[2].self_attn.q_proj.register_forward_hook(lambda _m, a, _o: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        # layer 3's own modules are compressed now too, but its q input depends on layers 1-2 only
        model(input_ids=prov.inner.input_ids, use_cache=False)
    hook.remove()
    got = prov.stats["model.layers.2.self_attn.q_proj"].input_abs_mean
    assert got is not None and torch.allclose(got, torch.cat(seen).abs().mean(0), rtol=1e-4, atol=1e-7)
    _, cached = run()
    assert cached.inner.hits == 3
    assert torch.equal(cached.stats["model.layers.2.self_attn.q_proj"].input_abs_mean.float(), got.float())
