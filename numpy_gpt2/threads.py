"""How many threads the matrix products use.

Two pools share the cores: NumPy's BLAS, for the products of many rows, and Numba's, for the
decoding steps of a few rows (see `kernels.py`); each starts one thread per core.
`set_threads(n)` caps both at run time: Numba's through `numba.set_num_threads`, the BLAS by
calling the library's own setter, found among the libraries this process has loaded (OpenBLAS,
as NumPy's wheels ship it, under any of its symbol prefixes; or MKL).
"""

import ctypes
import functools
import os

import numba

from .errors import GPT2Error

_SETTERS = (
    "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_", "openblas_set_num_threads", "MKL_Set_Num_Threads",
)
_GETTERS = (
    "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_", "openblas_get_num_threads", "MKL_Get_Max_Threads",
)


@functools.lru_cache(maxsize=1)
def _blas_library():
    """(setter, getter) of the BLAS NumPy loaded, or (None, None) if none is recognised."""
    import numpy  # noqa: F401  -- make sure NumPy's BLAS is loaded before we look for it

    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if ".so" in line and ("blas" in line.lower() or "mkl_rt" in line)})
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SETTERS if hasattr(lib, s)), None)
        getter = next((getattr(lib, s) for s in _GETTERS if hasattr(lib, s)), None)
        if setter is not None:
            return setter, getter
    return None, None


def set_threads(n: int) -> None:
    """Use `n` threads for the matrix products (BLAS and Numba) from now on in this process.

    Raises GPT2Error for n < 1. Where the BLAS cannot be found (not Linux, an unknown BLAS) it
    sets OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS for child processes only.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GPT2Error(f"threads must be a positive integer, found {n!r}")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(n)
    # Numba's pool has one thread per core (NUMBA_NUM_THREADS) and cannot grow past it.
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    setter, _ = _blas_library()
    if setter is not None:
        setter(ctypes.c_int(n))


def get_threads() -> int | None:
    """The BLAS thread count in force, or None when the BLAS is not one we recognise."""
    _, getter = _blas_library()
    return int(getter()) if getter is not None else None
