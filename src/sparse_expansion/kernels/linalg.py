"""LAPACK routines that torch does not expose, from the LAPACK that scipy ships.

They are called through scipy's table of Cython LAPACK functions (`scipy.linalg.cython_lapack`, the library
behind `scipy.linalg.lapack`) with ctypes, which lets go of the GIL for the call: several Python threads then
invert at once (`runtime.one_thread_each`). `scipy.linalg.lapack`'s own wrappers hold the GIL: eight 1,536 x 1,536
factors inverted on two threads took 175 ms through them and 77 ms through ctypes (docs/bench_fast_arithmetic.json,
issue 18).
"""

from __future__ import annotations

import ctypes
import functools

import torch

_INT = ctypes.POINTER(ctypes.c_int)


@functools.cache
def _trtri(dtype: torch.dtype):
    """scipy's ?trtri(uplo, diag, n, a, lda, info) as a ctypes function, or None where scipy lacks the table."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["strtri" if dtype == torch.float32 else "dtrtri"]
    except (ImportError, AttributeError, KeyError):
        return None
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, _INT, ctypes.c_void_p, _INT, _INT)
    return signature(pointer)


def invert_lower_triangular_(lower: torch.Tensor) -> bool:
    """Replace a lower-triangular CPU float32/float64 matrix, stored row- or column-major, by its inverse in place
    (LAPACK's trtri: a third of the work of a triangular solve against the identity). False, leaving it as it
    was, where it cannot (another dtype, device or layout, no LAPACK table, or a zero on the diagonal)."""
    if lower.device.type != "cpu" or lower.dtype not in (torch.float32, torch.float64) or lower.dim() != 2:
        return False
    routine = _trtri(lower.dtype)
    if routine is None:
        return False
    if lower.t().is_contiguous():
        uplo = b"L"  # column-major: LAPACK sees L itself
    elif lower.is_contiguous():
        uplo = b"U"  # row-major: LAPACK sees L^T, upper; the inverse of L^T is (L^-1)^T, read back as L^-1
    else:
        return False
    n = ctypes.c_int(lower.shape[0])
    info = ctypes.c_int(0)
    routine(uplo, b"N", ctypes.byref(n), ctypes.c_void_p(lower.data_ptr()), ctypes.byref(n), ctypes.byref(info))
    # info > 0: a zero pivot, found before anything is written (LAPACK checks the diagonal first).
    return info.value == 0

