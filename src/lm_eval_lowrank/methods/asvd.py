"""Activation-aware SVD (ASVD-like): scale the weight's input channels by their activation size first.

Channels that carry large activations matter more to the output, but plain SVD of W treats every
input channel alike. ASVD truncates the SVD of W D instead, D = diag(d) with d_j = a_j ** alpha
and a_j the size of input channel j on calibration data, then folds D^-1 back in. It is a diagonal
stand-in for whitening: with alpha = 1, the RMS as the size and uncorrelated channels it is exactly
``whiten``; with alpha = 0 it is plain SVD.

The channel size a_j is ASVD's mean |x_j| over the calibration tokens (``asvd_stat=mean_abs``,
the default), or the RMS sqrt(C_jj) read off the input covariance (``asvd_stat=rms``). The two
differ by a per-channel factor that is the same for Gaussian-like channels (and a common factor
changes nothing), so they part only on heavy-tailed channels, which the RMS weighs more.

As in ``whiten``, D^-1 is never applied: with W D = U S V^T, the right factor D^-1 V_r S_r is
W^T U_r, so channels with no activation (d_j = 0) need no special case and the solver's rounding
is not multiplied by D's condition number.
"""

from __future__ import annotations

import torch

from ..spec import ASVD_STATS, SpecError
from . import Factors, LayerStats, register_method
from .covariance import check_stats
from .tucker import reciprocal_singular_values, truncated_svd

DEFAULT_ALPHA = 0.5  # ASVD's paper found 0.5 best on LLaMA


def channel_scales(stats: LayerStats, alpha: float, stat: str = "mean_abs") -> torch.Tensor:
    """d_j = a_j ** alpha (fp64), a_j the size of input channel j: its mean |x_j| or its RMS sqrt(C_jj)."""
    if stat not in ASVD_STATS:
        raise SpecError(f"asvd_stat={stat!r} is invalid: valid: {', '.join(ASVD_STATS)}")
    if stat == "rms":
        size = torch.diagonal(stats.input_cov.to(torch.float64)).clamp_min(0).sqrt()
    elif stats.input_abs_mean is None:
        raise SpecError("method='asvd': these statistics hold no mean |x| per input channel; give asvd_stat=rms to use the covariance's diagonal")
    else:
        size = stats.input_abs_mean.to(torch.float64)
    if size.shape != (stats.input_cov.shape[-1],):
        raise SpecError(f"method='asvd': the channel sizes have shape {tuple(size.shape)}, expected ({stats.input_cov.shape[-1]},)")
    return size**alpha


@register_method("asvd", needs_calibration=True)
def asvd_method(
    weight: torch.Tensor,
    rank: int,
    stats: LayerStats | None = None,
    solver: str = "auto",
    seed: int = 0,
    solver_tol: float | None = None,
    asvd_alpha: float = DEFAULT_ALPHA,
    asvd_stat: str = "mean_abs",
    **_: object,
) -> Factors:
    """Truncated SVD of W diag(d), d the input channels' size ** alpha; diag(d)^-1 folded into the right factor."""
    check_stats("asvd", weight, stats, rank)
    assert stats is not None
    if not 0.0 <= asvd_alpha <= 1.0:
        raise SpecError(f"asvd_alpha={asvd_alpha!r} is invalid: expected the exponent of the channel scale, 0..1 (e.g. 0.5)")
    W = weight.float()
    d = channel_scales(stats, asvd_alpha, asvd_stat).to(device=W.device, dtype=W.dtype)
    if not bool(torch.isfinite(d).all()) or float(d.max()) <= 0:
        raise SpecError("method='asvd': the calibration activations are all zero or non-finite for this module")
    svd = truncated_svd(W * d, rank, solver=solver, seed=seed, tol=solver_tol)
    inv_s = reciprocal_singular_values(svd.S, tuple(W.shape))
    right = (W.mT @ svd.U) * inv_s  # D^-1 V_r, since V_r = D W^T U_r / s
    out_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return Factors(
        left=svd.U.to(out_dtype).contiguous(),
        core=torch.diag(svd.S).to(out_dtype),
        right=right.to(out_dtype).contiguous(),
        info={"solver": f"asvd-{svd.solver}", "asvd_alpha": asvd_alpha, "asvd_stat": asvd_stat, **({"sv_error_bound": svd.error_bound} if svd.error_bound is not None else {})},
    )
