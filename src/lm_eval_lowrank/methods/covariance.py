"""Input covariances of calibration data: checks and factorisations shared by rom and whiten.

C = X^T X / N is symmetric positive semi-definite; real activations often make it
near-singular (dead or duplicated features, fewer tokens than features).
"""

from __future__ import annotations

import math

import torch

from ..spec import SpecError
from . import LayerStats


def all_finite(T: torch.Tensor) -> bool:
    """No NaN or inf in ``T``, from its sum in fp64: one reduction, where isfinite().all() makes three passes
    and a temporary (6.5 against ~1 ms for a 1536-wide fp64 covariance, checked per module)."""
    return math.isfinite(float(T.sum(dtype=torch.float64)))


def times_lower(W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """W @ S for a lower-triangular S: BLAS trmm through scipy on a CPU (half the flops of a GEMM; 1.3-1.9x
    faster than torch's GEMM at SmolLM2's sizes on one thread), torch's GEMM otherwise."""
    from .tucker import _scipy_linalg, _scipy_threads

    sla = _scipy_linalg() if W.device.type == "cpu" and S.device.type == "cpu" and W.dtype == S.dtype and W.dtype in (torch.float32, torch.float64) else None
    if sla is None:
        return W @ S
    trmm = sla.blas.strmm if W.dtype == torch.float32 else sla.blas.dtrmm
    # In Fortran order the C-ordered W and S are W^T and S^T: S^T W^T = (W S)^T, S^T upper triangular.
    with _scipy_threads(S.shape[0]):
        out = trmm(1.0, S.detach().contiguous().numpy().T, W.detach().contiguous().numpy().T, side=0, lower=0)
    return torch.from_numpy(out.T)


def check_stats(name: str, weight: torch.Tensor, stats: LayerStats | None, rank: int | None = None) -> torch.Tensor:
    """The input covariance of ``stats``, checked against ``weight`` and ``rank`` (one-line errors naming the method)."""
    out_f, in_f = weight.shape
    if rank is not None and not 1 <= rank <= min(out_f, in_f):
        raise SpecError(f"rank={rank} is invalid for a {out_f}x{in_f} weight: valid 1..{min(out_f, in_f)}")
    if stats is None:
        raise SpecError(f"method={name!r} needs calibration statistics (calib=...) but none were given for this module")
    C = stats.input_cov
    if C is None:  # a gradient-only record (fwsvd's Fisher rows) handed to a method that reads the inputs
        raise SpecError(f"method={name!r} needs the input covariances of its calibration data, but this module's statistics hold none")
    n = weight.shape[1]
    if C.dim() != 2 or C.shape != (n, n):
        raise SpecError(f"method={name!r}: input covariance has shape {tuple(C.shape)}, expected ({n}, {n}) for a weight of shape {tuple(weight.shape)}")
    if not all_finite(C):
        raise SpecError(f"method={name!r}: input covariance has NaN/inf entries (calibration activations overflowed); use dtype=float32")
    return C


def psd_sqrt(C: torch.Tensor) -> torch.Tensor:
    """A square root S of a symmetric PSD matrix (C = S S^T), negative eigenvalues clamped."""
    C = 0.5 * (C + C.mT)
    evals, evecs = torch.linalg.eigh(C)
    return evecs * evals.clamp_min(0).sqrt()


# Regularisation strengths tried, relative to the mean of diag(C); 0 first (no change).
FP32_LAMBDAS = (0.0, 1e-6, 1e-5, 1e-4)
FP64_LAMBDAS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1)


class WhiteningError(SpecError):
    """The input covariance could not be factorised even regularised in fp64."""


def whitening_factor(C: torch.Tensor, fp32_lambdas: tuple[float, ...] = FP32_LAMBDAS, fp64_lambdas: tuple[float, ...] = FP64_LAMBDAS) -> tuple[torch.Tensor, float, torch.dtype]:
    """Lower-triangular S with S S^T = C + lambda*mean(diag C)*I, trying the lambdas in order.

    Returns (S, lambda used, dtype used). A factor counts as failed when the Cholesky
    reports a non-positive pivot or S has a non-finite or zero diagonal entry (S^-1 then
    does not exist or overflows).
    """
    if not all_finite(C):
        raise WhiteningError("calib: input covariance has NaN/inf entries; calibrate in float32 (dtype=float32)")
    scale = float(torch.diagonal(C).to(torch.float64).abs().mean())
    if not scale > 0:
        raise WhiteningError("calib: input covariance is all zero (the module saw only zero inputs); use more or other calibration data")
    tried = []
    for dtype, lambdas in ((torch.float32, fp32_lambdas), (torch.float64, fp64_lambdas)):
        # The Cholesky reads only the lower triangle, so C is not symmetrised first: the transposed
        # add cost more than the factorisation itself (43 against 29 ms at 1536 wide).
        A = C.to(dtype)
        for lam in lambdas:
            S, info = torch.linalg.cholesky_ex(A + (lam * scale) * torch.eye(A.shape[0], dtype=dtype, device=A.device) if lam else A)
            d = torch.diagonal(S)
            # A tiny pivot in fp32 makes S^-1 blow up even when Cholesky "succeeds".
            tiny = 1e-6 if dtype == torch.float32 else 1e-12
            if int(info) == 0 and all_finite(d) and float(d.min()) > tiny * scale**0.5:
                return S, lam, dtype
            tried.append(f"{str(dtype).removeprefix('torch.')}@{lam:g}")
    raise WhiteningError(
        f"calib: input covariance is not positive definite even regularised (tried {', '.join(tried)}); "
        "use more calibration tokens (calib_n/calib_len) or method=rom"
    )


def factor_of(
    stats: LayerStats,
    fp32_lambdas: tuple[float, ...] = FP32_LAMBDAS,
    fp64_lambdas: tuple[float, ...] = FP64_LAMBDAS,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float, torch.dtype]:
    """whitening_factor of ``stats.input_cov``, on ``device`` (the weight's: statistics are gathered on the
    CPU, and a model on a GPU is factorised there), computed once per statistics object and device.
    Sibling modules share one object: at Llama-2-7B's width a Cholesky costs 0.44 s on one CPU thread, and
    q, k, v would pay it three times. A failure is remembered too. The memo is dropped if the covariance is
    modified in place. Callers must not modify S."""
    C = stats.input_cov
    target = torch.device(device) if device is not None else C.device
    key = ("cholesky", fp32_lambdas, fp64_lambdas, id(C), C._version, str(target))
    if key not in stats.derived:
        stats.derived.clear()  # only the latest covariance version (and device) is kept
        try:
            stats.derived[key] = whitening_factor(C.to(target), fp32_lambdas, fp64_lambdas)
        except WhiteningError as err:  # siblings fail alike: remembered, not retried
            stats.derived[key] = err
    found = stats.derived[key]
    if isinstance(found, WhiteningError):
        raise found
    return found
