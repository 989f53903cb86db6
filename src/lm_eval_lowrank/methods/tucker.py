"""Tucker decomposition: HOOI for N-D tensors, and its closed form for 2-D weights.

For a matrix, Tucker-2 with ranks (r, r) is exactly the truncated SVD: U1 = U_r,
core = diag(s_r), U2 = V_r, the best rank-r approximation (Eckart-Young). HOOI run on a
matrix converges to it, so the 2-D path uses the closed form directly.

Two solvers compute the truncated SVD:
- ``exact``: LAPACK SVD of the whole matrix (cost independent of r);
- ``randomized``: a seeded Gaussian range finder with power iterations (cost ~ r).
``auto`` picks by the size of r relative to the matrix (switch point measured in
benchmarks/decompose.py). Everything is computed in fp32 (fp64 on request) and the
sign of each singular pair is fixed, so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Factors, LayerStats, register_method

# Randomized is used while (rank + oversampling) <= RANDOMIZED_MAX_FRACTION * min(m, n).
# Measured by `benchmarks/decompose.py --switch --large`: randomized stops winning at
# k/min(m,n) = 0.28-0.35 for 1536x576 / 576x1536 and 0.56-0.83 for 576x576 / 192x576 on a
# 2-thread CPU, 0.14-0.21 for the tall shapes with 16 threads, 0.42-0.69 on an H100, and
# beyond 0.47 for 4096x4096 / 4096x11008 everywhere. 0.2 stays below the earliest reliable
# crossing (tall matrices) and leaves the exact solver near it, where the two cost alike.
RANDOMIZED_MAX_FRACTION = 0.2
# Trained weights have flat spectra (SmolLM2: sigma_64/sigma_1 ~ 0.3): with 4 iterations and
# oversampling max(8, r/4) the r-th singular value came out up to 5% low. 8 iterations with
# max(32, r/2) keep every top-r value within 1% for r <= 64 (tests/test_solver_accuracy.py).
DEFAULT_POWER_ITERS = 8


@dataclass(frozen=True)
class SVDResult:
    U: torch.Tensor  # m x r
    S: torch.Tensor  # r
    V: torch.Tensor  # n x r
    solver: str


def _fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Make the largest-magnitude entry of each left singular vector positive.
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, V * signs


def _oversample(rank: int) -> int:
    return max(32, rank // 2)


def choose_solver(shape: tuple[int, int], rank: int, solver: str = "auto") -> str:
    if solver != "auto":
        return solver
    k = rank + _oversample(rank)
    return "randomized" if k <= RANDOMIZED_MAX_FRACTION * min(shape) else "exact"


def truncated_svd(
    W: torch.Tensor,
    rank: int,
    solver: str = "auto",
    seed: int = 0,
    power_iters: int = DEFAULT_POWER_ITERS,
    dtype: torch.dtype = torch.float32,
    orth: str = "auto",
) -> SVDResult:
    """Top-``rank`` singular triplets of a 2-D tensor, deterministic for a given seed."""
    if W.dim() != 2:
        raise ValueError(f"truncated_svd expects a 2-D tensor, got shape {tuple(W.shape)}")
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} out of range 1..{min(m, n)} for a {m}x{n} matrix")
    A = W.detach().to(dtype)
    solver = choose_solver((m, n), rank, solver)
    if solver == "exact":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].mT
    elif solver == "randomized":
        U, S, V = _randomized_svd(A, rank, seed, power_iters, orth)
    else:
        raise ValueError(f"solver={solver!r} is invalid: valid auto, exact, randomized")
    U, V = _fix_signs(U.contiguous(), V.contiguous())
    return SVDResult(U, S, V, solver)


def _householder(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y)[0]


def _cholesky_qr2(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of a tall-skinny Y by CholeskyQR run twice (GEMM + tiny k x k work).

    On a GPU, Householder QR of an n x k panel is latency-bound (tens of ms per call);
    this costs two GEMMs and two k x k factorisations. It is accurate while cond(Y) is
    below ~1/sqrt(eps), which holds for the half-steps of subspace iteration (Y = A Q
    with Q orthonormal); a breakdown shows as non-finite values, and the caller then redoes
    the matrix with Householder QR.
    """
    Q = Y
    for _ in range(2):
        # cholesky_ex does not synchronise; a failed factorisation leaves NaN/inf, which the
        # caller checks once per matrix (a host sync per call would cost more than the maths).
        R, _ = torch.linalg.cholesky_ex(Q.mT @ Q, upper=True)
        Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    return Q


def orthonormalize(Y: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Orthonormal basis of a tall-skinny matrix: Householder on CPU, CholeskyQR2 on a GPU.

    CholeskyQR2 returns non-finite values when it breaks down; callers check once.
    """
    if method == "auto":
        method = "cholqr2" if Y.is_cuda else "householder"
    return _cholesky_qr2(Y) if method == "cholqr2" else _householder(Y)


# Early stop of the power iterations (CPU path): when the top-r singular values estimated from
# the R factor move by less than this (relative) between iterations.
CONVERGENCE_RTOL = 1e-4


def _subspace_iteration(A: torch.Tensor, omega: torch.Tensor, power_iters: int, orth: str, rank: int | None = None) -> torch.Tensor:
    Q = orthonormalize(A @ omega, orth)
    prev = None
    for _ in range(power_iters):  # re-orthonormalised each half step
        if rank is not None and orth == "householder" and not A.is_cuda:
            # A^T Q = Z R: the singular values of R estimate the top ones of A. Stop once they
            # settle (on a GPU the check would cost a host sync per iteration, so it runs all).
            Z, R = torch.linalg.qr(A.mT @ Q)
            est = torch.linalg.svdvals(R)[:rank]
            if prev is not None and float(((est - prev).abs() / est.clamp_min(1e-30)).max()) < CONVERGENCE_RTOL:
                return orthonormalize(A @ Z, orth)
            prev = est
        else:
            Z = orthonormalize(A.mT @ Q, orth)
        Q = orthonormalize(A @ Z, orth)
    return Q


def _randomized_svd(A: torch.Tensor, rank: int, seed: int, power_iters: int, orth: str = "auto"):
    m, n = A.shape
    transpose = m < n  # work on the tall orientation: the range finder then sketches the short side
    if transpose:
        A = A.mT
        m, n = n, m
    k = min(rank + _oversample(rank), n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, k, generator=gen, dtype=A.dtype).to(A.device)
    resolved = orth if orth != "auto" else ("cholqr2" if A.is_cuda else "householder")
    Q = _subspace_iteration(A, omega, power_iters, resolved, rank)
    if orth != "householder" and not bool(torch.isfinite(Q).all()):
        Q = _subspace_iteration(A, omega, power_iters, "householder")  # CholeskyQR2 broke down
    Q = _householder(Q)  # one exact QR at the end: the basis the answer is projected on
    B = Q.mT @ A  # k x n
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub[:, :rank]
    S = S[:rank]
    V = Vh[:rank].mT
    if transpose:
        U, V = V, U
    return U, S, V


def tucker2(W: torch.Tensor, rank: int, solver: str = "auto", seed: int = 0, dtype: torch.dtype = torch.float32) -> Factors:
    """Tucker-2 of a weight (out x in): U1 (out x r), core (r x r) = diag(s), U2 (in x r)."""
    res = truncated_svd(W, rank, solver=solver, seed=seed, dtype=dtype)
    return Factors(left=res.U, core=torch.diag(res.S), right=res.V, info={"solver": res.solver})


@register_method("tucker")
def tucker_method(weight: torch.Tensor, rank: int, stats: LayerStats | None = None, solver: str = "auto", seed: int = 0, **_: object) -> Factors:
    """The data-free method: Tucker-2 of the weight itself (statistics are ignored)."""
    return tucker2(weight, rank, solver=solver, seed=seed)


# -- N-D Tucker by HOOI ---------------------------------------------------------


def unfold(T: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n unfolding: mode ``mode`` becomes the rows."""
    return torch.movedim(T, mode, 0).reshape(T.shape[mode], -1)


def mode_dot(T: torch.Tensor, M: torch.Tensor, mode: int) -> torch.Tensor:
    """T x_mode M, with M of shape (new_dim, T.shape[mode])."""
    moved = torch.movedim(T, mode, 0)
    out = torch.tensordot(M, moved, dims=([1], [0]))
    return torch.movedim(out, 0, mode)


def tucker_reconstruct(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    out = core
    for mode, U in enumerate(factors):
        out = mode_dot(out, U, mode)
    return out


@dataclass
class HOOIResult:
    core: torch.Tensor
    factors: list[torch.Tensor]
    iterations: int
    converged: bool
    rel_error: float


def hooi(
    T: torch.Tensor,
    ranks: tuple[int, ...] | list[int],
    max_iters: int = 50,
    tol: float = 1e-7,
    dtype: torch.dtype = torch.float64,
) -> HOOIResult:
    """Higher-order orthogonal iteration (Tucker) with HOSVD initialisation.

    Stops when the core's norm changes by less than ``tol`` (relative), which is the
    fit's change since ||T - T_hat||^2 = ||T||^2 - ||core||^2 for orthonormal factors.
    """
    if len(ranks) != T.dim():
        raise ValueError(f"ranks {tuple(ranks)} must have one entry per mode of a {T.dim()}-D tensor")
    X = T.detach().to(dtype)
    for mode, r in enumerate(ranks):
        if not 1 <= r <= X.shape[mode]:
            raise ValueError(f"rank {r} for mode {mode} out of range 1..{X.shape[mode]}")
    factors = [truncated_svd(unfold(X, m), r, solver="exact", dtype=dtype).U for m, r in enumerate(ranks)]
    norm_x2 = float(X.pow(2).sum())
    prev = None
    converged = False
    it = 0
    for it in range(1, max_iters + 1):
        for mode, r in enumerate(ranks):
            Y = X
            for other, U in enumerate(factors):
                if other != mode:
                    Y = mode_dot(Y, U.mT, other)
            factors[mode] = truncated_svd(unfold(Y, mode), r, solver="exact", dtype=dtype).U
        core = X
        for mode, U in enumerate(factors):
            core = mode_dot(core, U.mT, mode)
        fit = float(core.pow(2).sum())
        if prev is not None and abs(fit - prev) <= tol * max(prev, 1e-30):
            converged = True
            break
        prev = fit
    # From the reconstruction: ||T||^2 - ||core||^2 cancels catastrophically near exact fits.
    rel_err = float(torch.linalg.norm(X - tucker_reconstruct(core, factors))) / max(norm_x2, 1e-30) ** 0.5
    return HOOIResult(core=core, factors=factors, iterations=it, converged=converged, rel_error=rel_err)
