"""Tucker decomposition: HOOI for N-D tensors, and its closed form for 2-D weights.

For a matrix, Tucker-2 with ranks (r, r) is exactly the truncated SVD: U1 = U_r,
core = diag(s_r), U2 = V_r, the best rank-r approximation (Eckart-Young). HOOI run on a
matrix converges to it, so the 2-D path uses the closed form directly.

Four solvers compute the truncated SVD:
- ``exact``: LAPACK SVD of the whole matrix (cost independent of r);
- ``gram``: the top eigenpairs of the short side's Gram matrix A^T A (one syrk and a partial
  symmetric eigensolve; the exact SVD instead when squaring the condition number would cost accuracy);
- ``krylov``: seeded block Lanczos on A^T A with full reorthogonalisation, stopped once the
  residuals certify every top-r singular value to KRYLOV_TOL (cost ~ the Krylov dimension, ~5-10 r);
- ``randomized``: a seeded Gaussian range finder with subspace (power) iteration.
``auto`` picks by device and by the size of r relative to the matrix (switch points measured
in benchmarks/decompose.py): on a CPU krylov for small r and gram otherwise, on a GPU
randomized, and exact when r is large.
Everything is computed in fp32 (fp64 on request) and the sign of each singular pair is
fixed, so results are deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import Factors, LayerStats, _lapack, register_method

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
    # Certified bound on max_i |s_i - sigma_i| / sigma_i over the top r (Krylov); None when the solver gives none.
    error_bound: float | None = None


def _fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Make the largest-magnitude entry of each left singular vector positive.
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    signs[signs == 0] = 1
    return U * signs, V * signs


def _oversample(rank: int) -> int:
    return max(32, rank // 2)


# CPU: block Krylov while rank <= KRYLOV_GRAM_SWITCH * n * (n / m) for an m x n matrix (n the short
# side), the Gram solver above it up to half the short side (faster than LAPACK's SVD there),
# and the exact SVD beyond. Krylov costs ~ m n r, Gram ~ n^3 (its eigensolve), hence the n/m factor. Measured by
# `benchmarks/decompose.py --switch` on SmolLM2 (1 thread): Krylov stops winning at r/n = 0.11-0.17
# on 576x576, 0.03-0.08 on 1536x576 and 576x1536, and 0.04-0.08 on 192x576.
KRYLOV_GRAM_SWITCH = 0.1
# Above half the short side the top eigenvalues reach far into the spectrum: the partial eigensolve
# approaches a full one, and squaring the condition number sends more matrices to the exact
# fallback (after the Gram work). Measured: Gram 1.5x faster than exact at r/n = 0.44 on 576x576,
# 0.6x at 0.67; 1.1x at 0.83 and 0.7x at 1.0 on 192x576.
GRAM_MAX_FRACTION = 0.5


def choose_solver(shape: tuple[int, int], rank: int, solver: str = "auto", device: torch.device | str = "cpu") -> str:
    if solver != "auto":
        return solver
    if torch.device(device).type == "cpu":
        n, m = min(shape), max(shape)
        if rank > GRAM_MAX_FRACTION * n:
            return "exact"
        return "krylov" if rank <= KRYLOV_GRAM_SWITCH * n * n / m else "gram"
    k = rank + _oversample(rank)
    return "randomized" if k <= RANDOMIZED_MAX_FRACTION * min(shape) else "exact"


def reciprocal_singular_values(S: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """1 / s for the singular values ``S`` of a matrix of ``shape``, and 0 for those below round-off (a null
    direction): the right factor W^T U / s of a projection U U^T W then stays finite and exact."""
    live = S > S[0] * max(shape) * torch.finfo(S.dtype).eps
    return torch.where(live, 1.0 / S.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(S))


def truncated_svd(
    W: torch.Tensor,
    rank: int,
    solver: str = "auto",
    seed: int = 0,
    power_iters: int = DEFAULT_POWER_ITERS,
    dtype: torch.dtype = torch.float32,
    orth: str = "auto",
    tol: float | None = None,
) -> SVDResult:
    """Top-``rank`` singular triplets of a 2-D tensor, deterministic for a given seed.

    ``tol`` is the Krylov solver's certified bound on the relative error of each singular value
    (default KRYLOV_TOL). The vectors are those of the best approximation within the subspace
    found, not exact ones: a caller that maps them through an ill-conditioned matrix should
    rebuild its factors from U alone (as whiten does)."""
    if W.dim() != 2:
        raise ValueError(f"truncated_svd expects a 2-D tensor, got shape {tuple(W.shape)}")
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} out of range 1..{min(m, n)} for a {m}x{n} matrix")
    A = W.detach().to(dtype)
    solver = choose_solver((m, n), rank, solver, A.device)
    result = None
    bound = None
    if solver == "krylov":
        result = _block_krylov_svd(A, rank, seed, KRYLOV_TOL if tol is None else tol)
        if result is not None:
            *result, bound = result
        else:  # not converged within the dimension cap: the Gram solver's answer instead
            solver = "gram"
    if solver == "gram":
        result = _gram_svd(A, rank)
        if result is None:  # too ill-conditioned to square: the exact answer instead
            solver = "exact"
    if solver == "exact":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].mT
    elif solver == "randomized":
        U, S, V = _randomized_svd(A, rank, seed, power_iters, orth)
    elif solver in ("krylov", "gram"):
        U, S, V = result
    else:
        raise ValueError(f"solver={solver!r} is invalid: valid auto, exact, gram, krylov, randomized")
    U, V = _fix_signs(U.contiguous(), V.contiguous())
    return SVDResult(U, S, V, solver, bound)


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


# Block Krylov (CPU default). It stops on a certificate, not on estimates that stopped moving: the
# residual r_i of each top Ritz pair of A^T A bounds the error of its singular value,
# |sigma_i - s_i| / sigma_i <= ||r_i|| / (2 s_i^2) (s_i, a Ritz value, is a lower bound of sigma_i).
# KRYLOV_TOL is the 1 % accuracy goal itself: the bound is rigorous (for the eigenvalue each Ritz
# value converged to; blocks of >= 8 kept it from missing a top one on SmolLM2). It stops at about
# the dimensions of the former "estimates moved < 1e-3" rule (75 against 78 at r = 8), and the
# true errors on all 210 SmolLM2 matrices were <= 1.4e-3 at r <= 8, since the bound is linear in
# the residual while the error is quadratic. Since algorithm 6 each error also takes Kato-Temple's
# quadratic bound where the gap below it allows (_residual_bound): rank 1 stops at 35 dimensions on
# average against 40 (worst true error there 5.9e-3), rank 8 at 74 against 75.
# Not taken (measured on 3 SmolLM2 layers, blocks of 8): Lehmann's cluster bound over the top s > r Ritz
# values, which needs no gap inside the cluster, only lambda_{s+1} <= theta_{s+1} + ||r_{s+1}||. That premise
# fails for Ritz values not yet converged: it stopped at the hindsight dimensions with true errors up to
# 1.2e-2 (r = 1) and 3.0e-2 (r = 8). Kept to Ritz values with ||r|| <= theta / 10 it held, and saved 5 %
# of the dimensions at r = 8 (66 against 70), none at r = 1.
KRYLOV_TOL = 1e-2


def krylov_block_size(rank: int) -> int:
    """Block width: >= 4 (single-vector Lanczos misconverged on near-equal top values here);
    wider blocks for larger r, whose GEMMs run at a higher rate than narrow ones."""
    return max(4, min(32, 8 * math.ceil(rank / 16)))


def _residual_bound(Y: torch.Tensor, theta: torch.Tensor, tail: torch.Tensor) -> float:
    """Largest certified relative error of the top r singular values (see KRYLOV_TOL).

    ``Y`` (b x n) is the last block's residual after projection, ``theta`` the top r + 1 Ritz values and ``tail``
    (b x (r + 1)) the last b entries of their Ritz vectors: A^T A x_i - theta_i x_i = Y^T tail_i. No residual
    counts as converged for being small next to theta_1: relative to a value 1000x below sigma_1 (an outlier
    channel scaled in by whiten) a round-off residual is a 10-40 % error. Such values are not certified, and the
    caller falls back (Gram, whose conditioning check then takes the exact SVD).

    Each error takes the lesser of two bounds on lambda_i - theta_i: the residual ||r_i||, and Kato-Temple's
    ||r_i||^2 / (theta_i - theta_{i+1} - ||r_{i+1}||) where that gap is positive (lambda_{i+1} is at most
    theta_{i+1} + ||r_{i+1}||, the same premise as the first: each Ritz value converged to its own eigenvalue).
    The second is quadratic in the residual where the top values stand apart: at rank 1 on SmolLM2 it stops at
    35 dimensions on average against 40; on the flat spectra of the top 8 it gains nothing (74 against 75).
    """
    res = (tail * ((Y @ Y.mT) @ tail)).sum(0).clamp_min(0).sqrt()
    r = len(theta) - 1
    gap = theta[:r] - theta[1:] - res[1:]
    kato_temple = torch.where(gap > 0, res[:r].square() / gap.clamp_min(torch.finfo(theta.dtype).tiny), torch.full_like(gap, math.inf))
    bound = torch.minimum(res[:r], kato_temple) / (2 * theta[:r].clamp_min(torch.finfo(theta.dtype).tiny))
    return float(bound.max())


def _next_check(d: int, bound: float, previous: tuple[int, float] | None, tol: float, b: int, step_cost: float) -> int:
    """Where to check next. A check costs an eigendecomposition of T (~30 d^3 flops in GEMM
    terms, measured), a block of Lanczos ``step_cost``: while a check costs under a quarter of a
    block, check every block; past that, at the dimension where the residual's geometric rate
    since the previous check reaches ``tol``."""
    if 30 * d**3 <= step_cost / 4 or previous is None or tol <= 0 or not 0 < bound < previous[1]:
        return d + b
    rate = math.log(bound / previous[1]) / (d - previous[0])  # log-decrease per dimension, < 0
    return d + b * max(1, math.ceil(math.log(tol / bound) / rate / b))


def _block_krylov_svd(A: torch.Tensor, rank: int, seed: int, tol: float = KRYLOV_TOL, block: int | None = None):
    """(U, S, V, certified error bound) by block Lanczos on A^T A (short side), or None if not converged.

    The blocks are kept as rows (b x n): MKL runs (b x n) @ (n x m) at full rate, while the
    column form A @ (n x b) falls to a slow kernel for 2 <= b < 16 (10x here). Each step costs
    two passes over A (A V_j, then A^T A V_j), is reorthogonalised against every earlier block
    twice (CGS2), and its projection coefficients are exactly the new block column of the
    Lanczos matrix T = V^T A^T A V, so Ritz values and residuals come from T and the last
    block with no extra pass. The answer is the Rayleigh-Ritz one: V_r from T's top
    eigenvectors and U = A V_r / s, so U diag(s) V_r^T = A V_r V_r^T, the best approximation
    within span(V_r).
    """
    m, n = A.shape
    transpose = m < n
    if transpose:  # Krylov on the short side: n x n Gram, smaller basis vectors
        A = A.mT
        m, n = n, m
    b = min(block or krylov_block_size(rank), n)
    cap = min(n, max(8 * rank + 8 * b, 64))  # beyond this the Gram solver is cheaper anyway
    cap -= cap % b
    if cap < rank + b:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Vb = A.new_empty(cap, n)  # basis rows
    Wb = A.new_empty(cap, m)  # (A V)^T, kept for U
    T = A.new_zeros(cap, cap)
    Vb[:b] = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=A.dtype).to(A.device))[0].mT
    # No check before a certificate can hold: on SmolLM2 the first came at >= 24 dimensions at r = 1, 32 at
    # r = 2, 40 at r = 4 (blocks of 8) and >= 5r beyond. Skipping the check at 16 made r = 1 5 % faster.
    check_at = max(rank + b, 5 * rank, 3 * b)
    previous: tuple[int, float] | None = None
    At = A.mT
    d = 0
    while True:  # a few dozen small ops a step: at r <= 8 their dispatch is a fifth of the time
        lo, d = d, d + b
        AV = torch.mm(Vb[lo:d], At, out=Wb[lo:d])  # (A V_j)^T
        Y = AV @ A  # (A^T A V_j)^T
        size = float(torch.linalg.vector_norm(Y))  # before projection: the scale of the round-off it leaves
        basis = Vb[:d]
        basis_t = basis.mT
        H = Y @ basis_t  # V^T A^T A V_j: the new block row of T
        Y.addmm_(H, basis, alpha=-1)
        H2 = Y @ basis_t  # second Gram-Schmidt pass (CGS2) for orthogonality in fp32
        Y.addmm_(H2, basis, alpha=-1)
        H += H2
        T[lo:d, :d] = H  # the lower triangle: all that eigh reads
        if d >= check_at or d + b > cap:
            theta, E = torch.linalg.eigh(T[:d, :d])
            theta, E = theta[-rank - 1 :].flip(0), E[:, -rank - 1 :].flip(1)  # one more: the gap below the r-th
            bound = _residual_bound(Y, theta, E[lo:d])
            if bound <= tol and _wider_cluster(theta, b):
                return None  # the Krylov space holds only b directions of a repeated value: not certifiable
            theta, E = theta[:rank], E[:, :rank]
            if bound <= tol:
                break
            if d + b > cap:
                return None
            check_at = _next_check(d, bound, previous, tol, b, 4.0 * m * n * b)
            previous = (d, bound)
        Vb[d : d + b] = _next_block(Y, basis, gen, size)
    S = theta.clamp_min(0).sqrt()
    V = (E.mT @ Vb[:d]).mT
    U = (E.mT @ Wb[:d]).mT / S.clamp_min(torch.finfo(A.dtype).tiny)  # row form: the fast GEMM kernel
    if transpose:
        U, V = V, U
    return U, S, V, bound


# The Gram solver squares the condition number: sigma_i comes out with a relative error of
# about eps * (sigma_1 / sigma_i)^2. Past this bound (fp32: sigma_1/sigma_r > ~90), a tenth of
# the 1 % accuracy goal, the exact SVD is taken instead (an fp64 Gram matrix cost more than it).
GRAM_MAX_RELATIVE_ERROR = 1e-3


def _scipy_linalg():
    try:
        import scipy.linalg as sla  # also loads scipy.linalg.blas (syrk)
    except ImportError:
        return None
    return sla


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController  # scikit-learn's dependency, beside scipy
    except ImportError:
        return None
    _scipy_linalg()  # the controller sees only the libraries loaded when it is made: scipy's OpenBLAS first
    return ThreadpoolController()


# scipy's OpenBLAS and torch's OpenMP each keep a pool of threads that spin for a while after a
# call. The Gram solver alternates between the two, so with both multi-threaded each pool spins on the
# cores the other needs. Measured on 2 cores, torch at 2 threads, syrk + top-n/8 syevr + one torch GEMM
# per matrix: OpenBLAS at 2 threads against 1 took 29 against 23 ms at n = 576 (a whole rank-64 pass
# over SmolLM2: 5.9 against 4.0 s), and 79 against 101 ms at n = 1024, 417 against 622 ms at n = 2048.
# Below this order one thread wins: the calls are too short to repay the contention. Moving A V into OpenBLAS too
# (session 6) did not help: torch's small ops between matrices (sign fixing) bring the contention back. A rank-64
# pass at 2 threads took 5.7 s with OpenBLAS on 2 threads at n = 576 against 3.6 s on one; with no torch call at
# all (syrk, syevr and gemm alone) it would take 2.9 s.
SCIPY_THREADS_MIN_ORDER = 1024


def scipy_blas_threads(n: int) -> int:
    """Threads for scipy's BLAS/LAPACK on an order-``n`` Gram problem (see SCIPY_THREADS_MIN_ORDER)."""
    return torch.get_num_threads() if n >= SCIPY_THREADS_MIN_ORDER else 1


# > 0 while a pool of solver threads holds scipy's OpenBLAS at one thread (blas_single_threaded).
_blas_pinned = 0


@contextlib.contextmanager
def blas_single_threaded() -> Iterator[None]:
    """scipy's OpenBLAS at one thread while solver threads run in a pool (entered by the thread that starts the
    pool). Meanwhile _scipy_threads leaves the setting alone: a limit set and restored inside one worker would
    change it under another worker's running call."""
    global _blas_pinned
    controller = _blas_controller()
    with controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext():
        _blas_pinned += 1
        try:
            yield
        finally:
            _blas_pinned -= 1


@contextlib.contextmanager
def _scipy_threads(n: int) -> Iterator[None]:
    """Hold scipy's OpenBLAS at ``scipy_blas_threads(n)``: left alone, it sizes its pool to the machine,
    whatever torch.set_num_threads says."""
    controller = _blas_controller()
    if controller is None or _blas_pinned:
        yield
        return
    with controller.limit(limits=scipy_blas_threads(n), user_api="blas"):
        yield


def gram_solves_release_gil(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the Gram solver's syrk and eigensolve run without the GIL on a CPU (scipy's C exports through
    ctypes), so that solves in parallel threads overlap."""
    return dtype in (torch.float32, torch.float64) and _lapack.available(np.float32 if dtype == torch.float32 else np.float64)


def _gram(A: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(A^T A, the triangle that holds it: "lower", "upper" or "full") for a tall A. On a CPU, BLAS syrk: half
    the flops of a GEMM, one triangle filled (the eigensolver is told which); without the GIL when it can."""
    if A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64):
        with _scipy_threads(A.shape[1]):
            G = _lapack.gram_lower(A.detach().contiguous().numpy())
            if G is not None:
                return torch.from_numpy(G), "lower"
            sla = _scipy_linalg()
            if sla is not None:
                syrk = sla.blas.ssyrk if A.dtype == torch.float32 else sla.blas.dsyrk
                # A (m x n, C order) is A^T in Fortran order: trans=0 gives (A^T)(A^T)^T = A^T A, no copy.
                return torch.from_numpy(syrk(1.0, A.contiguous().numpy().T, trans=0)), "upper"
    return A.mT @ A, "full"


def _top_eigh(G: torch.Tensor, rank: int, triangle: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenpairs of a symmetric matrix, descending; only ``triangle`` ("lower", "upper"
    or "full") of ``G`` is read, and ``G`` may be overwritten.

    LAPACK's MRRR driver (syevr, through scipy, which lm-eval's scikit-learn dependency
    brings) computes only the wanted eigenvectors: after the O(n^3) tridiagonal reduction
    the rest costs O(n r) instead of O(n^2) per vector. It is called without the GIL where scipy
    exports it to C, else through scipy's wrapper. Without scipy, or off the CPU, torch's full eigh.
    """
    n = G.shape[0]
    if G.device.type == "cpu" and G.dtype in (torch.float32, torch.float64):
        with _scipy_threads(n):
            found = _lapack.top_eigh(G.numpy(), rank, triangle)
            if found is not None:
                w, Z = found
                return torch.from_numpy(w[::-1].copy()), torch.from_numpy(Z[::-1].copy()).mT
            sla = _scipy_linalg()
            if sla is not None:
                e, V = sla.eigh(G.numpy(), lower=triangle != "upper", subset_by_index=(n - rank, n - 1), driver="evr", overwrite_a=True, check_finite=False)
                return torch.from_numpy(e[::-1].copy()).to(G.dtype), torch.from_numpy(V[:, ::-1].copy()).to(G.dtype)
    e, V = torch.linalg.eigh(G, UPLO="U" if triangle == "upper" else "L")  # reads that triangle alone
    return e[-rank:].flip(0), V[:, -rank:].flip(1)


def _gram_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top-r singular triplets from the eigenpairs of the short side's Gram matrix A^T A, or None
    when the squared condition number would cost accuracy (see GRAM_MAX_RELATIVE_ERROR).

    One full-rate syrk (m n^2) and a partial symmetric eigensolve (n^3) replace LAPACK's SVD
    (gesdd), which spends most of its time in memory-bound bidiagonalisation: 2-9x faster
    on SmolLM2's matrices up to r = n/2, with a cost that grows only slowly with r.
    """
    m, n = A.shape
    transpose = m < n
    if transpose:  # the Gram matrix of the short side
        A = A.mT
        m, n = n, m
    dtype = A.dtype
    G, triangle = _gram(A)
    evals, V = _top_eigh(G, rank, triangle)
    S = evals.clamp_min(0).sqrt()
    # Every returned value counts, the r-th included: one at round-off of the squared problem (an exactly
    # low-rank matrix, or a value past sigma_1 / 90) is not known to be 0 or small, so the exact SVD decides.
    # Zeroing such values instead made a 2048 x 2048 rank-614 approximation 4x worse than the optimum.
    if not float(S[-1]) > 0 or torch.finfo(dtype).eps * float(S[0] / S[-1]) ** 2 > GRAM_MAX_RELATIVE_ERROR:
        return None  # squaring would cost accuracy: the caller takes the exact SVD
    U = (V.mT @ A.mT).mT / S  # row form: the fast GEMM kernel
    if transpose:
        U, V = V, U
    return U, S, V


def _orthonormal_complement(Q: torch.Tensor, k: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """k orthonormal columns orthogonal to the orthonormal columns of Q (seeded, so deterministic)."""
    gen = gen if gen is not None else torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(Q.shape[0], k, generator=gen, dtype=Q.dtype).to(Q.device)
    for _ in range(2):
        X = X - Q @ (Q.mT @ X)
    return torch.linalg.qr(X)[0]


def _next_block(Y: torch.Tensor, basis: torch.Tensor, gen: torch.Generator, size: float) -> torch.Tensor:
    """Orthonormal rows spanning Y (b x n, orthogonalised against ``basis`` twice; ``size`` its norm before that).

    After two passes Y's components along the basis are round-off of ``size``. A direction of Y not far above
    that (the Krylov space nearly exhausted: a low-rank matrix) comes out of the QR far from orthogonal to the
    basis (0.1-0.7 measured), which broke the Ritz values' bounds: such a block is orthogonalised once more. A
    direction at round-off itself carries nothing: it is replaced by a fresh random one orthogonal to the rest.
    """
    Q, R = torch.linalg.qr(Y.mT)
    diag = R.diagonal().abs()
    eps = torch.finfo(Y.dtype).eps
    if float(diag.min()) > math.sqrt(eps) * size:  # the common case, in one host read
        return Q.mT
    Q = Q - basis.mT @ (basis @ Q)
    Q = torch.linalg.qr(Q)[0]
    dead = diag <= 64 * eps * size
    if bool(dead.any()):
        Q[:, dead] = _orthonormal_complement(torch.cat([basis.mT, Q[:, ~dead]], dim=1), int(dead.sum()), gen)
    return Q.mT


# b consecutive top Ritz values this close (relative to the largest) may be a value repeated more than b times,
# of which a block of b start vectors sees only b directions: the rest converge to the next value, certified.
CLUSTER_RTOL = 1e-4


def _wider_cluster(theta: torch.Tensor, b: int) -> bool:
    """Whether ``b`` consecutive values of ``theta`` (descending) lie within CLUSTER_RTOL of theta_1."""
    if len(theta) <= b:
        return False
    spread = theta[: len(theta) - b + 1] - theta[b - 1 :]
    return bool((spread <= CLUSTER_RTOL * theta[0].clamp_min(0)).any())


def tucker2(W: torch.Tensor, rank: int, solver: str = "auto", seed: int = 0, dtype: torch.dtype = torch.float32, tol: float | None = None) -> Factors:
    """Tucker-2 of a weight (out x in): U1 (out x r), core (r x r) = diag(s), U2 (in x r)."""
    res = truncated_svd(W, rank, solver=solver, seed=seed, dtype=dtype, tol=tol)
    info: dict[str, object] = {"solver": res.solver}
    if res.error_bound is not None:
        info["sv_error_bound"] = res.error_bound
    return Factors(left=res.U, core=torch.diag(res.S), right=res.V, info=info)


@register_method("tucker")
def tucker_method(
    weight: torch.Tensor, rank: int, stats: LayerStats | None = None, solver: str = "auto", seed: int = 0, solver_tol: float | None = None, **_: object
) -> Factors:
    """The data-free method: Tucker-2 of the weight itself (statistics are ignored)."""
    return tucker2(weight, rank, solver=solver, seed=seed, tol=solver_tol)


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
    if max_iters < 1:
        raise ValueError(f"max_iters={max_iters} is invalid: expected an int >= 1")
    for mode, r in enumerate(ranks):
        if not 1 <= r <= X.shape[mode]:
            raise ValueError(f"rank {r} for mode {mode} out of range 1..{X.shape[mode]}")
        others = math.prod(ranks[:mode]) * math.prod(ranks[mode + 1 :])
        if r > others:  # the mode-r unfolding of the projected tensor has only that many columns
            raise ValueError(f"rank {r} for mode {mode} exceeds the product of the other ranks ({others}): valid 1..{min(X.shape[mode], others)}")
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
