"""Fisher-weighted SVD (after FWSVD, Hsu et al. 2022): weight the output rows by how much the loss cares.

Plain SVD minimises ||W - W_hat||_F, as if every weight mattered alike. FWSVD weights each weight by its
Fisher information, E[(dL/dw)^2] over calibration data, summed along a row: f_i = sum_j I_ij for output
i, d_i = sqrt(f_i), and minimises ||diag(d) (W - W_hat)||_F instead. Where the activation-aware methods
look at a linear's inputs, this looks at what the language-model loss does with its outputs.

With diag(d) W = U S V^T, the rank-r optimum is W_hat = diag(d)^-1 U_r S_r V_r^T = W V_r V_r^T (since
U_r S_r = diag(d) W V_r): the rows of W projected on the top right singular subspace of the weighted
weight. So diag(d)^-1 is never formed, and rows whose Fisher is zero (no effect on the loss on these
data) need no special case. With equal f_i it is plain SVD (tested equal to ``tucker``).

The statistics (``LayerStats.output_fisher``) come from :class:`~lm_eval_lowrank.calibration.FisherStatsProvider`:
one forward and backward per calibration sequence through the dense model.
"""

from __future__ import annotations

import torch

from ..spec import SpecError
from . import Factors, LayerStats, register_method
from .tucker import reciprocal_singular_values, truncated_svd


def checked_fisher(name: str, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """The rows' Fisher sums f of ``stats`` (fp64), checked against ``weight`` (one-line errors naming the method)."""
    f = None if stats is None else stats.output_fisher
    if f is None:
        raise SpecError(f"method={name!r} needs the Fisher information of each output row (calibration with gradients); these statistics hold none")
    if f.shape != (weight.shape[0],):
        raise SpecError(f"method={name!r}: the Fisher row sums have shape {tuple(f.shape)}, expected ({weight.shape[0]},)")
    f = f.to(torch.float64)
    if not bool(torch.isfinite(f).all()) or float(f.min()) < 0 or float(f.max()) <= 0:
        raise SpecError(f"method={name!r}: the Fisher row sums of this module are zero, negative or non-finite (no gradient reached it)")
    return f


def row_scales(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """d_i = sqrt(f_i) (fp64), f_i the Fisher information of output row i summed over its inputs."""
    return checked_fisher("fwsvd", weight, stats).sqrt()


@register_method("fwsvd", needs_calibration=True)
def fwsvd_method(
    weight: torch.Tensor,
    rank: int,
    stats: LayerStats | None = None,
    solver: str = "auto",
    seed: int = 0,
    solver_tol: float | None = None,
    **_: object,
) -> Factors:
    """Truncated SVD of diag(d) W, d the rows' Fisher weight; the factors give W V_r V_r^T."""
    W = weight.float()
    d = row_scales(W, stats).to(device=W.device, dtype=W.dtype)
    svd = truncated_svd(d[:, None] * W, rank, solver=solver, seed=seed, tol=solver_tol)
    inv_s = reciprocal_singular_values(svd.S, tuple(W.shape))
    left = (W @ svd.V) * inv_s  # diag(d)^-1 U_r, since U_r = diag(d) W V_r / s
    out_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return Factors(
        left=left.to(out_dtype).contiguous(),
        core=torch.diag(svd.S).to(out_dtype),
        right=svd.V.to(out_dtype).contiguous(),
        info={"solver": f"fwsvd-{svd.solver}", **({"sv_error_bound": svd.error_bound} if svd.error_bound is not None else {})},
    )
