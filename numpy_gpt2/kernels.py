"""Numba twins of the hot ops in `ops.py`: same signatures, same results within rounding.

Each public function here has the signature of its namesake in `ops.py` (or, when it fuses two
ops, of their composition), some with an optional `empty` that makes their arrays (see
`layer_norm`); a jitted loop does the work over a 2-D view. The tests feed both versions the
same input and compare them with torch.

Matrix products: for many rows (a prompt) they go to NumPy's BLAS, cut into one band of
output columns per thread, each band one ?gemm call made from Numba's threads (`_gemm`, the
BLAS single-threaded meanwhile); the prompt's attention is cut into groups of heads the same
way, and its layernorms into groups of rows. Where the BLAS's ?gemm cannot be found, np.matmul
in `threads.run_in_parts` does the products and the attention instead. For a few rows
(decoding: one row per sequence) every weight is read once per token and the product is a
stream through memory. The model stores each weight as [out, in] rows
(`model._blocks_in_one_array`), so a Numba loop gives each thread one contiguous run of rows
to dot with x: 32-65 GB/s here depending on what else shares the memory bus, against 24-30
GB/s for BLAS and 30-40 GB/s for the same loop over the file's [in, out] layout.

A decoding step of up to FEW_ROWS rows runs each block as one call (`decode_block`), the same
loops with no Python between them.

Threads: a decoding step with few rows, and a prompt's products, attention and layernorms,
all run in Numba's thread pool. Two pools taking turns fight for the cores, because each
one's idle workers spin for a while after their last task: Numba's pool right after a
multi-threaded BLAS product made decoding twenty times slower, and the parallel attention
between the BLAS parts of a batch-16 step made it 1.4x slower (150 against 210 tokens/s).
Hence two builds of the attention loop over the cache. With a prompt's bands run by Python's
threads (the fallback), each started 0.1-0.2 ms after the call (the GIL, and a sleeping
thread to wake), and Numba's workers, spinning after their last loop, took the core from a
Python thread's band.

Every jitted function has `cache=True`: the compile cost (a few seconds) is paid once per
machine, not once per process.
"""

import ctypes
import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .threads import blas_function, blas_single_threaded_parts, run_in_parts

# error_model="numpy": a float division by zero gives inf as in NumPy instead of raising, which
# removes a branch from every division and lets loops vectorise (10x on the GELU here).
_JIT = dict(cache=True, nogil=True, error_model="numpy")
# Reassociation lets LLVM vectorise the sums; it changes only the rounding order. No flag that
# assumes finite values: the masking below relies on -inf.
_FAST = dict(_JIT, fastmath={"reassoc", "contract"})
_PARALLEL = dict(_FAST, parallel=True)

# Start Numba's threading layer now. A cached function that is not parallel itself but calls
# parallel ones (`_decode_block`) does not start it when it is loaded from the cache, and its
# parallel loops then crash the process (numba issue #8578): reproduced here with a cache
# filled by earlier processes, a segfault on the first decoding step.
numba.get_num_threads()

# Up to FEW_ROWS rows the products go through the Numba loops below, beyond it through BLAS,
# up to _THIN_ROWS with the weight on the left (see `_product`).
FEW_ROWS = 8
_THIN_ROWS = 64


@numba.njit(**_FAST)
def _layer_norm_rows(x, gamma, beta, eps, out):
    """x, out: [N, C]; out[n] = gamma * (x[n] - mean) / sqrt(var + eps) + beta, sums in float64.

    (Reassociation lets the two sums vectorise: 3.7x faster here.)
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


def layer_norm(x, gamma, beta, eps, empty=np.empty):
    """x: [..., C] -> [..., C]; layernorm over the last axis (see `ops.layer_norm`).

    empty(shape, dtype), here and in the functions below: makes the result and any buffer
    (np.empty; the model passes its kept memory for a prompt, see `buffers`).
    """
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = empty(rows.shape, rows.dtype)
    if len(rows) > _THIN_ROWS:
        _layer_norm_rows_in_pool(rows, gamma, beta, float(eps), out, numba.get_num_threads())
    else:
        _layer_norm_rows(rows, gamma, beta, float(eps), out)
    return out.reshape(x.shape)


@numba.njit(**dict(_JIT, parallel=True))
def _layer_norm_rows_in_pool(x, gamma, beta, eps, out, parts):
    """`_layer_norm_rows` with the rows cut into `parts` parts in Numba's threads: a prompt's
    layernorms otherwise run on one thread while the other core waits."""
    per_part = (x.shape[0] + parts - 1) // parts
    for part in numba.prange(parts):
        _layer_norm_rows(x[part * per_part:(part + 1) * per_part], gamma, beta, eps,
                         out[part * per_part:(part + 1) * per_part])


@numba.njit(inline="always", **_JIT)
def _tanh_float32(u):
    """tanh for float32 as a rational function, accurate to a few float32 ulps.

    A minimax [13/6] approximation on [-7.9, 7.9] (Eigen's `generic_fast_tanh_float`), beyond
    which tanh is +-1 in float32. Unlike `math.tanh` it has no branch, so loops vectorise.
    """
    u = min(max(u, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    u2 = u * u
    p = np.float32(-2.76076847742355e-16)
    p = p * u2 + np.float32(2.00018790482477e-13)
    p = p * u2 + np.float32(-8.60467152213735e-11)
    p = p * u2 + np.float32(5.12229709037114e-08)
    p = p * u2 + np.float32(1.48572235717979e-05)
    p = p * u2 + np.float32(6.37261928875436e-04)
    p = p * u2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * u2 + np.float32(1.18534705686654e-04)
    q = q * u2 + np.float32(2.26843463243900e-03)
    q = q * u2 + np.float32(4.89352518554385e-03)
    return u * p / q


@numba.njit(**_JIT)
def _bias_gelu_rows(x, bias, out, c0, c1):
    """x, out: [N, M]; out[:, c0:c1] = gelu(x[:, c0:c1] + bias[c0:c1]),
    gelu(y) = 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))).

    (The loop runs over 1-D slices of a row: indexed as out[n, m] over a column range the same
    loop ran 6x slower, unvectorised.)
    """
    c = math.sqrt(2.0 / math.pi)
    b = bias[c0:c1]
    for n in range(x.shape[0]):
        x_n, out_n = x[n, c0:c1], out[n, c0:c1]
        for m in range(c1 - c0):
            y = x_n[m] + b[m]
            out_n[m] = 0.5 * y * (1.0 + math.tanh(c * (y + 0.044715 * y * y * y)))


@numba.njit(**_JIT)
def _bias_gelu_rows_float32(x, bias, out, c0, c1):
    """`_bias_gelu_rows` for float32 with `_tanh_float32`: no call in the loop, so it vectorises."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    a = np.float32(0.044715)
    half = np.float32(0.5)
    b = bias[c0:c1]
    for n in range(x.shape[0]):
        x_n, out_n = x[n, c0:c1], out[n, c0:c1]
        for m in range(c1 - c0):
            y = x_n[m] + b[m]
            out_n[m] = half * y * (1 + _tanh_float32(c * (y + a * y * y * y)))


def _bias_gelu(x, bias, out, c0, c1):
    """out[:, c0:c1] = gelu(x[:, c0:c1] + bias[c0:c1]) for x, out: [N, M], C-contiguous.

    x and out must be separate arrays: with input and output the same LLVM's overlap check
    fails and the loop runs unvectorised, 8x slower.
    """
    kernel = _bias_gelu_rows_float32 if x.dtype == np.float32 else _bias_gelu_rows
    kernel(x, bias, out, c0, c1)


def gelu_tanh(x):
    """x: any shape -> same shape; the tanh GELU (see `ops.gelu_tanh`)."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)
    out = np.empty_like(rows)
    _bias_gelu(rows, np.zeros(rows.shape[1], rows.dtype), out, 0, rows.shape[1])
    return out.reshape(x.shape)


# ---- products with a weight matrix ------------------------------------------------------------
#
# Every product here is x @ weight with weight [K, N] as the maths has it, but each takes the
# matrix as the model stores it: `rows_of_out` [N, K], C-contiguous, one row per output (see
# `model._blocks_in_one_array`; the tied head wte is [V, C] in the file already). `stored_rows`
# gets that array back from the [K, N] view.

@numba.njit(**_PARALLEL)
def _few_rows_times(x, rows_of_out, out):
    """x: [M, K] @ rows_of_out.T, rows_of_out: [N, K] -> out: [M, N], for a few rows M.

    Threads take blocks of the stored rows, so each thread reads one contiguous stream through
    memory; each row is read once and dotted with four rows of x at a time while it sits in L1.
    """
    N, K = rows_of_out.shape
    M = x.shape[0]
    n_blocks = min(N, 256)
    per_block = (N + n_blocks - 1) // n_blocks
    zero = out.dtype.type(0)
    for block in numba.prange(n_blocks):
        for n in range(block * per_block, min(N, (block + 1) * per_block)):
            m = 0
            while m + 4 <= M:
                s0 = s1 = s2 = s3 = zero
                for k in range(K):
                    w = rows_of_out[n, k]
                    s0 += w * x[m, k]
                    s1 += w * x[m + 1, k]
                    s2 += w * x[m + 2, k]
                    s3 += w * x[m + 3, k]
                out[m, n], out[m + 1, n], out[m + 2, n], out[m + 3, n] = s0, s1, s2, s3
                m += 4
            while m < M:
                s0 = zero
                for k in range(K):
                    s0 += rows_of_out[n, k] * x[m, k]
                out[m, n] = s0
                m += 1


def stored_rows(weight):
    """weight: [K, N] -> the same matrix as [N, K] rows, C-contiguous: a view when the model
    stores it so (weight.T contiguous), else a copy."""
    return weight.T if weight.T.flags.c_contiguous else np.ascontiguousarray(weight.T)


def _rows(x):
    """x: [..., K] -> a C-contiguous [rows, K] view or copy."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def _gemm_address(dtype):
    """The address of the BLAS's cblas_?gemm64_ for `dtype`, for `_gemm` to call from Numba's
    threads; None where NumPy's BLAS does not export it under a name whose integer width is
    known (scipy-openblas64, as NumPy's wheels ship it: 64-bit)."""
    name = {np.float32: "cblas_sgemm64_", np.float64: "cblas_dgemm64_"}[dtype]
    gemm = blas_function("scipy_" + name, name)
    return None if gemm is None else ctypes.cast(gemm, ctypes.c_void_p).value


_GEMM_ADDRESS = {dtype: _gemm_address(dtype) for dtype in (np.float32, np.float64)}


@intrinsic
def _gemm(typingctx, address, trans_b, M, N, K, a, lda, b, ldb, beta, c, ldc):
    """c = a @ op(b) + beta * c, row-major, through the ?gemm at `address` (cblas_?gemm64_):
    a [M, K] at address a, row stride lda; op(b) [K, N]: b as [N, K] rows (trans_b true) or as
    [K, N] (false), row stride ldb; c [M, N] at address c, row stride ldc; strides in elements,
    the precision that of beta (float32: sgemm, float64: dgemm).

    A direct call with no Python around it, so Numba's threads can share a product: the
    address is an argument, so the functions that call it can be cached.
    """
    sig = types.void(address, trans_b, M, N, K, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, args):
        address, trans_b, M, N, K, a, lda, b, ldb, beta, c, ldc = args
        real, i32, i64 = context.get_value_type(signature.args[9]), ir.IntType(32), ir.IntType(64)
        pointer = ir.IntType(8).as_pointer()
        gemm_type = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, real, pointer, i64,
                                                    pointer, i64, real, pointer, i64])
        gemm = builder.inttoptr(address, gemm_type.as_pointer())
        row_major, no_trans, trans = (ir.Constant(i32, n) for n in (101, 111, 112))
        as_int = lambda value: builder.sext(value, i64) if value.type.width < 64 else value
        builder.call(gemm, [row_major, no_trans, builder.select(trans_b, trans, no_trans), as_int(M), as_int(N),
                            as_int(K), ir.Constant(real, 1.0), builder.inttoptr(a, pointer), as_int(lda),
                            builder.inttoptr(b, pointer), as_int(ldb), beta, builder.inttoptr(c, pointer), as_int(ldc)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer `bits` (Numba makes the
    sum of two int32 an int64): a bit cast, no conversion, and unlike a view of an array it
    keeps a loop vectorisable."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 32:
        return None

    def codegen(context, builder, signature, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


# What `_bands_in_pool` does with each band of output columns.
_PLAIN, _PLUS_BIAS, _THEN_GELU, _ONTO = 0, 1, 2, 3


@numba.njit(**dict(_JIT, parallel=True))
def _bands_in_pool(address, rows, rows_of_out, out, bias, product, mode, parts, float32):
    """out: [M, N] from rows: [M, K] @ rows_of_out.T (rows_of_out: [N, K]), one band of output
    columns per part, each part one ?gemm call in one of Numba's threads:
    - _PLAIN: out = the product;
    - _PLUS_BIAS: out = bias + the product, the bias put in the band first for the BLAS to add
      the product to (beta = 1);
    - _THEN_GELU: product = the product, then out = gelu(product + bias), band by band;
    - _ONTO: out += bias + the product, the bias added to the band first and the BLAS adding
      the product onto it (beta = 1): a residual sum with no pass of its own.
    All arrays C-contiguous; `float32` says which GELU loop (see `_bias_gelu`).
    """
    M, K = rows.shape
    N = rows_of_out.shape[0]
    per_part = (N + parts - 1) // parts
    item = out.itemsize
    target = product if mode == _THEN_GELU else out
    for part in numba.prange(parts):
        n0, n1 = part * per_part, min(N, (part + 1) * per_part)
        if n0 >= n1:
            continue
        beta = out.dtype.type(0)
        if mode == _PLUS_BIAS:
            for m in range(M):
                out[m, n0:n1] = bias[n0:n1]
            beta = out.dtype.type(1)
        elif mode == _ONTO:
            for m in range(M):
                out[m, n0:n1] += bias[n0:n1]
            beta = out.dtype.type(1)
        _gemm(address, True, M, n1 - n0, K, rows.ctypes.data, K, rows_of_out.ctypes.data + n0 * K * item, K,
              beta, target.ctypes.data + n0 * item, N)
        if mode == _THEN_GELU:
            if float32:
                _bias_gelu_rows_float32(product, bias, out, n0, n1)
            else:
                _bias_gelu_rows(product, bias, out, n0, n1)


@numba.njit(**dict(_JIT, parallel=True))
def _weight_bands_in_pool(address, rows, rows_of_out, out_t, parts):
    """out_t: [N, M] = rows_of_out: [N, K] @ rows.T (rows: [M, K]), a band of the weight's rows
    per part (the weight on the left, see `_product`)."""
    M, K = rows.shape
    N = rows_of_out.shape[0]
    per_part = (N + parts - 1) // parts
    item = out_t.itemsize
    for part in numba.prange(parts):
        n0, n1 = part * per_part, min(N, (part + 1) * per_part)
        if n0 < n1:
            _gemm(address, True, n1 - n0, M, K, rows_of_out.ctypes.data + n0 * K * item, K, rows.ctypes.data, K,
                  out_t.dtype.type(0), out_t.ctypes.data + n0 * M * item, M)


def _product(rows, rows_of_out, out, bias=None, gelu_out=None, onto=False):
    """out: [M, N] = rows: [M, K] @ rows_of_out.T (+ bias: [N]), rows_of_out: [N, K]; with
    gelu_out: [M, N] also gelu_out = gelu(out + bias), out then holding the product alone; with
    onto, out += the product (+ bias) instead.

    The path depends on M:
    - up to FEW_ROWS rows (decoding) `_few_rows_times`: every weight is read once per token,
      and this is a stream through memory;
    - up to _THIN_ROWS rows, BLAS with the weight on the left, a band of its rows per thread:
      with it on the right BLAS repacks the whole transposed operand on every call, and
      streaming it once is 1.3-1.5x faster at 8-64 rows;
    - beyond, BLAS with a band of output columns per thread, the bias put in the band first
      for the BLAS to add the product to, the GELU done band by band in the same thread.
    The BLAS calls run in Numba's threads (`_bands_in_pool`): started from Python's (see
    `threads.run_in_parts`, the fallback where the BLAS's ?gemm is not found) each band began
    0.1-0.2 ms after the call, and the block's products of a 512-token prompt took 10-18% longer.
    """
    M, N = len(rows), rows_of_out.shape[0]
    dtype = out.dtype.type
    address = _GEMM_ADDRESS.get(dtype)
    blas = (address is not None and rows.dtype == rows_of_out.dtype == dtype
            and all(a.flags.c_contiguous for a in (rows, rows_of_out, out)))
    total = None
    if onto and not (blas and M > _THIN_ROWS):  # only the bands add onto out themselves
        total, out, onto = out, np.empty_like(out), False
    if M <= FEW_ROWS:
        _few_rows_times(rows, rows_of_out, out)
        if bias is not None and gelu_out is None:
            out += bias
    elif blas:
        with blas_single_threaded_parts() as parts:
            if M <= _THIN_ROWS:
                out_t = np.empty((N, M), dtype=out.dtype)
                _weight_bands_in_pool(address, rows, rows_of_out, out_t, parts)
                out[...] = out_t.T
                if bias is not None and gelu_out is None:
                    out += bias
            else:
                mode = (_THEN_GELU if gelu_out is not None else _ONTO if onto else _PLAIN if bias is None
                        else _PLUS_BIAS)
                no_bias = np.zeros(N if onto else 0, dtype=out.dtype)
                _bands_in_pool(address, rows, rows_of_out, out if gelu_out is None else gelu_out,
                               no_bias if bias is None else bias, out, mode, parts, dtype == np.float32)
                return
    else:
        _product_in_python_threads(rows, rows_of_out, out, None if gelu_out is not None else bias)
    if gelu_out is not None:
        _bias_gelu(out, bias, gelu_out, 0, N)
    if total is not None:
        total += out


def _product_in_python_threads(rows, rows_of_out, out, bias):
    """`_product` for more than FEW_ROWS rows through np.matmul in `run_in_parts`, where
    NumPy's BLAS does not export ?gemm under a name we know."""
    M, N = len(rows), rows_of_out.shape[0]
    if M <= _THIN_ROWS:
        out_t = np.empty((N, M), dtype=out.dtype)
        run_in_parts(N, lambda n0, n1: np.matmul(rows_of_out[n0:n1], rows.T, out=out_t[n0:n1]))
        out[...] = out_t.T
    else:
        run_in_parts(N, lambda n0, n1: np.matmul(rows, rows_of_out[n0:n1].T, out=out[:, n0:n1]))
    if bias is not None:
        out += bias


def linear(x, weight, bias, empty=np.empty, add_to=None):
    """x: [..., in] -> [..., out] = x @ weight + bias (see `ops.linear`).

    add_to: an array of the result's shape and dtype, to which the result is added in place
    and which is returned: a residual sum, `add_to += linear(x, weight, bias)`. When it is
    C-contiguous the BLAS adds each band's product straight onto it, with no array or pass of
    its own for the sum.
    """
    rows = _rows(x)
    shape = x.shape[:-1] + (weight.shape[1],)
    if add_to is None:
        out = empty((len(rows), weight.shape[1]), weight.dtype)
        _product(rows, stored_rows(weight), out, bias)
        return out.reshape(shape)
    if add_to.shape != shape or add_to.dtype != weight.dtype:
        raise ValueError(f"add_to must be a {weight.dtype} array of shape {shape}, found {add_to.dtype} {add_to.shape}")
    if add_to.flags.c_contiguous:
        _product(rows, stored_rows(weight), add_to.reshape(len(rows), -1), bias, onto=True)
    else:
        add_to += linear(x, weight, bias, empty)
    return add_to


def linear_gelu(x, weight, bias, empty=np.empty):
    """x: [..., in] -> [..., out]: gelu_tanh(x @ weight + bias), the bias added in the GELU pass.

    The twin of `ops.gelu_tanh(ops.linear(x, weight, bias))`, the GELU done band by band.
    """
    rows = _rows(x)
    product = empty((len(rows), weight.shape[1]), weight.dtype)
    out = empty(product.shape, product.dtype)
    _product(rows, stored_rows(weight), product, bias, gelu_out=out)
    return out.reshape(x.shape[:-1] + (weight.shape[1],))


def matmul_transposed(x, weight, out=None):
    """x: [..., K] @ weight.T, weight: [N, K] -> [..., N]; the tied head, x @ wte.T.

    out, when given: a C-contiguous [..., N] array of weight's dtype to write the result into.
    """
    rows = _rows(x)
    shape = x.shape[:-1] + (weight.shape[0],)
    if out is None:
        out = np.empty(shape, dtype=weight.dtype)
    elif out.shape != shape or out.dtype != weight.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {weight.dtype} array of shape {shape}, "
                         f"found {out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' not C-contiguous'}")
    _product(rows, np.ascontiguousarray(weight), out.reshape(len(rows), weight.shape[0]))
    return out


@numba.njit(**_JIT)
def _softmax_rows(x, out):
    """x, out: [N, M]; out[n] = exp(x[n] - max) / sum(exp(x[n] - max))."""
    n_rows, M = x.shape
    for n in range(n_rows):
        row_max = -np.inf
        for m in range(M):
            row_max = max(row_max, x[n, m])
        total = 0.0
        for m in range(M):
            e = math.exp(x[n, m] - row_max)
            out[n, m] = e
            total += e
        for m in range(M):
            out[n, m] /= total


def softmax(x):
    """x: [..., N] -> [..., N]; softmax over the last axis (see `ops.softmax`)."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    _softmax_rows(rows, out)
    return out.reshape(x.shape)


@numba.njit(inline="always", **_FAST)
def _attend_one(q, k, v, key_mask, start, scale, b, h, t, scores, out):
    """One query, q[b, t, h]: its scores against the visible keys of head h, their softmax, and
    the weighted sum of the values, in one pass over the cache -> out[b, t, h]."""
    S, D = k.shape[2], k.shape[3]
    zero = q.dtype.type(0)
    last = min(start + t + 1, S)
    row_max = -np.inf
    for s in range(last):
        if key_mask[b, s]:
            dot = zero
            for d in range(D):
                dot += q[b, t, h, d] * k[b, h, s, d]
            scores[s] = dot * scale
            row_max = max(row_max, scores[s])
    for d in range(D):
        out[b, t, h, d] = zero
    if row_max == -np.inf:
        return
    total = 0.0
    for s in range(last):
        if key_mask[b, s]:
            scores[s] = math.exp(scores[s] - row_max)
            total += scores[s]
    inv_total = 1.0 / total
    for s in range(last):
        if key_mask[b, s]:
            w = q.dtype.type(scores[s] * inv_total)
            for d in range(D):
                out[b, t, h, d] += w * v[b, h, s, d]


@numba.njit(**_FAST)
def _attend_over_cache(q, k, v, key_mask, start, scale, out):
    """q: [B, T, H, D]; k, v: [B, H, S, D]; key_mask: [B, S]; out: [B, T, H, D].

    Every query through `_attend_one`, on the calling thread. Made for decoding (T small).
    """
    B, T, H, D = q.shape
    scores = np.empty(k.shape[2], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                _attend_one(q, k, v, key_mask, start, scale, b, h, t, scores, out)


@numba.njit(**_PARALLEL)
def _attend_over_cache_parallel(q, k, v, key_mask, start, scale, out):
    """`_attend_over_cache` with the (row, head) pairs shared between Numba's threads."""
    B, T, H, D = q.shape
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        scores = np.empty(k.shape[2], dtype=q.dtype)
        for t in range(T):
            _attend_one(q, k, v, key_mask, start, scale, b, h, t, scores, out)


@numba.njit(**_FAST)
def _scale_mask_center_(scores, key_mask, start, scale):
    """scores: [B, H, T, S] of q.k, in place -> scale * q.k - row max, -inf where not visible.

    Query t sees keys 0..start+t whose key_mask is set. A row that sees no key is all -inf.
    No exp here: that is left to NumPy's vectorised np.exp. The loops select rather than
    branch, so they vectorise.
    """
    B, H, T, S = scores.shape
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = scores[b, h, t]
                last = min(start + t + 1, S)
                row_max = -np.inf
                for s in range(last):
                    row_max = max(row_max, row[s] * scale if key_mask[b, s] else -np.inf)
                if row_max == -np.inf:
                    last = 0
                for s in range(last):
                    row[s] = row[s] * scale - row_max if key_mask[b, s] else -np.inf
                for s in range(last, S):
                    row[s] = -np.inf


@numba.njit(**_FAST)
def _hide_future_(scores, start):
    """scores: [B, H, T, S] of q.k for queries at positions start..start+T-1, in place: -inf
    where the key comes after the query."""
    B, H, T, S = scores.shape
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = scores[b, h, t]
                for s in range(min(start + t + 1, S), S):
                    row[s] = -np.inf


@numba.njit(**_FAST)
def _scale_center_(scores, row_max, start, scale):
    """scores: [B, H, T, S] of q.k, row_max: [B, H, T] their maxima over the keys each query
    sees, in place -> scale * (q.k) - scale * row max where the key is visible (the rest
    stays -inf). scale > 0, so scale * max(q.k) is also the maximum of the scaled row."""
    B, H, T, S = scores.shape
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = scores[b, h, t]
                shift = row_max[b, h, t] * scale
                for s in range(min(start + t + 1, S)):
                    row[s] = row[s] * scale - shift


@numba.njit(**_FAST)
def _normalise_rows_(weights):
    """weights: [N, S] of exp(score - max), in place -> rows summing to 1 (all-zero rows stay)."""
    for n in range(weights.shape[0]):
        row = weights[n]
        total = row.dtype.type(0)
        for s in range(row.shape[0]):
            total += row[s]
        if total > 0:
            inv_total = 1 / total
            for s in range(row.shape[0]):
                row[s] *= inv_total


def causal_attention(q, k, v, key_mask, start, scale, empty=np.empty, new_k=None, new_v=None):
    """q: [B, T, H, D], k, v: [B, H, S, D], key_mask: [B, S] bool -> [B, T, H*D].

    Attention of new queries (absolute positions start..start+T-1) over keys 0..S-1, causal and
    masked; see `ops.causal_attention`. Keys past start+T-1 are never visible, so k and v may be
    a whole cache of which only the first start+T positions are filled.

    new_k, new_v: [B, N, H, D] (N >= T), when given, are the keys and values of the N positions
    up to the last query's, written into k and v (a cache) first. For a prompt each thread
    writes its own heads just before it reads them back, where a copy of its own took 0.4 ms a
    layer of one core at 512 positions.

    One new position per row (decoding) goes through one Numba pass over the cache; give it
    the C-contiguous cache arrays themselves (not a slice) and its inner loops vectorise. With
    at most FEW_ROWS rows the step's products run in Numba's pool too, and so does this pass.
    Several positions (a prompt) go through two BLAS products around a Numba softmax.
    """
    B, T, H, D = q.shape
    address = _GEMM_ADDRESS.get(q.dtype.type)
    in_pool = (T > 1 and address is not None and q.dtype == k.dtype == v.dtype
               and all(map(_blas_rows, (q[:, :, 0], k[:, 0], v[:, 0]))))
    first_new = start + T - (0 if new_k is None else new_k.shape[1])  # the position of new_k[:, 0]
    if new_k is not None and not in_pool:  # in the pool each thread writes its own heads
        k[:, :, first_new:start + T] = new_k.transpose(0, 2, 1, 3)
        v[:, :, first_new:start + T] = new_v.transpose(0, 2, 1, 3)
    if T == 1:
        out = np.empty((B, T, H, D), dtype=q.dtype)
        attend = _attend_over_cache_parallel if B <= FEW_ROWS else _attend_over_cache
        attend(np.ascontiguousarray(q), k, v, key_mask, start, q.dtype.type(scale), out)
        return out.reshape(B, T, H * D)
    out = empty((B, T, H, D), q.dtype)
    if in_pool:
        block = min(T, _QUERY_BLOCK)
        no_new = q[:, :0]
        with blas_single_threaded_parts() as parts:
            scores = empty((parts, block * (start + T)), q.dtype)
            _prompt_attention_in_pool(address, q, k, v, key_mask, start, q.dtype.type(scale), out, scores,
                                      not key_mask[:, :start + T].all(), q.dtype == np.float32,
                                      no_new if new_k is None else new_k, no_new if new_v is None else new_v,
                                      first_new)
    else:
        run_in_parts(H, lambda h0, h1: _prompt_attention(q, k, v, key_mask, start, scale, h0, h1, out, empty))
    return out.reshape(B, T, H * D)


@numba.njit(**dict(_JIT, parallel=True))
def _prompt_attention_in_pool(address, q, k, v, key_mask, start, scale, out, scores, padded, float32,
                              new_k, new_v, first_new):
    """`causal_attention` for T > 1 positions, into out: [B, T, H, D] C-contiguous: the
    (row, head) pairs cut into len(scores) parts run in Numba's threads, each with its own
    scores: [parts, _QUERY_BLOCK * (start + T)]. Each pair's new keys and values (new_k, new_v:
    [B, N, H, D], N may be 0) are first written into k and v at positions first_new onwards.

    For each pair, the queries in blocks, each against only the keys it can see (a causal
    prompt needs about half of the full T x S products): the block's scores by one ?gemm call,
    their softmax row by row while they sit in cache, the heads by a second call written
    straight into out.
    """
    B, T, H, D = q.shape
    parts = scores.shape[0]
    item = q.itemsize
    pairs = B * H
    per_part = (pairs + parts - 1) // parts
    zero = q.dtype.type(0)
    for part in numba.prange(parts):
        norms = np.empty(_QUERY_BLOCK, dtype=q.dtype)
        for pair in range(part * per_part, min(pairs, (part + 1) * per_part)):
            b, h = pair // H, pair % H
            for t in range(new_k.shape[1]):
                for d in range(D):
                    k[b, h, first_new + t, d] = new_k[b, t, h, d]
                    v[b, h, first_new + t, d] = new_v[b, t, h, d]
            q_at = q.ctypes.data + b * q.strides[0] + h * q.strides[2]
            k_at = k.ctypes.data + b * k.strides[0] + h * k.strides[1]
            v_at = v.ctypes.data + b * v.strides[0] + h * v.strides[1]
            for t0 in range(0, T, _QUERY_BLOCK):
                t1 = min(T, t0 + _QUERY_BLOCK)
                visible = start + t1
                block = scores[part, :(t1 - t0) * visible].reshape((t1 - t0, visible))
                _gemm(address, True, t1 - t0, visible, D, q_at + t0 * q.strides[1], q.strides[1] // item,  # q.k
                      k_at, k.strides[2] // item, zero, block.ctypes.data, visible)
                for t in range(t1 - t0):
                    norms[t] = _softmax_visible_(block[t], min(start + t0 + t + 1, visible), key_mask[b], padded,
                                                 scale, float32)
                _gemm(address, False, t1 - t0, D, visible, block.ctypes.data, visible,               # weights @ v
                      v_at, v.strides[2] // item, zero, out[b, t0:, h].ctypes.data, H * D)
                for t in range(t1 - t0):  # the softmax's division, on D values a row instead of `visible`
                    heads = out[b, t0 + t, h]
                    for d in range(D):
                        heads[d] *= norms[t]


@numba.njit(**_JIT)
def _softmax_visible_(row, last, key_mask, padded, scale, float32):
    """row: [S] of q.k, in place -> exp(scale * q.k - its maximum) over the keys s < last whose
    key_mask is set (all of them unless padded), 0 elsewhere; returns 1 / their sum, by which
    the caller scales the weighted values to make this a softmax (0 for a row that sees no key,
    which stays all 0)."""
    S = row.shape[0]
    row_max = row.dtype.type(-np.inf)  # every scalar here of row's dtype: float64 ones make the loops slow
    if float32:
        row_max = _max_float32(row, last, key_mask, padded)
    else:
        for s in range(last):
            if not padded or key_mask[s]:
                row_max = max(row_max, row[s])
    if row_max == -np.inf:
        last = 0
    shift = row_max * scale
    if float32:
        _exp_float32_(row, last, scale, shift)
    else:
        for s in range(last):
            row[s] = math.exp(row[s] * scale - shift)
    if padded:
        for s in range(last):
            if not key_mask[s]:
                row[s] = 0
    for s in range(last, S):
        row[s] = 0
    return row.dtype.type(1) / _sum(row[:last]) if last else row.dtype.type(0)


@numba.njit(**_JIT)
def _max_float32(row, last, key_mask, padded):
    """The largest of row[:last] (float32) where key_mask is set (everywhere unless padded),
    -inf if none.

    Taken over integers that order as the floats do (the bits of a negative float with all but
    the sign flipped): LLVM vectorises an integer maximum, not a float one, and this loop ran
    in a third of the time of the float loop here. A NaN comes out as NaN or is passed over,
    and either way the NaN itself makes the row's softmax NaN.
    """
    bits = row[:last].view(np.int32)
    flip, smallest = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
    largest = smallest
    for s in range(last):
        b = bits[s]
        key = b ^ ((b >> np.int32(31)) & flip)
        largest = max(largest, key if not padded or key_mask[s] else smallest)
    if largest == smallest:
        return np.float32(-np.inf)
    return _float32_from_bits(largest ^ ((largest >> np.int32(31)) & flip))


@numba.njit(**dict(_JIT, fastmath={"reassoc"}))
def _sum(x):
    """The sum of x: [N], in any order (so that it vectorises)."""
    total = x.dtype.type(0)
    for i in range(x.shape[0]):
        total += x[i]
    return total


@numba.njit(**_JIT)
def _exp_float32_(row, n, scale, shift):
    """row[:n] <- exp(row[:n] * scale - shift) in float32, for arguments up to about 0 (a
    softmax's, centred on the row's maximum); 0 below -87, past float32's smallest normal; NaN
    for NaN.

    Cephes' expf (relative error under 2e-7): exp(t) = 2^k exp(r), k = round(t / ln 2), r = t -
    k ln 2 in two parts, exp(r) a polynomial, times 2^k made from its exponent bits (exact: the
    results are normal floats). Unlike math.exp it has no call in the loop, so the loop
    vectorises. No fastmath: reassociation would merge the two parts of k ln 2.
    """
    log2e = np.float32(1.44269504088896341)
    ln2_hi, ln2_lo = np.float32(0.693359375), np.float32(-2.12194440e-4)
    floor = np.float32(-87.0)
    for s in range(n):
        t = row[s] * scale - shift
        kept = t >= floor
        u = t if kept else floor  # below the floor, and NaN, need no polynomial
        k = np.floor(u * log2e + np.float32(0.5))
        r = u - k * ln2_hi
        r = r - k * ln2_lo
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * r * r + r + np.float32(1)
        two_to_k = _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
        row[s] = p * two_to_k if kept else (t if t != t else np.float32(0))  # a NaN stays NaN


def _blas_rows(a):
    """Whether a: [..., rows, n] can be a BLAS operand as it is: unit steps along a row, and a
    step between rows that is a whole number of elements and at least a row long."""
    row_step, step = a.strides[-2:]
    return step == a.itemsize and row_step % a.itemsize == 0 and row_step >= a.shape[-1] * a.itemsize


def _prompt_attention(q, k, v, key_mask, start, scale, h0, h1, out, empty=np.empty):
    """`causal_attention` of heads h0..h1-1 for T > 1 positions, into out: [B, T, H, D].

    Queries in blocks, each against only the keys it can see: a causal prompt needs about half
    of the full T x S products, and a block's scores stay in cache. The buffers are made once:
    a fresh array per block costs page faults that showed as half the time here.
    """
    B, T, H, D = q.shape
    q, k, v = q[:, :, h0:h1].transpose(0, 2, 1, 3), k[:, h0:h1], v[:, h0:h1]    # [B, h, T or S, D]
    H = h1 - h0
    block = min(T, _QUERY_BLOCK)
    scale = q.dtype.type(scale)
    padded = not key_mask[:, :start + T].all()
    scores_buffer = empty((B * H * block * (start + T),), q.dtype)
    heads_buffer = empty((B, H, block, D), q.dtype)
    max_buffer = empty((B, H, block), q.dtype)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        visible = start + t1
        scores = scores_buffer[:B * H * (t1 - t0) * visible].reshape(B, H, t1 - t0, visible)
        np.matmul(q[:, :, t0:t1], k[:, :, :visible].transpose(0, 1, 3, 2), out=scores)  # [B, h, t, s]
        if padded:
            _scale_mask_center_(scores, key_mask[:, :visible], start + t0, scale)
        else:
            # Without padding only the future is masked, and NumPy's vectorised maximum finds
            # the row maxima (LLVM does not vectorise a float max in Numba): the pass took 0.23
            # against 0.08 ms for 6 heads of 128 x 512 here.
            _hide_future_(scores, start + t0)
            row_max = max_buffer[:, :, :t1 - t0]
            np.max(scores, axis=-1, out=row_max)
            _scale_center_(scores, row_max, start + t0, scale)
        np.exp(scores, out=scores)
        _normalise_rows_(scores.reshape(-1, visible))
        heads = heads_buffer[:, :, :t1 - t0]
        np.matmul(scores, v[:, :, :visible], out=heads)                        # [B, h, t, D]
        out[:, t0:t1, h0:h1] = heads.transpose(0, 2, 1, 3)


_QUERY_BLOCK = 64


# ---- a whole block for one decoding step --------------------------------------------------

@numba.njit(**_FAST)
def _decode_block(x, ln_1_gain, ln_1_shift, qkv_rows, qkv_bias, attn_out_rows, attn_out_bias,
                  ln_2_gain, ln_2_shift, fc_rows, fc_bias, mlp_out_rows, mlp_out_bias,
                  k, v, key_mask, start, scale, eps, float32):
    """One block for one new position per row, x: [B, C] updated in place; k, v: [B, H, S, D]
    (the layer's cache, position `start` written here); weights as [out, in] rows; `float32`
    says which GELU loop (see `_bias_gelu`).

    The same maths as `GPT2._attention` and `GPT2._mlp`, through the same loops, in one call.
    """
    B, C = x.shape
    H, D = k.shape[1], k.shape[3]
    h = np.empty_like(x)
    _layer_norm_rows(x, ln_1_gain, ln_1_shift, eps, h)                       # ln_1(x)
    qkv = np.empty((B, 3 * C), dtype=x.dtype)
    _few_rows_times(h, qkv_rows, qkv)                                          # h @ c_attn.W
    q = np.empty((B, 1, H, D), dtype=x.dtype)
    for b in range(B):                                                         # + c_attn.b, split
        for i in range(H * D):
            q[b, 0, i // D, i % D] = qkv[b, i] + qkv_bias[i]
            k[b, i // D, start, i % D] = qkv[b, C + i] + qkv_bias[C + i]
            v[b, i // D, start, i % D] = qkv[b, 2 * C + i] + qkv_bias[2 * C + i]
    heads = np.empty((B, 1, H, D), dtype=x.dtype)
    _attend_over_cache_parallel(q, k, v, key_mask, start, scale, heads)
    projected = np.empty_like(x)
    _few_rows_times(heads.reshape(B, C), attn_out_rows, projected)
    _add_with_bias_(x, projected, attn_out_bias)                               # x += attn(ln_1(x))
    _layer_norm_rows(x, ln_2_gain, ln_2_shift, eps, h)                       # ln_2(x)
    F = fc_rows.shape[0]
    widened = np.empty((B, F), dtype=x.dtype)
    _few_rows_times(h, fc_rows, widened)
    activated = np.empty_like(widened)
    if float32:
        _bias_gelu_rows_float32(widened, fc_bias, activated, 0, F)
    else:
        _bias_gelu_rows(widened, fc_bias, activated, 0, F)
    _few_rows_times(activated, mlp_out_rows, projected)
    _add_with_bias_(x, projected, mlp_out_bias)                                # x += mlp(ln_2(x))


@numba.njit(**_FAST)
def _add_with_bias_(x, y, bias):
    """x: [B, C] += y: [B, C] + bias: [C], in place."""
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            x[b, c] += y[b, c] + bias[c]


def decode_block(x, block, k, v, key_mask, start, scale, eps):
    """x: [B, C], B <= FEW_ROWS rows of one new position each, updated in place: the block
    `block` (a `model.Block`) with its keys and values written to k, v: [B, H, S, D] at
    `start`; key_mask: [B, S] (see `causal_attention`).

    `GPT2._attention` and `GPT2._mlp` for a decoding step in one Numba call, with no Python
    between the steps of the block: for 12 layers the time outside the loops went from 0.73
    to 0.50 ms a step, and batch-8 decoding 5-8% faster.
    """
    attn, mlp = block.attn, block.mlp
    _decode_block(x, block.ln_1.weight, block.ln_1.bias, stored_rows(attn.c_attn.weight), attn.c_attn.bias,
                  stored_rows(attn.c_proj.weight), attn.c_proj.bias, block.ln_2.weight, block.ln_2.bias,
                  stored_rows(mlp.c_fc.weight), mlp.c_fc.bias, stored_rows(mlp.c_proj.weight), mlp.c_proj.bias,
                  k, v, key_mask, start, x.dtype.type(scale), float(eps), x.dtype == np.float32)
