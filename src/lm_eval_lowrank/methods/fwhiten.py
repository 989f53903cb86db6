"""Fisher-weighted whitening: whiten the inputs and weigh the outputs by what the loss does with them.

whiten minimises the output error ||(W - W_hat) X||_F, every output alike; fwsvd weighs the output rows by
their Fisher information but ignores the inputs. A second-order expansion of the loss with the Fisher of W
Kronecker-factored (K-FAC), F ~ E[x x^T] (x) E[g g^T], g the gradient at the outputs, gives both at once:

    dL ~ 1/2 tr(dW C_x dW^T G),  C_x = S S^T,

and with G taken diagonal, G ~ diag(f) for the rows' Fisher sums f_i (their scale does not move the optimum),
the error to minimise is ||D (W - W_hat) S||_F with D = diag(sqrt f). Its rank-r optimum: with D W S = U Σ V^T,
W_hat S = D^-1 U_r U_r^T D W S, so

    W_hat = D^-1 U_r U_r^T D W      (left D^-1 U_r, core diag(s_r), right W^T D U_r / s_r).

S^-1 is never applied (as in whiten), and D^-1 only to the left factor. Rows with f_i = 0 (outputs the loss
never sees on these data) get a floor, f_i >= floor * mean(f), so D^-1 stays finite; the weighted error is then
exact for the floored weights. With a cross-covariance P (calib_target > 0) the target is D W P^T S^-T and the
right factor takes S^-1 back, as in whiten. With equal f it is whiten (tested).

Statistics: the input covariances from the sequential calibration, and the rows' Fisher sums from one gradient
pass over the dense model (``calibration.FisherStatsProvider``), attached to each layer's statistics.
"""

from __future__ import annotations

import torch

from . import Factors, LayerStats, register_method
from .fwsvd import checked_fisher
from .whiten import whitened_factors

FISHER_FLOOR = 1e-6  # of the mean row sum: keeps D^-1 finite for rows no gradient reached


def fisher_row_weights(weight: torch.Tensor, stats: LayerStats | None, dtype: torch.dtype) -> torch.Tensor:
    """d_i = sqrt(max(f_i, floor * mean f)) for the output rows of ``weight``."""
    f = checked_fisher("fwhiten", weight, stats).to(device=weight.device, dtype=dtype)
    return f.clamp_min(FISHER_FLOOR * float(f.mean())).sqrt()


@register_method("fwhiten", needs_calibration=True, uses_reference=True)
def fwhiten_method(
    weight: torch.Tensor, rank: int, stats: LayerStats | None = None, solver: str = "auto", seed: int = 0, solver_tol: float | None = None, **_: object
) -> Factors:
    """Truncated SVD of D W S (or D W P^T S^-T), D^-1 folded into the left factor; S^-1 is never applied without a
    cross-covariance."""
    return whitened_factors("fwhiten", weight, rank, stats, lambda W, dtype: fisher_row_weights(W, stats, dtype), solver=solver, seed=seed, solver_tol=solver_tol)
