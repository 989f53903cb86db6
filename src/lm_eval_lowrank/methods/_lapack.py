"""BLAS syrk and LAPACK syevr called without the GIL.

scipy's Python wrappers of BLAS and LAPACK hold the GIL for the whole call, so two solver threads calling
them run one after the other (measured: 16 syevr calls on 576x576 took 0.213 s in sequence and 0.222 s in two
threads). scipy also exports the same routines to C as function pointers (``scipy.linalg.cython_blas`` and
``cython_lapack``); called through ctypes, which releases the GIL around a foreign call, they run in parallel.
Both take Fortran-order arrays: a C-order n x n buffer is read as its transpose, which for the symmetric
matrices here swaps only which triangle is "upper".

Everything returns None when scipy (or one of its capsules) is missing, and the caller falls back.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np


def _capsule_function(module_name: str, name: str, n_args: int):
    """The C function ``name`` exported by a scipy Cython module, as a ctypes function of pointer arguments."""
    try:
        import importlib

        capsule = importlib.import_module(module_name).__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):
        return None
    # Prototypes of our own: setting restype/argtypes on ctypes.pythonapi's shared functions would change them for
    # every other user in the process.
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", ctypes.pythonapi))
    address = get_pointer(capsule, get_name(capsule))
    # CFUNCTYPE, not PYFUNCTYPE: ctypes releases the GIL for the call.
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * n_args))(address) if address else None


@functools.lru_cache(maxsize=None)
def _routine(prefix: str, name: str):
    module = "scipy.linalg.cython_lapack" if name == "syevr" else "scipy.linalg.cython_blas"
    return _capsule_function(module, prefix + name, {"syrk": 10, "syevr": 21}[name])


_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}
_SCALAR = {"s": ctypes.c_float, "d": ctypes.c_double}


def available(dtype: np.dtype | type = np.float32) -> bool:
    """Whether the GIL-free syrk and syevr exist for ``dtype`` (float32 or float64)."""
    prefix = _PREFIX.get(np.dtype(dtype))
    return prefix is not None and _routine(prefix, "syrk") is not None and _routine(prefix, "syevr") is not None


def _int(v: int) -> ctypes.c_int:
    return ctypes.c_int(v)


_ref = ctypes.byref  # a pointer argument that keeps its object alive for the call


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def gram_lower(A: np.ndarray) -> np.ndarray | None:
    """A^T A for an m x n ``A``, as a C-order n x n array with only its lower triangle set (the other is left
    unset). One syrk: half the flops of a GEMM."""
    prefix = _PREFIX.get(A.dtype)
    syrk = _routine(prefix, "syrk") if prefix else None
    if syrk is None:
        return None
    A = np.ascontiguousarray(A)
    m, n = A.shape
    C = np.empty((n, n), dtype=A.dtype)
    scalar = _SCALAR[prefix]
    # Fortran sees A as A^T (n x m, lda n), so trans 'N' gives A^T A; its Fortran upper triangle is the C-order lower.
    uplo, trans = ctypes.c_char(b"U"), ctypes.c_char(b"N")
    n_, k_, lda, ldc = _int(n), _int(m), _int(n), _int(n)
    alpha, beta = scalar(1.0), scalar(0.0)
    syrk(_ref(uplo), _ref(trans), _ref(n_), _ref(k_), _ref(alpha), _ptr(A), _ref(lda), _ref(beta), _ptr(C), _ref(ldc))
    return C


def top_eigh(G: np.ndarray, rank: int, triangle: str = "lower") -> tuple[np.ndarray, np.ndarray] | None:
    """The ``rank`` largest eigenpairs of a symmetric n x n ``G``, ascending: (w, Z) with Z (rank x n) holding one
    eigenvector a row. Only ``triangle`` ("lower", "upper"; as indexed) of ``G`` is read, and ``G`` is overwritten
    when it is C-contiguous (else a copy is). MRRR (syevr) computes just the wanted vectors."""
    prefix = _PREFIX.get(G.dtype)
    syevr = _routine(prefix, "syevr") if prefix else None
    if syevr is None:
        return None
    G = np.ascontiguousarray(G)
    n = G.shape[0]
    scalar = _SCALAR[prefix]
    w = np.empty(n, dtype=G.dtype)
    Z = np.empty((rank, n), dtype=G.dtype)  # Fortran n x rank, ldz n
    isuppz = np.empty(2 * max(rank, 1), dtype=np.int32)
    found, info = ctypes.c_int(0), ctypes.c_int(0)
    # The C-order lower triangle is the Fortran-order upper one.
    jobz, select, uplo = ctypes.c_char(b"V"), ctypes.c_char(b"I"), ctypes.c_char(b"L" if triangle == "upper" else b"U")
    n_, lda, il, iu, ldz = _int(n), _int(n), _int(n - rank + 1), _int(n), _int(n)
    vl, vu, abstol = scalar(0.0), scalar(0.0), scalar(0.0)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        syevr(
            _ref(jobz), _ref(select), _ref(uplo), _ref(n_), _ptr(G), _ref(lda), _ref(vl), _ref(vu), _ref(il), _ref(iu),
            _ref(abstol), _ref(found), _ptr(w), _ptr(Z), _ref(ldz), _ptr(isuppz),
            _ptr(work), _ref(_int(lwork)), _ptr(iwork), _ref(_int(liwork)), _ref(info),
        )  # fmt: skip

    work, iwork = np.empty(1, dtype=G.dtype), np.empty(1, dtype=np.int32)
    call(work, -1, iwork, -1)  # workspace query
    lwork, liwork = max(int(work[0]), 26 * n), max(int(iwork[0]), 10 * n)
    work, iwork = np.empty(lwork, dtype=G.dtype), np.empty(liwork, dtype=np.int32)
    call(work, lwork, iwork, liwork)
    if info.value != 0 or found.value != rank:
        raise RuntimeError(f"LAPACK {prefix}syevr failed (info {info.value}, {found.value} of {rank} eigenpairs)")
    return w[:rank], Z
