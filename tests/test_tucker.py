"""Tucker decomposition: Eckart-Young exactness, HOOI on 3-D tensors, solver agreement, determinism."""

from __future__ import annotations

import pytest
import torch

from lm_eval_lowrank.methods import get_method
from lm_eval_lowrank.methods.tucker import choose_solver, hooi, truncated_svd, tucker2, tucker_reconstruct


def _rand(m, n, seed=0, decay=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    if decay is not None:  # a spectrum with a known decay, as trained weights tend to have
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        S = torch.tensor([decay**i for i in range(len(S))])
        W = U @ torch.diag(S) @ Vh
    return W


@pytest.mark.parametrize("shape,rank", [((40, 30), 1), ((40, 30), 7), ((30, 40), 12), ((64, 64), 64)])
def test_frobenius_error_equals_discarded_singular_values(shape, rank):
    W = _rand(*shape, seed=1).double()
    f = tucker2(W, rank, solver="exact", dtype=torch.float64)
    err = torch.linalg.norm(W - f.dense().double())
    S = torch.linalg.svdvals(W)
    expected = S[rank:].pow(2).sum().sqrt()
    assert torch.allclose(err, expected, rtol=1e-5, atol=1e-5)


def test_core_is_diagonal_of_top_singular_values():
    W = _rand(50, 20, seed=2)
    f = tucker2(W, 5, solver="exact")
    S = torch.linalg.svdvals(W)[:5]
    assert torch.allclose(torch.diagonal(f.core), S, rtol=1e-5)
    assert torch.count_nonzero(f.core - torch.diag(torch.diagonal(f.core))) == 0
    # orthonormal factors: U1 is out x r, U2 is in x r
    assert f.left.shape == (50, 5) and f.right.shape == (20, 5)
    assert torch.allclose(f.left.T @ f.left, torch.eye(5), atol=1e-5)
    assert torch.allclose(f.right.T @ f.right, torch.eye(5), atol=1e-5)


@pytest.mark.parametrize("shape", [(256, 96), (96, 256)])
def test_randomized_matches_exact_top_singular_values(shape):
    W = _rand(*shape, seed=3, decay=0.9)
    exact = truncated_svd(W, 8, solver="exact")
    approx = truncated_svd(W, 8, solver="randomized", seed=0)
    assert approx.solver == "randomized"
    assert torch.allclose(approx.S, exact.S, rtol=1e-3)
    # same subspace: the projections agree
    assert torch.allclose(approx.U @ approx.U.T, exact.U @ exact.U.T, atol=1e-3)


@pytest.mark.parametrize("solver", ["randomized", "krylov", "gram"])
def test_seeded_solvers_are_deterministic(solver):
    W = _rand(200, 120, seed=4)
    a = truncated_svd(W, 6, solver=solver, seed=7)
    b = truncated_svd(W, 6, solver=solver, seed=7)
    assert a.solver == solver
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)


def test_auto_solver_picks_by_rank_and_device():
    W = _rand(400, 300, seed=5)
    assert truncated_svd(W, 2).solver == "krylov"  # CPU
    assert truncated_svd(W, 140).solver == "gram"
    assert truncated_svd(W, 200).solver == "exact"
    assert truncated_svd(W[:, :100], 2).solver == "krylov"
    assert truncated_svd(W[:, :100], 4).solver == "gram"  # 400x100: the Gram matrix is tiny next to A
    assert choose_solver((400, 300), 2, device="cuda") == "randomized"
    assert choose_solver((400, 300), 200, device="cuda") == "exact"


@pytest.mark.parametrize("shape,rank", [((256, 96), 8), ((96, 256), 8), ((300, 200), 1), ((300, 200), 24)])
def test_krylov_matches_exact(shape, rank):
    W = _rand(*shape, seed=3, decay=0.95)
    exact = truncated_svd(W, rank, solver="exact")
    approx = truncated_svd(W, rank, solver="krylov", seed=0)
    assert approx.solver == "krylov"
    assert torch.allclose(approx.S, exact.S, rtol=1e-3)
    # The certificate is on the values: the vectors of an early, gap-certified stop are a little off (3.1e-3 on
    # 96x256 at rank 8, against 1.2e-4 with the residual bound alone), but the approximation is within 1e-4 of
    # the best (Eckart-Young), which is what a decomposition needs.
    assert torch.allclose(approx.U @ approx.U.T, exact.U @ exact.U.T, atol=1e-2)
    best = float((W - exact.U @ torch.diag(exact.S) @ exact.V.T).norm())
    assert float((W - approx.U @ torch.diag(approx.S) @ approx.V.T).norm()) <= (1 + 1e-4) * best
    assert torch.allclose(approx.V.T @ approx.V, torch.eye(rank), atol=1e-4)
    # Rayleigh-Ritz: U diag(S) V^T is W projected on the subspace the Krylov space found, on its short side (the
    # other side's vectors are W's image of it; the two projections agree only once the vectors are exact).
    proj = approx.U @ approx.U.T @ W if W.shape[0] < W.shape[1] else W @ approx.V @ approx.V.T
    assert torch.allclose(approx.U @ torch.diag(approx.S) @ approx.V.T, proj, atol=1e-5)


def test_krylov_on_an_exactly_low_rank_matrix_stops_on_the_invariant_subspace():
    g = torch.Generator().manual_seed(10)
    W = torch.randn(300, 5, generator=g) @ torch.randn(5, 120, generator=g)
    res = truncated_svd(W, 5, solver="krylov")
    assert res.solver == "krylov"
    assert torch.allclose(res.S, torch.linalg.svdvals(W)[:5], rtol=1e-4)
    assert torch.allclose(res.U @ torch.diag(res.S) @ res.V.T, W, atol=1e-3 * float(W.abs().max()))
    # more than the rank: the exhausted Krylov space is refilled with fresh directions
    more = truncated_svd(W, 8, solver="krylov")
    assert torch.allclose(more.S[:5], res.S, rtol=1e-4) and float(more.S[5:].max()) < 1e-3 * float(res.S[0])
    assert torch.allclose(more.V.T @ more.V, torch.eye(8), atol=1e-4)


def test_krylov_without_convergence_falls_back_to_gram():
    from lm_eval_lowrank.methods import tucker as tk

    W = _rand(200, 120, seed=11)  # flat spectrum: an absurd tolerance cannot be met within the cap
    assert tk._block_krylov_svd(W, 4, 0, tol=0.0) is None
    res = truncated_svd(W, 4, solver="krylov", tol=0.0)
    assert res.solver == "gram" and torch.allclose(res.S, torch.linalg.svdvals(W)[:4], rtol=1e-4)


@pytest.mark.parametrize("shape,rank", [((256, 96), 8), ((96, 256), 8), ((300, 200), 1), ((300, 200), 100), ((64, 64), 64)])
def test_gram_matches_exact(shape, rank):
    W = _rand(*shape, seed=3, decay=0.97)
    exact = truncated_svd(W, rank, solver="exact")
    res = truncated_svd(W, rank, solver="gram")
    assert res.solver == "gram"
    assert torch.allclose(res.S, exact.S, rtol=1e-4)
    assert torch.allclose(res.V.T @ res.V, torch.eye(rank), atol=1e-4)
    assert torch.allclose(res.U.T @ res.U, torch.eye(rank), atol=1e-3)
    # the same best approximation (Eckart-Young), not merely the same values
    best = exact.U @ torch.diag(exact.S) @ exact.V.T
    assert torch.allclose(res.U @ torch.diag(res.S) @ res.V.T, best, atol=1e-4)


def test_gram_gives_way_to_exact_when_squaring_would_cost_accuracy():
    W = _rand(120, 80, seed=12, decay=0.8)  # sigma_1 / sigma_25 ~ 2e2: (ratio^2) eps32 > 1e-3
    res = truncated_svd(W, 25, solver="gram")
    assert res.solver == "exact"
    exact = torch.linalg.svdvals(W.double())[:25]
    assert float(((res.S.double() - exact).abs() / exact).max()) < 1e-5
    assert truncated_svd(W, 4, solver="gram").solver == "gram"  # well conditioned within the top 4


@pytest.mark.parametrize("shape", [(120, 40), (40, 120)])
def test_gram_on_a_rank_deficient_matrix_gives_way_to_exact_with_orthonormal_factors(shape):
    """Values at round-off of the squared problem are not known to be 0 (they were zeroed, which made a full-rank
    2048 x 2048 matrix's rank-614 approximation 4x worse than the optimum): the exact SVD decides."""
    g = torch.Generator().manual_seed(14)
    W = torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g)
    res = truncated_svd(W, 10, solver="gram")
    assert res.solver == "exact"
    assert all(bool(torch.isfinite(t).all()) for t in (res.U, res.S, res.V))
    assert float(res.S[4:].abs().max()) <= 1e-5 * float(res.S[0]) and torch.allclose(res.S[:4], torch.linalg.svdvals(W)[:4], rtol=1e-4)
    assert torch.allclose(res.U.T @ res.U, torch.eye(10), atol=1e-4) and torch.allclose(res.V.T @ res.V, torch.eye(10), atol=1e-4)
    assert torch.allclose(res.U @ torch.diag(res.S) @ res.V.T, W, atol=1e-4 * float(W.abs().max()))


def test_gram_without_scipy_uses_torch_eigh(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_scipy(name, *a, **k):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    W = _rand(90, 60, seed=13, decay=0.95)
    with_scipy = truncated_svd(W, 6, solver="gram")
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    without = truncated_svd(W, 6, solver="gram")
    assert torch.allclose(with_scipy.S, without.S, rtol=1e-5)
    assert torch.allclose(with_scipy.U @ with_scipy.V.T, without.U @ without.V.T, atol=1e-4)


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        truncated_svd(torch.randn(4, 3), 4)


def test_hooi_on_a_3d_tensor_with_known_tucker_structure():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    factors = [torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0] for n, r in ((10, 3), (12, 4), (8, 2))]
    T = tucker_reconstruct(core, factors)
    res = hooi(T, (3, 4, 2))
    assert res.converged
    assert res.rel_error < 1e-10
    assert torch.allclose(tucker_reconstruct(res.core, res.factors), T, atol=1e-10)


def test_hooi_improves_on_truncation_of_a_noisy_tensor():
    g = torch.Generator().manual_seed(1)
    T = torch.randn(9, 8, 7, generator=g, dtype=torch.float64)
    res = hooi(T, (3, 3, 3), max_iters=100, tol=1e-12)
    approx = tucker_reconstruct(res.core, res.factors)
    err = float(torch.linalg.norm(T - approx) / torch.linalg.norm(T))
    assert abs(err - res.rel_error) < 1e-9
    res1 = hooi(T, (3, 3, 3), max_iters=1)
    assert res.rel_error <= res1.rel_error + 1e-12


def test_hooi_on_a_matrix_is_the_truncated_svd():
    W = _rand(20, 15, seed=6).double()
    res = hooi(W, (4, 4))
    svd = tucker2(W, 4, solver="exact", dtype=torch.float64)
    assert torch.allclose(tucker_reconstruct(res.core, res.factors), svd.dense(), atol=1e-8)


def test_method_registry():
    assert get_method("tucker") is not None
    with pytest.raises(ValueError, match="valid methods"):
        get_method("nope")


@pytest.mark.parametrize("orth", ["householder", "cholqr2"])
def test_randomized_orthonormalisers_agree_with_exact(orth):
    # CholeskyQR2 is the GPU default; check its accuracy here on the CPU.
    W = _rand(300, 120, seed=8, decay=0.97)
    exact = truncated_svd(W, 8, solver="exact")
    approx = truncated_svd(W, 8, solver="randomized", orth=orth)
    assert torch.allclose(approx.S, exact.S, rtol=1e-3)
    assert torch.allclose(approx.U.T @ approx.U, torch.eye(8), atol=1e-4)


def test_cholesky_qr2_breakdown_falls_back_to_householder():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(300, 1, generator=g) @ torch.randn(1, 120, generator=g)  # rank 1: singular Gram matrices
    res = truncated_svd(W, 8, solver="randomized", orth="cholqr2")
    assert torch.isfinite(res.U).all() and torch.isfinite(res.S).all()
    assert torch.allclose(res.S[0], torch.linalg.svdvals(W)[0], rtol=1e-4)
    assert torch.allclose(res.U.T @ res.U, torch.eye(8), atol=1e-4)


@pytest.mark.parametrize("tol", [1e-1, 3e-2, 1e-2])
def test_krylov_stops_on_a_certified_singular_value_error(tol):
    # Flat spectra converge slowly, so a loose tolerance stops early: every value must still be within it.
    from lm_eval_lowrank.methods import tucker as tk

    for seed, shape in enumerate([(400, 160), (160, 400), (300, 300)]):
        W = _rand(*shape, seed=20 + seed)
        for rank in (1, 6):
            U, S, V, bound = tk._block_krylov_svd(W, rank, 0, tol=tol)
            exact = torch.linalg.svdvals(W.double())[:rank]
            assert float(((S.double() - exact).abs() / exact).max()) <= bound <= tol


def test_krylov_certificate_takes_the_gap_bound_where_the_next_value_stands_apart():
    """Each singular value's bound is the lesser of the residual's, ||r_i|| / (2 theta_i), and Kato-Temple's,
    ||r_i||^2 / (theta_i - theta_{i+1} - ||r_{i+1}||) / (2 theta_i); the second only where that gap is positive."""
    from lm_eval_lowrank.methods import tucker as tk

    Y, tail = 0.1 * torch.eye(2), torch.eye(2)  # residuals ||Y^T tail_i|| = 0.1 for both Ritz pairs
    apart = tk._residual_bound(Y, torch.tensor([10.0, 5.0]), tail)
    assert apart == pytest.approx(0.1**2 / (10 - 5 - 0.1) / 20, rel=1e-5)  # against 0.1 / 20 from the residual
    close = tk._residual_bound(Y, torch.tensor([10.0, 9.95]), tail)  # no gap past the residual
    assert close == pytest.approx(0.1 / 20, rel=1e-5)
    # A top value standing apart (sigma_2 = 0.8) above a flat tail: the solver stops a block earlier than on the
    # residual bound alone, and the value is still within each bound of the exact one.
    g = torch.Generator().manual_seed(3)
    U, V = torch.linalg.qr(torch.randn(300, 200, generator=g))[0], torch.linalg.qr(torch.randn(200, 200, generator=g))[0]
    W = (U * torch.cat([torch.ones(1), 0.8 * 0.995 ** torch.arange(199.0)])) @ V.T
    real_bound, real_next = tk._residual_bound, tk._next_block
    blocks: list[int] = []

    def count_blocks(*args):
        blocks[-1] += 1
        return real_next(*args)

    def residual_alone(Y, theta, tail):  # no gap below any value: the residual bound alone
        return real_bound(Y, torch.cat([theta[:-1], theta[-2:-1]]), tail)

    found = {}
    try:
        tk._next_block = count_blocks
        for label in ("gap", "residual"):
            tk._residual_bound = real_bound if label == "gap" else residual_alone
            blocks.append(0)
            _, S, _, bound = tk._block_krylov_svd(W, 1, 0)
            found[label] = (float(S[0]), bound, blocks[-1])
    finally:
        tk._residual_bound, tk._next_block = real_bound, real_next
    exact = float(torch.linalg.svdvals(W.double())[0])
    for s, bound, _ in found.values():
        assert abs(s - exact) / exact <= bound <= tk.KRYLOV_TOL
    assert found["gap"][2] < found["residual"][2]


def test_scipy_blas_threads_by_problem_size():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pytest.importorskip("scipy.linalg")
    from lm_eval_lowrank.methods import tucker as tk

    def openblas_threads() -> list[int]:
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas" and i["internal_api"] == "openblas"]

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # Small Gram problems: one thread beside torch's pool; large ones: torch's count, never the machine's.
        with tk._scipy_threads(tk.SCIPY_THREADS_MIN_ORDER - 1):
            assert openblas_threads() and all(t == 1 for t in openblas_threads())
        with tk._scipy_threads(tk.SCIPY_THREADS_MIN_ORDER):
            assert all(t == 2 for t in openblas_threads())
        torch.set_num_threads(1)
        with tk._scipy_threads(4096):
            assert all(t == 1 for t in openblas_threads())
    finally:
        torch.set_num_threads(before)


def test_krylov_check_schedule():
    from lm_eval_lowrank.methods import tucker as tk

    # Residual bound halving every 8 dimensions: from 0.04 at d=32 to 0.01 takes 16 more (two blocks of 8).
    assert tk._next_check(32, 0.04, (24, 0.08), 0.01, 8, step_cost=0.0) == 48
    assert tk._next_check(32, 0.04, None, 0.01, 8, step_cost=0.0) == 40  # no rate yet: the next block
    assert tk._next_check(32, 0.09, (24, 0.08), 0.01, 8, step_cost=0.0) == 40  # not decreasing: the next block
    assert tk._next_check(32, 0.04, (24, 0.08), 0.01, 8, step_cost=1e12) == 40  # checks cheap next to a block


def test_scipy_thread_limit_holds_in_a_fresh_process():
    # The controller knows only the libraries loaded when it is made: entering the limit first thing in a
    # process must still cover scipy's OpenBLAS, which the Gram solver then calls inside it.
    pytest.importorskip("threadpoolctl")
    pytest.importorskip("scipy.linalg")
    import subprocess
    import sys

    code = (
        "import torch, threadpoolctl\n"
        "from lm_eval_lowrank.methods import tucker as tk\n"
        "torch.set_num_threads(2)\n"
        "with tk._scipy_threads(100):\n"
        "    libs = [(i['filepath'], i['num_threads']) for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas']\n"
        "assert any('scipy.libs' in p for p, _ in libs), libs  # scipy's own OpenBLAS, not numpy's\n"
        "assert all(n == 1 for _, n in libs), libs\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gil_free_syrk_and_syevr_match_numpy(dtype):
    np = pytest.importorskip("numpy")
    pytest.importorskip("scipy.linalg")
    from lm_eval_lowrank.methods import _lapack

    assert _lapack.available(np.float32) and _lapack.available(np.float64) and not _lapack.available(np.float16)
    A = _rand(90, 40, seed=3).to(dtype).numpy()
    G = A.T @ A
    C = _lapack.gram_lower(A)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert np.allclose(np.tril(C), np.tril(G), rtol=tol, atol=tol * np.abs(G).max())
    exact_w, exact_V = np.linalg.eigh(G.astype(np.float64))
    for triangle, filled in (("lower", np.tril(G)), ("upper", np.triu(G)), ("lower", np.asfortranarray(np.tril(G)))):
        w, Z = _lapack.top_eigh(filled.copy(order="K"), 6, triangle)  # the other triangle is zero: it must go unread
        assert np.allclose(w, exact_w[-6:], rtol=10 * tol)
        overlap = np.abs(np.sum(Z * exact_V[:, -6:].T, axis=1))
        assert np.allclose(overlap, 1, atol=100 * tol)


def test_gram_eigensolve_releases_the_gil():
    # While one thread is inside the eigensolve, another must keep running Python; scipy's own wrapper blocks it for the whole call.
    pytest.importorskip("scipy.linalg")
    import threading
    import time

    from lm_eval_lowrank.methods import tucker as tk

    A = _rand(900, 900, seed=4)
    G0, triangle = tk._gram(A)
    assert triangle == "lower"
    start, done, spans = threading.Event(), threading.Event(), []

    def solve():
        start.set()
        t0 = time.perf_counter()
        tk._top_eigh(G0.clone(), 450, triangle)
        spans.append(time.perf_counter() - t0)
        done.set()

    worker = threading.Thread(target=solve)
    worker.start()
    start.wait()
    ticks = [time.perf_counter()]
    while not done.is_set():
        ticks.append(time.perf_counter())
    worker.join()
    longest_gap = max(b - a for a, b in zip(ticks, ticks[1:]))
    assert spans[0] > 0.02  # long enough to tell the two apart
    assert longest_gap < 0.5 * spans[0], (longest_gap, spans[0])


def test_gram_solver_falls_back_to_scipy_wrappers_then_torch(monkeypatch):
    from lm_eval_lowrank.methods import _lapack
    from lm_eval_lowrank.methods import tucker as tk

    W = _rand(120, 50, seed=5, decay=0.93)
    exact = torch.linalg.svdvals(W.double())[:10]
    answers = {}
    for case in ("gil-free", "scipy wrappers", "torch"):
        if case != "gil-free":
            monkeypatch.setattr(_lapack, "gram_lower", lambda A: None)
            monkeypatch.setattr(_lapack, "top_eigh", lambda G, r, t="lower": None)
        if case == "torch":
            monkeypatch.setattr(tk, "_scipy_linalg", lambda: None)
        G, triangle = tk._gram(W)
        assert triangle == {"gil-free": "lower", "scipy wrappers": "upper", "torch": "full"}[case]
        res = truncated_svd(W, 10, solver="gram")
        assert res.solver == "gram"
        assert torch.allclose(res.S.double(), exact, rtol=1e-4)
        answers[case] = res.U @ torch.diag(res.S) @ res.V.mT
    assert torch.allclose(answers["gil-free"], answers["scipy wrappers"], atol=1e-4)
    assert torch.allclose(answers["gil-free"], answers["torch"], atol=1e-4)
    # torch's eigh is told which triangle holds the matrix
    G = (W.mT @ W).double()
    e = torch.linalg.eigvalsh(G)[-3:].flip(0)
    for triangle, half in (("lower", G.tril()), ("upper", G.triu())):
        assert torch.allclose(tk._top_eigh(half.clone(), 3, triangle)[0], e)


def test_blas_held_at_one_thread_for_a_pool_and_left_alone_inside_it():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pytest.importorskip("scipy.linalg")
    from lm_eval_lowrank.methods import tucker as tk

    def openblas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas" and i["internal_api"] == "openblas"}

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with tk.blas_single_threaded():
            assert openblas_threads() == {1}
            with tk._scipy_threads(4096):  # would ask for 2 outside a pool
                assert openblas_threads() == {1}
            assert openblas_threads() == {1}  # and restores nothing under the other workers
        with tk._scipy_threads(4096):
            assert openblas_threads() == {2}
    finally:
        torch.set_num_threads(before)


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))[0]
    return ((U * s.double()) @ V.mT).float()


def test_gram_never_zeroes_a_small_but_real_singular_value():
    """From n = 1002 (fp32) Gram's round-off cut, sigma_1 sqrt(n eps), lay below its conditioning check's: values
    past it were zeroed instead of the exact SVD being taken (a rank-614 approximation of a 2048^2 matrix came out
    4x worse than the optimum)."""
    n = 1024
    W = _with_spectrum(n, n, 0.99 ** torch.arange(n, dtype=torch.float64), 0)
    res = truncated_svd(W, 480, solver="gram")  # sigma_480 / sigma_1 = 0.008: past both thresholds
    exact = torch.linalg.svdvals(W.double())[:480]
    assert res.solver == "exact" and float(((res.S.double() - exact).abs() / exact).max()) < 1e-3


def test_krylov_certifies_no_value_far_below_the_top_one_it_cannot_resolve():
    """Residuals under 64 eps theta_1 counted as converged whatever theta_i: with sigma = [100, 50, 1 .. 0.5] the
    values 1..0.5 came out 2 % off with a bound of 0 (whiten's outlier channels: 16-45 %)."""
    s = torch.cat([torch.tensor([100.0, 50.0]), torch.linspace(1.0, 0.5, 198)])
    W = _with_spectrum(300, 200, s, 1)
    res = truncated_svd(W, 4, solver="krylov")
    exact = torch.linalg.svdvals(W.double())[:4]
    err = float(((res.S.double() - exact).abs() / exact).max())
    assert err <= 1e-2 and (res.error_bound is None or err <= res.error_bound + 1e-6), (res.solver, err, res.error_bound)


@pytest.mark.parametrize("k", [5, 6])
def test_krylov_on_an_exhausted_space_keeps_its_basis_orthonormal(k):
    """An exactly rank-k matrix: near-round-off directions of a new block were kept without being orthogonal to the
    basis (0.1-0.7), and a Ritz value came out above sigma_1 (1.00037 for 1) with a bound 1000x too small."""
    s = torch.cat([torch.linspace(1, 0.5, k), torch.zeros(576 - k)])
    W = _with_spectrum(576, 576, s, 0)
    res = truncated_svd(W, 1, solver="krylov")
    err = abs(float(res.S[0]) - 1.0)
    assert float(res.S[0]) <= 1.0 + 1e-6 and err <= 1e-5 and (res.error_bound is None or err <= res.error_bound + 1e-6)


def test_krylov_does_not_certify_a_value_repeated_more_often_than_its_block_is_wide():
    """A block of b start vectors sees b directions of a repeated value: with 12 equal top values, blocks of 8 and
    r = 12, values 9..12 converged to the next value (0.9) and were certified. Now the solver hands over."""
    from lm_eval_lowrank.methods.tucker import krylov_block_size

    s = torch.cat([torch.ones(12), torch.linspace(0.9, 0.05, 564)])
    W = _with_spectrum(576, 576, s, 0)
    assert krylov_block_size(12) < 12
    res = truncated_svd(W, 12, solver="krylov")
    assert float((res.S - 1).abs().max()) <= 1e-4 and res.solver != "krylov"


def test_hooi_refuses_ranks_its_projections_cannot_hold_and_zero_iterations():
    from lm_eval_lowrank.methods.tucker import hooi

    T = torch.randn(5, 5, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"rank 5 for mode 0 exceeds the product of the other ranks \(4\): valid 1\.\.4"):
        hooi(T, (5, 2, 2))  # it failed deep inside on a 5 x 4 unfolding
    with pytest.raises(ValueError, match=r"max_iters=0 is invalid"):
        hooi(T, (2, 2, 2), max_iters=0)  # an UnboundLocalError
    assert hooi(T, (4, 2, 2)).core.shape == (4, 2, 2)
