"""Products with a weight matrix: `linear`, `linear_gelu` and the tied head `matmul_transposed`.

Every product here is x @ weight with weight [K, N] as the maths has it, but each takes the
matrix as the model stores it: weight_t [N, K], C-contiguous, one row per output (see
`common.transposed_contiguous`; the tied head wte is [V, C] in the file already).

The path depends on the number of rows M of x:
- up to FEW_ROWS rows (decoding) `decode.few_rows_matmul`: every weight is read once per token,
  and the product is a stream through memory;
- up to THIN_ROWS rows, the BLAS with the weight on the left, a band of its rows per thread:
  with it on the right the BLAS repacks the whole transposed operand on every call;
- beyond, the BLAS with a band of output columns per thread (`Band` says what each band does
  around its product: the bias put in the band first for the BLAS to add the product to, the
  GELU done band by band in the same thread, or the product added onto a residual).
The BLAS calls run in Numba's threads (`blas.gemm`): started from Python's threads each band
begins late (the GIL, and a sleeping thread to wake). Where the BLAS's ?gemm is not found,
np.matmul in `threads.run_in_parts` makes the products instead.
"""

import contextlib
import enum

import numba
import numpy as np

from ..threads import blas_single_threaded_parts, run_in_parts, start_numba_threads
from .blas import GEMM_ADDRESS, gemm
from .common import FEW_ROWS, JIT, THIN_ROWS, transposed_contiguous
from .decode import few_rows_matmul
from .elementwise import bias_gelu, bias_gelu_rows, bias_gelu_rows_float32


class Band(enum.IntEnum):
    """What each band of output columns does around its product p = rows @ weight_t.T."""

    PRODUCT = 0     # out = p
    PLUS_BIAS = 1   # out = bias + p: the bias put in the band first, the BLAS adding p (beta = 1)
    THEN_GELU = 2   # product = p, then out = gelu(p + bias), band by band
    ADDED_ONTO = 3  # out += bias + p: the bias added to the band first, the BLAS adding p onto it


@numba.njit(**dict(JIT, parallel=True))
def _bands_in_pool(address, rows, weight_t, out, bias, product, band, parts, float32, column0=0):
    """out: [M, N] from rows: [M, K] @ weight_t.T (weight_t: [N, K]) as `band` says, one band of
    output columns per part, each part one ?gemm call in one of Numba's threads. product: [M, N]
    for Band.THEN_GELU (else unused); bias: [N] (unused for Band.PRODUCT). All arrays
    C-contiguous; `float32` says which GELU loop (see `elementwise.bias_gelu`). For
    Band.PRODUCT out may be wider, [M, >= column0 + N]: the product goes to its columns
    column0:column0 + N, written in place (`product_into_columns`)."""
    M, K = rows.shape
    N = weight_t.shape[0]
    per_part = (N + parts - 1) // parts
    item = out.itemsize
    target = product if band == Band.THEN_GELU else out
    for part in numba.prange(parts):
        n0, n1 = part * per_part, min(N, (part + 1) * per_part)
        if n0 >= n1:
            continue
        beta = out.dtype.type(0)
        if band == Band.PLUS_BIAS:
            for m in range(M):
                out[m, n0:n1] = bias[n0:n1]
            beta = out.dtype.type(1)
        elif band == Band.ADDED_ONTO:
            for m in range(M):
                out[m, n0:n1] += bias[n0:n1]
            beta = out.dtype.type(1)
        gemm(address, True, M, n1 - n0, K, rows.ctypes.data, K, weight_t.ctypes.data + n0 * K * item, K,
             beta, target.ctypes.data + (column0 + n0) * item, target.shape[1])
        if band == Band.THEN_GELU:
            if float32:
                bias_gelu_rows_float32(product, bias, out, n0, n1)
            else:
                bias_gelu_rows(product, bias, out, n0, n1)


@numba.njit(**dict(JIT, parallel=True))
def _weight_bands_in_pool(address, rows, weight_t, out_t, parts):
    """out_t: [N, M] = weight_t: [N, K] @ rows.T (rows: [M, K]), a band of the weight's rows
    per part (the weight on the left, for thin products)."""
    M, K = rows.shape
    N = weight_t.shape[0]
    per_part = (N + parts - 1) // parts
    item = out_t.itemsize
    for part in numba.prange(parts):
        n0, n1 = part * per_part, min(N, (part + 1) * per_part)
        if n0 < n1:
            gemm(address, True, n1 - n0, M, K, weight_t.ctypes.data + n0 * K * item, K, rows.ctypes.data, K,
                 out_t.dtype.type(0), out_t.ctypes.data + n0 * M * item, M)


_recorded = None  # a list while `recorded_products` is active


def _begin(M: int, weight_t) -> None:
    """What every product does first: Numba's threads started, the product recorded (see
    `recorded_products`)."""
    start_numba_threads()
    if _recorded is not None:
        _recorded.append((M, weight_t))


def _gemm_address(rows, weight_t, out):
    """The address of the BLAS's ?gemm for out's dtype when the three arrays suit it (that
    dtype, C-contiguous), else None: the callers' other paths."""
    address = GEMM_ADDRESS.get(out.dtype.type)
    if address is None or not rows.dtype == weight_t.dtype == out.dtype:
        return None
    return address if all(a.flags.c_contiguous for a in (rows, weight_t, out)) else None


def _product(rows, weight_t, out, band, bias, product=None):
    """out: [M, N] from rows: [M, K] @ weight_t.T as `band` says (see `Band`), by the path for M
    rows (see the module's docstring); product: [M, N] scratch for Band.THEN_GELU."""
    M, N = len(rows), weight_t.shape[0]
    _begin(M, weight_t)
    dtype = out.dtype.type
    address = _gemm_address(rows, weight_t, out)
    blas = address is not None
    if blas and M > THIN_ROWS:
        with blas_single_threaded_parts() as parts:
            _bands_in_pool(address, rows, weight_t, out, bias, out if product is None else product, band, parts,
                           dtype == np.float32)
        return
    # The other paths make the product alone, then do the band's work on all of it.
    plain = product if band == Band.THEN_GELU else np.empty_like(out) if band == Band.ADDED_ONTO else out
    if M <= FEW_ROWS:
        few_rows_matmul(rows, weight_t, plain)
    elif blas:
        with blas_single_threaded_parts() as parts:
            out_t = np.empty((N, M), dtype=out.dtype)
            _weight_bands_in_pool(address, rows, weight_t, out_t, parts)
            plain[...] = out_t.T
    else:
        _product_in_python_threads(rows, weight_t, plain)
    if band == Band.PLUS_BIAS:
        out += bias
    elif band == Band.THEN_GELU:
        bias_gelu(plain, bias, out, 0, N)
    elif band == Band.ADDED_ONTO:
        plain += bias
        out += plain


def _product_in_python_threads(rows, weight_t, out):
    """out: [M, N] = rows @ weight_t.T for more than FEW_ROWS rows through np.matmul in
    `run_in_parts`, where NumPy's BLAS does not export ?gemm under a name we know."""
    M, N = len(rows), weight_t.shape[0]
    if M <= THIN_ROWS:
        out_t = np.empty((N, M), dtype=out.dtype)
        run_in_parts(N, lambda n0, n1: np.matmul(weight_t[n0:n1], rows.T, out=out_t[n0:n1]))
        out[...] = out_t.T
    else:
        run_in_parts(N, lambda n0, n1: np.matmul(rows, weight_t[n0:n1].T, out=out[:, n0:n1]))


def _rows(x):
    """x: [..., K] -> a C-contiguous [rows, K] view or copy."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def linear(x, weight, bias, workspace=None, add_to=None):
    """x: [..., in] -> [..., out] = x @ weight: [in, out] + bias: [out].

    Twin of `ops.linear`; tests/test_kernels.py holds it to torch's linear within rtol 1e-5,
    atol 1e-5 in float32 (a product's sum in another order, see there), 1e-12 in float64.

    workspace: where the result comes from (`workspace.empty`, see `memory.Workspace`); np.empty
    when None. add_to: an array of the result's shape and dtype, to which the result is added
    in place and which is returned: a residual sum, `add_to += linear(x, weight, bias)`. When
    it is C-contiguous the BLAS adds each band's product straight onto it, with no array or
    pass of its own for the sum.
    """
    rows = _rows(x)
    shape = x.shape[:-1] + (weight.shape[1],)
    if add_to is None:
        out = (np.empty if workspace is None else workspace.empty)((len(rows), weight.shape[1]), weight.dtype)
        _product(rows, transposed_contiguous(weight), out, Band.PLUS_BIAS, bias)
        return out.reshape(shape)
    if add_to.shape != shape or add_to.dtype != weight.dtype:
        raise ValueError(f"add_to must be a {weight.dtype} array of shape {shape}, found {add_to.dtype} {add_to.shape}")
    if add_to.flags.c_contiguous:
        _product(rows, transposed_contiguous(weight), add_to.reshape(len(rows), -1), Band.ADDED_ONTO, bias)
    else:
        add_to += linear(x, weight, bias, workspace)
    return add_to


def linear_gelu(x, weight, bias, workspace=None):
    """x: [..., in] -> [..., out]: gelu_tanh(x @ weight + bias), the bias added in the GELU pass.

    Twin of `ops.gelu_tanh(ops.linear(x, weight, bias))`, the GELU done band by band;
    tests/test_kernels.py holds it to torch's linear and tanh GELU within rtol 1e-5, atol 1e-5
    in float32, 1e-12 in float64. The product and the result come from `workspace.empty`
    (np.empty when None).
    """
    rows = _rows(x)
    empty = np.empty if workspace is None else workspace.empty
    product = empty((len(rows), weight.shape[1]), weight.dtype)
    out = empty(product.shape, product.dtype)
    _product(rows, transposed_contiguous(weight), out, Band.THEN_GELU, bias, product)
    return out.reshape(x.shape[:-1] + (weight.shape[1],))


def matmul_transposed(x, weight, out=None):
    """x: [..., K] @ weight.T, weight: [N, K] -> [..., N]; the tied head, x @ wte.T.

    Twin of the head line of `ops.gpt2` (`x @ wte.T`); tests/test_kernels.py holds it to torch's
    product within rtol 1e-5, atol 1e-5 in float32. out, when given: a C-contiguous [..., N]
    array of weight's dtype to write the result into.
    """
    rows = _rows(x)
    shape = x.shape[:-1] + (weight.shape[0],)
    if out is None:
        out = np.empty(shape, dtype=weight.dtype)
    elif out.shape != shape or out.dtype != weight.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {weight.dtype} array of shape {shape}, "
                         f"found {out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' not C-contiguous'}")
    _product(rows, np.ascontiguousarray(weight), out.reshape(len(rows), weight.shape[0]), Band.PRODUCT,
             np.zeros(0, weight.dtype))
    return out


def product_into_columns(rows, weight_t, out, column0):
    """out[:, column0:column0 + N] = rows: [M, K] @ weight_t.T (weight_t: [N, K]), out: [M, >= column0
    + N] C-contiguous: a band of a product written where it belongs (the narrow head's bands,
    `narrow.matmul_transposed`). Many rows with the BLAS: each part's ?gemm writes there
    directly, the row stride out's; else the band's product is made and copied in."""
    M, N = len(rows), weight_t.shape[0]
    dtype = out.dtype.type
    address = _gemm_address(rows, weight_t, out)
    if address is not None and M > THIN_ROWS:
        _begin(M, weight_t)
        with blas_single_threaded_parts() as parts:
            _bands_in_pool(address, rows, weight_t, out, np.zeros(0, dtype), out, Band.PRODUCT, parts,
                           dtype == np.float32, column0)
        return
    product = np.empty((M, N), dtype)
    _product(rows, weight_t, product, Band.PRODUCT, np.zeros(0, dtype))
    out[:, column0:column0 + N] = product


# ---- for measuring: bench/bound.py ------------------------------------------------------------

def product(rows, weight_t, out):
    """out: [M, N] = rows: [M, K] @ weight_t.T (weight_t: [N, K], see the module's docstring),
    by the path the model's products take for M rows: for timing a product on its own."""
    _product(rows, weight_t, out, Band.PRODUCT, np.zeros(0, out.dtype))


@contextlib.contextmanager
def recorded_products():
    """Within: every product the kernels make (`linear`, `linear_gelu`, `matmul_transposed`) is
    appended to the list this yields, as (M rows, weight_t [N, K])."""
    global _recorded
    saved, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = saved
