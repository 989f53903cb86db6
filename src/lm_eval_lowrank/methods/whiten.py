"""Truncation-aware data whitening (SVD-LLM-like).

With C_x = S S^T (S the lower Cholesky factor of the input covariance), the output error
of any W_hat is ||(W - W_hat) X||_F^2 = N ||(W - W_hat) S||_F^2, so truncating the SVD of
W S and folding S^-1 back in (W_hat = U_r diag(s_r) V_r^T S^-1 = U_r U_r^T W) is the optimal
rank-r weight for these inputs; the discarded singular values of W S are exactly the error.

Error correction (``LayerStats.cross_cov`` = P = X^T X_ref / N, X_ref the same linear's
inputs in the dense model): the target becomes the dense model's outputs,
min ||X_ref W^T - X W_hat^T||_F. Expanding with C = S S^T and Z = W_hat S gives
||Z - W P^T S^-T||_F^2 + const, so Z is the truncated SVD of W P^T S^-T and again
W_hat = Z S^-1. With X_ref = X, P = C and W C S^-T = W S: plain whitening.

Activation covariances of real models are often near-singular (dead or duplicated
features, fewer tokens than features). The factorisation is tried in fp32, then with
lambda * mean(diag) * I added (lambda growing), then in fp64 the same way; if even that
fails the error names the module's statistics in one line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..spec import SpecError
from . import Factors, LayerStats, register_method
from .covariance import WhiteningError, all_finite, check_stats, factor_of, times_lower, whitening_factor
from .tucker import reciprocal_singular_values, truncated_svd

# whitening_factor and WhiteningError live in .covariance (shared with rom); importable from here as before.
__all__ = ["WhiteningError", "whiten_method", "whitened_factors", "whitened_target", "whitening_factor"]


def whitened_target(W: torch.Tensor, S: torch.Tensor, P: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix whose truncated SVD gives Z = W_hat S: W S, or W P^T S^-T with a cross-covariance P."""
    if P is None:
        return times_lower(W, S)
    # W P^T S^-T = (S^-1 P W^T)^T, with S lower triangular.
    return torch.linalg.solve_triangular(S, P.to(device=S.device, dtype=S.dtype) @ W.mT, upper=False).mT


@register_method("whiten", needs_calibration=True, uses_reference=True)
def whiten_method(
    weight: torch.Tensor, rank: int, stats: LayerStats | None = None, solver: str = "auto", seed: int = 0, solver_tol: float | None = None, **_: object
) -> Factors:
    """Truncated SVD of W S (or W P^T S^-T against the dense model), S^-1 folded into the right factor."""
    return whitened_factors("whiten", weight, rank, stats, None, solver=solver, seed=seed, solver_tol=solver_tol)


def whitened_factors(
    name: str,
    weight: torch.Tensor,
    rank: int,
    stats: LayerStats | None,
    row_weights: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None,
    solver: str = "auto",
    seed: int = 0,
    solver_tol: float | None = None,
) -> Factors:
    """Whitening's factors, with the output rows weighed by D = diag(``row_weights(W, dtype)``) when given (fwhiten):
    the truncated SVD of D T (T = W S, or W P^T S^-T), W_hat = D^-1 U_r U_r^T D T S^-1."""
    C = check_stats(name, weight, stats, rank)
    in_f = weight.shape[1]
    P = stats.cross_cov if stats is not None else None
    if P is not None and (P.shape != C.shape or not all_finite(P)):
        raise SpecError(f"method={name!r}: cross-covariance has shape {tuple(P.shape)} or non-finite entries, expected finite ({in_f}, {in_f})")
    S, lam, dtype = factor_of(stats, device=weight.device)
    W = weight.to(dtype)
    d = row_weights(W, dtype) if row_weights is not None else None
    target = whitened_target(W, S, P)
    if d is not None:
        target = d[:, None] * target
    svd = truncated_svd(target, rank, solver=solver, seed=seed, dtype=dtype, tol=solver_tol)
    # Z = U_r U_r^T target is the best rank-r Z for the computed U_r (exact or not), so
    # W_hat = D^-1 Z S^-1 = D^-1 U_r diag(s) right^T with right^T = diag(1/s) U_r^T target S^-1. Without
    # a cross-covariance, target S^-1 = D W: S^-1 is never applied, and rounding in the solver's
    # vectors is not multiplied by S's condition number (with V_r from the solver it was:
    # SmolLM2's perplexity moved from 69 to 85 between two roundings of the same vectors).
    inv_s = reciprocal_singular_values(svd.S, tuple(target.shape))
    if P is None:
        right = (W.mT @ (svd.U if d is None else d[:, None] * svd.U)) * inv_s
    else:  # right^T = V^T S^-1 with V = target^T U_r / s, consistent with U_r; S^T upper triangular
        right = torch.linalg.solve_triangular(S.mT, (target.mT @ svd.U) * inv_s, upper=True)
    left = svd.U if d is None else svd.U / d[:, None]
    if not (torch.isfinite(left).all() and torch.isfinite(right).all()):  # pragma: no cover - excluded by the pivot check (and fwhiten's floor)
        raise WhiteningError(f"calib: method={name!r} produced non-finite factors; use method=rom")
    out_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return Factors(
        left=left.to(out_dtype).contiguous(),
        core=torch.diag(svd.S).to(out_dtype),
        right=right.to(out_dtype).contiguous(),
        info={
            "solver": f"{name}-{svd.solver}",
            "whiten_lambda": lam,
            "whiten_dtype": str(dtype).removeprefix("torch."),
            "whiten_target": "compressed" if P is None else "dense",
            **({"sv_error_bound": svd.error_bound} if svd.error_bound is not None else {}),
        },
    )
