"""The auto solver's top-r singular values are within 1% of exact on real SmolLM2 weights.

Trained weights have slowly decaying spectra, the hard case for a randomized range
finder; a handful of matrices of every SmolLM2 shape keeps this fast.
"""

from __future__ import annotations

import pytest
import torch

from lm_eval_lowrank.methods.tucker import truncated_svd

# (layer, module) of the decoder: 576x576, 192x576, 1536x576, 576x1536; early, middle, late layers.
MATRICES = [
    (0, "self_attn.q_proj"),
    (14, "self_attn.k_proj"),
    (14, "mlp.gate_proj"),
    (29, "mlp.down_proj"),
    (29, "self_attn.o_proj"),
]
RANKS = (1, 8, 64)


@pytest.fixture(scope="module")
def smollm2_weights(smollm2_dir):
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        return {f"{i}.{m}": f.get_tensor(f"model.layers.{i}.{m}.weight").float() for i, m in MATRICES}


@pytest.mark.parametrize("name", [f"{i}.{m}" for i, m in MATRICES])
def test_auto_solver_top_singular_values_within_one_percent(smollm2_weights, name):
    W = smollm2_weights[name]
    exact = torch.linalg.svdvals(W.double())
    for rank in RANKS:
        res = truncated_svd(W, rank, solver="auto")
        rel = (res.S.double() - exact[:rank]).abs() / exact[:rank]
        assert float(rel.max()) <= 0.01, f"{name} {tuple(W.shape)} rank {rank} ({res.solver}): max rel. error {float(rel.max()):.4f}"


def test_auto_uses_krylov_and_gram_on_cpu(smollm2_weights):
    # The accuracy above must cover both CPU paths, not only the exact one.
    assert truncated_svd(smollm2_weights["0.self_attn.q_proj"], 8).solver == "krylov"
    assert truncated_svd(smollm2_weights["14.mlp.gate_proj"], 64).solver == "gram"
    assert truncated_svd(smollm2_weights["14.self_attn.k_proj"], 8).solver == "gram"


@pytest.mark.parametrize("name", [f"{i}.{m}" for i, m in MATRICES])
def test_randomized_solver_top_singular_values_within_one_percent(smollm2_weights, name):
    # The GPU default, run here on the CPU.
    W = smollm2_weights[name]
    exact = torch.linalg.svdvals(W.double())
    for rank in (1, 8):
        res = truncated_svd(W, rank, solver="randomized")
        rel = (res.S.double() - exact[:rank]).abs() / exact[:rank]
        assert float(rel.max()) <= 0.01, f"{name} rank {rank}: max rel. error {float(rel.max()):.4f}"
