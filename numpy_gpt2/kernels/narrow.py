"""Narrow weights: matrices kept in bfloat16, float16 or int8 and widened to float32 as they are used.

A decoding step reads every weight once per token, so its speed is the bytes it reads: half of
them in bfloat16 or float16, a bit over a quarter in int8. The arithmetic stays float32.

- bfloat16: the upper 16 bits of each float32 (`weights.dtypes.bfloat16_bits`, rounded to
  nearest even); widening is a shift, so the values used are exactly the stored ones.
- float16: IEEE half precision (rounded to nearest even, as NumPy rounds), finite values only.
  Numba has no float16, so it is widened by its bits (`_widen_float16_row`), exactly too.
- int8: llama.cpp's q8_0. Each row of a matrix stored [out, in] is cut into groups of GROUP
  consecutive inputs; a group keeps one float32 scale d = max |w| / 127 and its weights
  q = round(w / d) in [-127, 127], so w is read back as q * d. When `in` is not a multiple of
  GROUP the last group of each row is the shorter remainder, with its own scale.

All live in a `NarrowMatrix`. Up to FEW_ROWS rows (decoding) a product reads the narrow rows
directly: `decode.few_rows_matmul`, the float32 loop, reads each weight as `stored` says, in a
register, accumulating in float32. Many rows (a prompt) widen the matrix into a float32 buffer
(the tied head a band of BAND_ROWS rows at a time) that the BLAS multiplies as it multiplies
float32 weights (`linear`, `linear_gelu`, `matmul_transposed`, the twins of `products`'
functions for a NarrowMatrix).
"""

import numba
import numpy as np
from numba.extending import overload

from ..errors import GPT2Error
from .common import FAST, FEW_ROWS, PARALLEL
from .decode import dot_rows, few_rows_matmul, rows_matmul
from .elementwise import bias_gelu
from .products import linear as _linear
from .products import linear_gelu as _linear_gelu
from .products import product_into_columns
from .stored import GROUP, HALF_BIAS_SCALE, bfloat16_value, placed_half, weight

WEIGHTS = ("float32", "bfloat16", "float16", "int8")
# The tied head [V, C] is made narrow at load and widened for a prompt this many rows at a time,
# so that no float32 copy of all of it is ever made (the blocks' matrices are widened whole).
BAND_ROWS = 4096


class NarrowMatrix:
    """A weight matrix as [N out, K in] rows in a narrow format.

    kind "bfloat16": `stored` is the bits, uint16 [N, K].
    kind "float16": `stored` is the bits, int16 [N, K]: a type of its own, because jitted code
    (`decode.rows_matmul`, `widen_row`) knows how to widen 16 bits by their type alone.
    kind "int8": `stored` is (q int8 [N, K], scales float32 [N, ceil(K / GROUP)]).
    The model's `Linear.weight` is one of these when its weights are narrow: the rows of the
    matrix it multiplies by (the [in, out] weight of the file, transposed).
    """

    def __init__(self, kind: str, stored):
        self.kind, self.stored = kind, stored

    @property
    def shape(self) -> tuple:
        """(N, K): the rows' shape."""
        return (self.stored[0] if self.kind == "int8" else self.stored).shape

    @property
    def size(self) -> int:
        """The number of weights, N * K."""
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.stored) if self.kind == "int8" else self.stored.nbytes

    def widen(self, n0: int = 0, n1: int | None = None, out=None) -> np.ndarray:
        """Rows n0:n1 as float32 [n1 - n0, K], into `out` when given."""
        n1 = self.shape[0] if n1 is None else n1
        if out is None:
            out = np.empty((n1 - n0, self.shape[1]), np.float32)
        if self.kind == "int8":
            _widen_int8(*self.stored, n0, n1, out)
        else:
            _widen_half(self.stored, n0, n1, out)
        return out

    def take(self, ids, out) -> np.ndarray:
        """out: [..., K] float32 = the rows `ids` [...] (the embedding lookup), widened."""
        flat_ids, flat_out = ids.reshape(-1), out.reshape(-1, self.shape[1])
        if self.kind == "int8":
            _take_int8(*self.stored, flat_ids, flat_out)
        else:
            _take_half(self.stored, flat_ids, flat_out)
        return out


# ---- making narrow matrices -----------------------------------------------------------------

def bfloat16_matrix(rows, done=None) -> NarrowMatrix:
    """rows: float [N, K] -> their bfloat16, each value rounded to nearest even (see `narrow_matrix`)."""
    return narrow_matrix(rows, "bfloat16", done)


def int8_matrix(rows, done=None) -> NarrowMatrix:
    """rows: float [N, K] -> q8_0: per group of GROUP inputs, d = max |w| / 127 (float32) and
    q = round(w / d), half to even (see `narrow_matrix`)."""
    return narrow_matrix(rows, "int8", done)


def narrow_matrix(rows, weights: str, done=None, name: str = "the matrix") -> NarrowMatrix:
    """rows: float [N, K] -> a NarrowMatrix of `weights` ("bfloat16", "float16" or "int8").

    Made BAND_ROWS rows at a time, so the float32 copies it takes are of a band, not of the
    matrix; `done(band)`, when given, is called with each band of `rows` once it is converted
    (for the model to hand back the file pages it came from). float16 keeps finite values only:
    one beyond its range, or an inf or NaN, is a GPT2Error naming the matrix `name`.
    """
    from ..weights.dtypes import bfloat16_bits

    N, K = rows.shape
    if weights == "int8":
        stored = (np.empty((N, K), np.int8), np.empty((N, -(-K // GROUP)), np.float32))
    else:
        stored = np.empty((N, K), np.uint16 if weights == "bfloat16" else np.int16)
    for n0 in range(0, N, BAND_ROWS):
        band = rows[n0:n0 + BAND_ROWS]
        if weights == "bfloat16":
            stored[n0:n0 + BAND_ROWS] = bfloat16_bits(band)
        elif weights == "float16":
            stored[n0:n0 + BAND_ROWS] = _float16(band, name).view(np.int16)
        else:
            _quantize_int8(np.ascontiguousarray(band, dtype=np.float32), stored[0][n0:n0 + BAND_ROWS],
                           stored[1][n0:n0 + BAND_ROWS])
        if done is not None:
            done(band)
    return NarrowMatrix(weights, stored)


def _float16(band, name: str) -> np.ndarray:
    """band: float [n, K] -> float16 [n, K], each value rounded to nearest even (NumPy's cast);
    a value that does not become a finite half is a GPT2Error naming matrix `name`."""
    with np.errstate(over="ignore"):  # an overflow is reported below, with the tensor's name
        half = band.astype(np.float16)
    bad = ~np.isfinite(half)
    if bad.any():
        value = band[bad][0]
        why = (f"{float(value):.7g}, beyond float16's largest finite value 65504" if np.isfinite(value)
               else f"{value}, which float16 cannot keep")
        raise GPT2Error(f"{name} holds {why}; load it with float32 or bfloat16 weights")
    return half


@numba.njit(**PARALLEL)
def _quantize_int8(rows, q, scales):
    """rows: float32 [N, K] -> q int8 [N, K], scales float32 [N, G] (see `int8_matrix`);
    a group of zeros gets scale 0 and q 0."""
    N, K = rows.shape
    for n in numba.prange(N):
        for g in range(scales.shape[1]):
            k0, k1 = g * GROUP, min(K, (g + 1) * GROUP)
            largest = np.float32(0)
            for k in range(k0, k1):
                largest = max(largest, abs(rows[n, k]))
            d = largest / np.float32(127)
            scales[n, g] = d
            if d == 0:
                q[n, k0:k1] = 0
                continue
            for k in range(k0, k1):
                # w / d in float64, so that the quotient rounds once, half to even (llama.cpp's
                # roundf(w * (1 / d)) differs from it at exact halves only); |w / d| <= 127.
                q[n, k] = np.int8(np.round(np.float64(rows[n, k]) / np.float64(d)))


# ---- widening ---------------------------------------------------------------------------------

@numba.njit(inline="always", **FAST)
def _widen_bfloat16_row(bits, row):
    """row: float32 [K] = the bfloat16 values bits: uint16 [K], exactly: the upper half of a float32."""
    for k in range(len(bits)):
        row[k] = bfloat16_value(bits[k])


@numba.njit(inline="always", **FAST)
def _widen_float16_row(bits, row):
    """row: float32 [K] = the finite float16 values bits: int16 [K], exactly (see
    `stored.HALF_BIAS_SCALE`)."""
    for k in range(len(bits)):
        row[k] = placed_half(bits[k]) * HALF_BIAS_SCALE


def widen_row(bits, row):
    """row: float32 [K] = the 16-bit floats bits: [K], bfloat16 (uint16) or float16 (int16), exactly.

    Jitted code calls it too: the overload below picks the widening by the type when compiling.
    """
    (_widen_bfloat16_row if bits.dtype == np.uint16 else _widen_float16_row)(bits, row)


@overload(widen_row, jit_options=FAST, inline="always")
def _widen_row_typed(bits, row):
    if bits.dtype == numba.types.uint16:
        return lambda bits, row: _widen_bfloat16_row(bits, row)
    return lambda bits, row: _widen_float16_row(bits, row)


@numba.njit(**PARALLEL)
def _widen_half(bits, n0, n1, out):
    """out [n1 - n0, K] float32 = the 16-bit rows bits[n0:n1] (see `widen_row`), exactly."""
    for n in numba.prange(n1 - n0):
        widen_row(bits[n0 + n], out[n])


@numba.njit(**PARALLEL)
def _widen_int8(q, scales, n0, n1, out):
    """out [n1 - n0, K] float32 = q[n0:n1] * its groups' scales (one rounding each)."""
    for n in numba.prange(n1 - n0):
        row, out_row = (q[n0 + n], scales[n0 + n]), out[n]
        for k in range(len(out_row)):
            out_row[k] = weight(row, k)


@numba.njit(**FAST)
def _take_half(bits, ids, out):
    for i in range(len(ids)):
        widen_row(bits[ids[i]], out[i])


@numba.njit(**FAST)
def _take_int8(q, scales, ids, out):
    for i in range(len(ids)):
        row = (q[ids[i]], scales[ids[i]])
        for k in range(out.shape[1]):
            out[i, k] = weight(row, k)


# ---- a few rows: decoding ---------------------------------------------------------------------
# bfloat16 and int8 rows go straight to `decode.few_rows_matmul`; float16 rows too, x scaled.

@numba.njit(**PARALLEL)
def half_rows_matmul(x, bits, out):
    """out: [M, N] = x: [M, K] @ widened(bits).T, bits: [N, K] bfloat16 (uint16) or float16
    (int16), for a few rows M, each row widened whole into a float32 buffer (`widen_row`) and
    dotted with x (`decode.dot_rows`): float16's product when x is too large to scale (see
    `float16_rows_matmul`)."""
    N, K = bits.shape
    n_blocks = min(N, 256)
    per_block = (N + n_blocks - 1) // n_blocks
    for block in numba.prange(n_blocks):
        row = np.empty(K, np.float32)
        for n in range(block * per_block, min(N, (block + 1) * per_block)):
            widen_row(bits[n], row)
            dot_rows(row, x, out, n)


# float16 rows in a decoding step are read as placed halves (`stored.placed_half`), the values
# times 2**-112; x times 2**112 makes each product the very same number, so the rows'
# multiplication is moved onto x, once a call. |x| must stay below 2**15 for x times 2**112 to
# stay finite; past that the rows are widened whole.
_FOLD_LIMIT = np.float32(2.0 ** 15)


@numba.njit(**FAST)
def float16_rows_matmul(x, bits, out):
    """out: [M, N] = x: [M, K] @ widened(bits).T, bits: int16 [N, K] the float16 rows, for a few
    rows M: `decode.few_rows_matmul` on the placed halves and x times 2**112 (see above), the
    same products and the same sums as on the widened rows."""
    M, K = x.shape
    for m in range(M):
        for j in range(K):
            if abs(x[m, j]) >= _FOLD_LIMIT:
                half_rows_matmul(x, bits, out)
                return
    few_rows_matmul(x * HALF_BIAS_SCALE, bits, out)


# ---- the products of a forward pass --------------------------------------------------------

def _widened_weight(weight: NarrowMatrix, workspace):
    """The float32 weight [K, N] a NarrowMatrix [N, K] stands for, widened into memory from
    `workspace` (a prompt's, see `memory.Workspace`; np.empty when None)."""
    rows = (np.empty if workspace is None else workspace.empty)(weight.shape, np.float32)
    return weight.widen(out=rows).T


def linear(x, weight, bias, workspace=None, add_to=None):
    """`products.linear` with a NarrowMatrix weight [out, in]: x: [..., in] -> [..., out] =
    x @ weight.T + bias, or added onto `add_to`.

    Up to FEW_ROWS rows by `rows_matmul`, else the float32 matrix widened and multiplied by the
    BLAS as float32 weights are. tests/test_narrow.py holds it to torch's linear on the
    dequantized weight within rtol 1e-5, atol 1e-5 (a product summed in another order).
    """
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    if len(rows) > FEW_ROWS:
        return _linear(x, _widened_weight(weight, workspace), bias, workspace, add_to)
    out = np.empty((len(rows), weight.shape[0]), np.float32)
    rows_matmul(rows, weight.stored, out)
    out += bias
    out = out.reshape(x.shape[:-1] + (weight.shape[0],))
    if add_to is None:
        return out
    add_to += out
    return add_to


def linear_gelu(x, weight, bias, workspace=None):
    """`products.linear_gelu` with a NarrowMatrix weight (see `linear`)."""
    if np.prod(x.shape[:-1]) > FEW_ROWS:
        return _linear_gelu(x, _widened_weight(weight, workspace), bias, workspace)
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    product = np.empty((len(rows), weight.shape[0]), np.float32)
    rows_matmul(rows, weight.stored, product)
    out = np.empty_like(product)
    bias_gelu(product, bias, out, 0, weight.shape[0])
    return out.reshape(x.shape[:-1] + (weight.shape[0],))


def matmul_transposed(x, weight, out=None, workspace=None):
    """`products.matmul_transposed` with a NarrowMatrix, the tied head: x: [..., K] @ weight.T,
    weight [N, K] -> [..., N] (into `out` when given).

    Up to FEW_ROWS rows by `rows_matmul`; more, BAND_ROWS rows of the head widened at a
    time (into memory from `workspace` when given), each band's product by the BLAS.
    """
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    N = weight.shape[0]
    if out is None:
        out = np.empty(x.shape[:-1] + (N,), np.float32)
    flat = out.reshape(len(rows), N)
    if len(rows) <= FEW_ROWS:
        rows_matmul(rows, weight.stored, flat)
        return out
    band_rows = min(N, BAND_ROWS)
    band = (np.empty if workspace is None else workspace.empty)((band_rows, weight.shape[1]), np.float32)
    for n0 in range(0, N, band_rows):
        n1 = min(N, n0 + band_rows)
        # Into out's columns n0:n1 in place: the BLAS takes out's row stride.
        product_into_columns(rows, weight.widen(n0, n1, band[:n1 - n0]), flat, n0)
    return out
