"""LLM-ROM: reduced-order modelling of a linear layer from the PCA of its outputs.

With calibration inputs X (tokens x in) and Y = X W^T, the output covariance is
C_y = W C_x W^T (C_x = X^T X / N, uncentred, as the statistics are collected).
Keeping its top-r eigenvectors V_r (out x r) gives W ~= V_r (V_r^T W): the projection
of the outputs onto their principal subspace, which minimises ||(W - W_hat) X||_F among
all rank-r weights. Factors: left = V_r, core = I, right = W^T V_r.

For any square root C_x = S S^T, the eigenvectors of C_y are the left singular vectors of
W S. rom takes S from a Cholesky factorisation (a tiny regularisation at most) and the top
r from the truncated-SVD solvers that tucker uses (Krylov, Gram, randomized): the cost of
forming W S and of a rank-r solve, instead of a full fp64 eigendecomposition of the
out x out C_y (or a full SVD of W S when out > in), which at Llama-2-7B's 4096/11008 took
~50 s per matrix on one CPU thread (benchmarks/rom.py --synthetic-only: 16-18x slower).
Nothing is inverted: the right factor is W^T V_r. When even the regularised factorisation
fails (C_x far from positive definite), the exact fp64 path runs. ``LayerStats.cross_cov``
is not used: rom always fits the compressed model's own inputs (``calib_target`` does not
apply; ``calib_staged`` does).
"""

from __future__ import annotations

import torch

from . import Factors, LayerStats, register_method
from .covariance import WhiteningError, all_finite, check_stats, factor_of, psd_sqrt, times_lower
from .tucker import truncated_svd

# rom never inverts S, so only regularisation too small to move the principal directions is used
# before falling back to the exact path (whiten goes up to 1e-1, since it must invert S). After fp32,
# one fp64 attempt with a ridge of ROM_RIDGE * trace(C): a covariance accumulated from fp32 products
# carries errors of about that size (fp32's round-off times ||C|| <= trace), and on SmolLM2 with 2048
# calibration tokens the ones that failed in fp32 were rank deficient with negative eigenvalues of
# 1e-9 to 1e-8 of trace(C). The ridge is in whitening_factor's units, mean(diag C) = trace(C) / n.
ROM_FP32_LAMBDAS = (0.0, 1e-6)
ROM_RIDGE = 1e-7


def output_principal_basis(W: torch.Tensor, C: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenvectors (out x r) and all eigenvalues (descending) of W C W^T, in fp64.

    The exact path, for the whole spectrum (error curves, analysis) and for covariances that
    cannot be factorised. When out > in the out x out eigenproblem is avoided: the left
    singular vectors of W S (S a square root of C) are the same eigenvectors.
    """
    W = W.to(torch.float64)
    C = C.to(device=W.device, dtype=torch.float64)  # statistics live on the CPU; the weight may not
    out_f, in_f = W.shape
    if out_f <= in_f:
        Cy = W @ C @ W.mT
        Cy = 0.5 * (Cy + Cy.mT)
        evals, evecs = torch.linalg.eigh(Cy)
        evals, evecs = evals.flip(0), evecs.flip(1)
    else:
        U, s, _ = torch.linalg.svd(W @ psd_sqrt(C), full_matrices=False)
        evals, evecs = s.square(), U
    V = evecs[:, :rank]
    # Deterministic signs: largest-magnitude entry of each vector positive.
    idx = V.abs().argmax(dim=0)
    signs = torch.sign(V[idx, torch.arange(V.shape[1], device=V.device)])
    signs[signs == 0] = 1
    return V * signs, evals.clamp_min(0)


def output_spectrum(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """All eigenvalues (descending, fp64, >= 0) of W C W^T: the output energies that error curves and
    analysis need. Values only, about half the cost of output_principal_basis (no eigenvectors); when
    out > in, the singular values of W L (C = L L^T by Cholesky, a PSD square root if that fails)."""
    W = W.to(torch.float64)
    C = C.to(device=W.device, dtype=torch.float64)
    out_f, in_f = W.shape
    if out_f <= in_f:
        return torch.linalg.eigvalsh(W @ C @ W.mT).flip(0).clamp_min(0)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0 or not all_finite(L):
        L = psd_sqrt(C)
    return torch.linalg.svdvals(W @ L).square()


@register_method("rom", needs_calibration=True)
def rom_method(
    weight: torch.Tensor, rank: int, stats: LayerStats | None = None, solver: str = "auto", seed: int = 0, solver_tol: float | None = None, **_: object
) -> Factors:
    """W ~= V_r (V_r^T W), V_r the top-r principal directions of the layer's outputs."""
    C = check_stats("rom", weight, stats, rank)
    in_f = weight.shape[1]
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    info: dict[str, object]
    try:
        S, lam, fdtype = factor_of(stats, ROM_FP32_LAMBDAS, (ROM_RIDGE * in_f,), device=weight.device)
    except WhiteningError:
        S = None
    if S is not None:
        W = weight.to(fdtype)
        target = times_lower(W, S)
        svd = truncated_svd(target, rank, solver=solver, seed=seed, dtype=fdtype, tol=solver_tol)
        V = svd.U
        total = float(torch.linalg.vector_norm(target)) ** 2
        kept = float(svd.S.double().square().sum())
        info = {"solver": f"rom-{svd.solver}", "rom_lambda": lam, "rom_dtype": str(fdtype).removeprefix("torch.")}
        if svd.error_bound is not None:
            info["sv_error_bound"] = svd.error_bound
    else:
        V, evals = output_principal_basis(weight, C, rank)
        W = weight.to(torch.float64)
        total, kept = float(evals.sum()), float(evals[:rank].sum())
        info = {"solver": "rom-eig"}
    right = W.mT @ V  # in x r: (V_r^T W)^T
    info["output_energy_kept"] = min(1.0, kept / total) if total > 0 else 1.0
    return Factors(
        left=V.to(dtype).contiguous(),
        core=torch.eye(rank, dtype=dtype, device=V.device),
        right=right.to(dtype).contiguous(),
        info=info,
    )
