"""The element-wise and per-row twins of `ops`: layernorm, and the bias plus tanh-GELU.

Each loop works over a 2-D view of C-contiguous rows; the products call the GELU loops band by
band (`products`), and a decoding step calls all of them inside one Numba function (`decode`).
"""

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from ..threads import numba_threads
from .common import FAST, JIT, THIN_ROWS
from .float32math import tanh_float32


@numba.njit(**FAST)
def layer_norm_rows(x, gamma, beta, eps, out):
    """x, out: [N, C]; out[n] = gamma * (x[n] - mean) / sqrt(var + eps) + beta, sums in float64.

    (Reassociation lets the two sums vectorise.)
    """
    n_rows, C = x.shape
    for n in range(n_rows):
        mean = 0.0
        for c in range(C):
            mean += x[n, c]
        mean /= C
        var = 0.0
        for c in range(C):
            d = x[n, c] - mean
            var += d * d
        inv_std = 1.0 / math.sqrt(var / C + eps)
        for c in range(C):
            out[n, c] = gamma[c] * ((x[n, c] - mean) * inv_std) + beta[c]


@numba.njit(**dict(JIT, parallel=True))
def _layer_norm_rows_in_pool(x, gamma, beta, eps, out, parts):
    """`layer_norm_rows` with the rows cut into `parts` parts in Numba's threads: a prompt's
    layernorms otherwise run on one thread while the other cores wait."""
    per_part = (x.shape[0] + parts - 1) // parts
    for part in numba.prange(parts):
        layer_norm_rows(x[part * per_part:(part + 1) * per_part], gamma, beta, eps,
                        out[part * per_part:(part + 1) * per_part])


def layer_norm(x, gamma, beta, eps, workspace=None):
    """x: [..., C] -> [..., C]; normalise over the last axis, then scale by gamma and shift by
    beta: [C].

    Twin of `ops.layer_norm`; tests/test_kernels.py holds it to torch's layer_norm within rtol
    1e-5, atol 1e-6 in float32 (1e-12 in float64). The result comes from `workspace.empty`
    when a workspace is given (a prompt's, see `memory.Workspace`), else from np.empty.
    """
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = (np.empty if workspace is None else workspace.empty)(rows.shape, rows.dtype)
    if len(rows) > THIN_ROWS:
        _layer_norm_rows_in_pool(rows, gamma, beta, float(eps), out, numba_threads())
    else:
        layer_norm_rows(rows, gamma, beta, float(eps), out)
    return out.reshape(x.shape)


@numba.njit(**JIT)
def bias_gelu_rows(x, bias, out, c0, c1):
    """x, out: [N, M]; out[:, c0:c1] = gelu(x[:, c0:c1] + bias[c0:c1]),
    gelu(y) = 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))).

    (The loop runs over 1-D slices of a row: indexed as out[n, m] over a column range the same
    loop does not vectorise.)
    """
    c = math.sqrt(2.0 / math.pi)
    b = bias[c0:c1]
    for n in range(x.shape[0]):
        x_n, out_n = x[n, c0:c1], out[n, c0:c1]
        for m in range(c1 - c0):
            y = x_n[m] + b[m]
            out_n[m] = 0.5 * y * (1.0 + math.tanh(c * (y + 0.044715 * y * y * y)))


@numba.njit(**JIT)
def bias_gelu_rows_float32(x, bias, out, c0, c1):
    """`bias_gelu_rows` for float32 with `tanh_float32`: no call in the loop, so it vectorises."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    a = np.float32(0.044715)
    half = np.float32(0.5)
    b = bias[c0:c1]
    for n in range(x.shape[0]):
        x_n, out_n = x[n, c0:c1], out[n, c0:c1]
        for m in range(c1 - c0):
            y = x_n[m] + b[m]
            out_n[m] = half * y * (1 + tanh_float32(c * (y + a * y * y * y)))


def bias_gelu_rows_of_dtype(x, bias, out, c0, c1):
    """`bias_gelu_rows_float32` for float32 x, `bias_gelu_rows` otherwise, chosen when a jitted
    caller is compiled (see the overload): the caller's build holds only its dtype's loop, so a
    first run compiles one of the two."""
    bias_gelu(x, bias, out, c0, c1)


@overload(bias_gelu_rows_of_dtype, jit_options=JIT)
def _bias_gelu_rows_for(x, bias, out, c0, c1):
    if x.dtype == types.float32:
        return lambda x, bias, out, c0, c1: bias_gelu_rows_float32(x, bias, out, c0, c1)
    return lambda x, bias, out, c0, c1: bias_gelu_rows(x, bias, out, c0, c1)


def bias_gelu(x, bias, out, c0, c1):
    """out[:, c0:c1] = gelu(x[:, c0:c1] + bias[c0:c1]) for x, out: [N, M], C-contiguous.

    x and out must be separate arrays: with input and output the same, LLVM's overlap check
    fails and the loop runs unvectorised.
    """
    kernel = bias_gelu_rows_float32 if x.dtype == np.float32 else bias_gelu_rows
    kernel(x, bias, out, c0, c1)


@numba.njit(**FAST)
def add_with_bias_(x, y, bias):
    """x: [B, C] += y: [B, C] + bias: [C], in place (a decoding step's residual sum)."""
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            x[b, c] += y[b, c] + bias[c]
