"""LLM-ROM: reduced-order modelling of a linear layer from the PCA of its outputs.

With calibration inputs X (tokens x in) and Y = X W^T, the output covariance is
C_y = W C_x W^T (C_x = X^T X / N, uncentred, as the statistics are collected).
Keeping its top-r eigenvectors V_r (out x r) gives W ~= V_r (V_r^T W): the projection
of the outputs onto their principal subspace, which minimises ||(W - W_hat) X||_F among
all rank-r weights. Factors: left = V_r, core = I, right = W^T V_r.

Numerics in fp64 (the matrices are at most a few thousand wide). A singular C_x is fine
here: nothing is inverted. ``LayerStats.cross_cov`` is not used: rom always fits the
compressed model's own inputs (``calib_target`` does not apply; ``calib_staged`` does).
"""

from __future__ import annotations

import torch

from ..spec import SpecError
from . import Factors, LayerStats, register_method


def _check_stats(name: str, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    if stats is None:
        raise SpecError(f"method={name!r} needs calibration statistics (calib=...) but none were given for this module")
    C = stats.input_cov
    n = weight.shape[1]
    if C.dim() != 2 or C.shape != (n, n):
        raise SpecError(f"method={name!r}: input covariance has shape {tuple(C.shape)}, expected ({n}, {n}) for a weight of shape {tuple(weight.shape)}")
    if not torch.isfinite(C).all():
        raise SpecError(f"method={name!r}: input covariance has NaN/inf entries (calibration activations overflowed); use dtype=float32")
    return C


def psd_sqrt(C: torch.Tensor) -> torch.Tensor:
    """A square root S of a symmetric PSD matrix (C = S S^T), negative eigenvalues clamped."""
    C = 0.5 * (C + C.mT)
    evals, evecs = torch.linalg.eigh(C)
    return evecs * evals.clamp_min(0).sqrt()


def output_principal_basis(W: torch.Tensor, C: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenvectors (out x r) and all eigenvalues (descending) of W C W^T, in fp64.

    When out > in the out x out eigenproblem is avoided: the left singular vectors of
    W S (S a square root of C) are the same eigenvectors, from an out x in SVD.
    """
    W = W.to(torch.float64)
    C = C.to(torch.float64)
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
    signs = torch.sign(V[idx, torch.arange(V.shape[1])])
    signs[signs == 0] = 1
    return V * signs, evals.clamp_min(0)


@register_method("rom", needs_calibration=True)
def rom_method(weight: torch.Tensor, rank: int, stats: LayerStats | None = None, **_: object) -> Factors:
    """W ~= V_r (V_r^T W), V_r the top-r principal directions of the layer's outputs."""
    C = _check_stats("rom", weight, stats)
    out_f, in_f = weight.shape
    if not 1 <= rank <= min(out_f, in_f):
        raise SpecError(f"rank={rank} is invalid for a {out_f}x{in_f} weight: valid 1..{min(out_f, in_f)}")
    V, evals = output_principal_basis(weight, C, rank)
    W64 = weight.to(torch.float64)
    right = W64.mT @ V  # in x r: (V_r^T W)^T
    total = float(evals.sum())
    kept = float(evals[:rank].sum())
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return Factors(
        left=V.to(dtype).contiguous(),
        core=torch.eye(rank, dtype=dtype),
        right=right.to(dtype).contiguous(),
        info={"solver": "rom-eig", "output_energy_kept": kept / total if total > 0 else 1.0},
    )
