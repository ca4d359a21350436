"""A decoding step: products of a few rows, attention of one query over the cache, and a whole
block in one Numba call.

A decoding step reads every weight once per token, so its speed is that of streaming the
weights through memory. The model stores each matrix as [out, in] rows (`weight_t`, see
`common.transposed_contiguous`), so `few_rows_matmul` gives each thread contiguous runs of
rows to dot with x, whatever the format they are stored in (`stored`). Up to FEW_ROWS rows a
step runs each block as one call (`decode_block`), the same loops with no Python between them.

Threads: all of a step's parallel loops run in Numba's pool. Two pools taking turns fight for
the cores, because each one's idle workers spin for a while after their last task: Numba's
loops right after a multi-threaded BLAS product, or the parallel attention between the BLAS
products of a many-row step, lose most of their time to that. Hence two builds of the attention
over the cache: the parallel one for steps whose products run in Numba's pool too, the serial
one for steps whose products go to the BLAS.
"""

import math

import numba
import numpy as np
from numba.extending import overload

from .common import FAST, PARALLEL, start_numba_threads, transposed_contiguous
from .elementwise import add_with_bias_, bias_gelu_rows_of_dtype, layer_norm_rows
from .stored import weight, weight_row


@numba.njit(inline="always", **FAST)
def dot_rows(row, x, out, n):
    """out[:, n] = x: [M, K] @ row: [K], four rows of x at a time while the row sits in L1; row
    as `stored.weight_row` gives it, each weight read by `stored.weight`."""
    M, K = x.shape
    zero = out.dtype.type(0)
    m = 0
    while m + 4 <= M:
        s0 = s1 = s2 = s3 = zero
        for k in range(K):
            w = weight(row, k)
            s0 += w * x[m, k]
            s1 += w * x[m + 1, k]
            s2 += w * x[m + 2, k]
            s3 += w * x[m + 3, k]
        out[m, n], out[m + 1, n], out[m + 2, n], out[m + 3, n] = s0, s1, s2, s3
        m += 4
    while m < M:
        s0 = zero
        x_row = x[m]
        for k in range(K):
            s0 += weight(row, k) * x_row[k]
        out[m, n] = s0
        m += 1


@numba.njit(inline="always", **FAST)
def dot_two_rows(row_a, row_b, x_row, out, n_a, n_b):
    """out[0, n_a], out[0, n_b] = row_a @ x_row, row_b @ x_row: two weight rows (as
    `stored.weight_row` gives them) against one row of x, in one loop."""
    s_a = s_b = out.dtype.type(0)
    for k in range(len(x_row)):
        s_a += weight(row_a, k) * x_row[k]
        s_b += weight(row_b, k) * x_row[k]
    out[0, n_a], out[0, n_b] = s_a, s_b


@numba.njit(**PARALLEL)
def few_rows_matmul(x, weight_t, out):
    """out: [M, N] = x: [M, K] @ weight_t.T, weight_t: [N, K] stored as `stored` reads (float
    rows, bfloat16 bits, float16 bits standing for the values times 2**-112, or int8's (q,
    scales)), for a few rows M (see FEW_ROWS).

    The weight's rows are cut into blocks, and threads take blocks, so each thread reads
    contiguous runs through memory; each row is read once and dotted with four rows of x at a
    time while it sits in L1 (`dot_rows`). With one row of x (a step of one sequence) a thread
    takes two blocks far apart at once, a row of each in one loop (`dot_two_rows`): two streams
    through memory keep more reads in flight than one, which narrow weights, doing more work a
    byte, need to stream near float32's rate (bench/EXPERIMENTS.md: two rows of one block
    instead are slower).
    """
    M = x.shape[0]
    N = out.shape[1]
    n_blocks = min(N, 256)
    per_block = (N + n_blocks - 1) // n_blocks
    if M == 1:
        half = (n_blocks + 1) // 2
        x_row = x[0]
        for pair in numba.prange(half):
            for i in range(per_block):
                n_a, n_b = pair * per_block + i, (pair + half) * per_block + i
                if n_b < N:
                    dot_two_rows(weight_row(weight_t, n_a), weight_row(weight_t, n_b), x_row, out, n_a, n_b)
                elif n_a < N:
                    dot_rows(weight_row(weight_t, n_a), x, out, n_a)
    else:
        for block in numba.prange(n_blocks):
            for n in range(block * per_block, min(N, (block + 1) * per_block)):
                dot_rows(weight_row(weight_t, n), x, out, n)


def rows_matmul(x, rows, out):
    """out: [M, N] = x: [M, K] @ rows.T for a few rows M, however `rows` is stored (see
    `stored_rows`): float rows [N, K], bfloat16 bits (uint16) [N, K] or int8's (q, scales) by
    `few_rows_matmul`; float16 bits (int16) [N, K] by `narrow.float16_rows_matmul`, which
    scales x for them.

    Jitted code calls it too: the overload below picks the loop by the types when compiling.
    """
    from . import narrow

    if not isinstance(rows, tuple) and rows.dtype == np.int16:
        narrow.float16_rows_matmul(x, rows, out)
    else:
        few_rows_matmul(x, rows, out)


@overload(rows_matmul, jit_options=FAST)
def _rows_matmul_typed(x, rows, out):
    from .narrow import float16_rows_matmul

    if not isinstance(rows, numba.types.BaseTuple) and rows.dtype == numba.types.int16:
        return lambda x, rows, out: float16_rows_matmul(x, rows, out)
    return lambda x, rows, out: few_rows_matmul(x, rows, out)


def stored_rows(weight):
    """A model's weight -> what `rows_matmul` takes: a float weight [K, N] as its rows [N, K]
    (`common.transposed_contiguous`), a `narrow.NarrowMatrix` as it stores them."""
    from .narrow import NarrowMatrix

    return weight.stored if isinstance(weight, NarrowMatrix) else transposed_contiguous(weight)


@numba.njit(inline="always", **FAST)
def _attend_one(q, k, v, key_mask, start, scale, b, h, t, scores, out):
    """One query, q[b, t, h]: its scores against the visible keys of head h, their softmax, and
    the weighted sum of the values, in one pass over the cache -> out[b, t, h].

    The decoding tier's masked softmax (the prompt's is `attention._softmax_visible_`).
    """
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


@numba.njit(**FAST)
def attend_over_cache(q, k, v, key_mask, start, scale, out):
    """q: [B, T, H, D]; k, v: [B, H, S, D]; key_mask: [B, S]; out: [B, T, H, D].

    Every query through `_attend_one`, on the calling thread. Made for decoding (T small).
    """
    B, T, H, D = q.shape
    scores = np.empty(k.shape[2], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                _attend_one(q, k, v, key_mask, start, scale, b, h, t, scores, out)


@numba.njit(**PARALLEL)
def attend_over_cache_parallel(q, k, v, key_mask, start, scale, out):
    """`attend_over_cache` with the (row, head) pairs shared between Numba's threads."""
    B, T, H, D = q.shape
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        scores = np.empty(k.shape[2], dtype=q.dtype)
        for t in range(T):
            _attend_one(q, k, v, key_mask, start, scale, b, h, t, scores, out)


@numba.njit(**FAST)
def _decode_block(x, ln_1_gamma, ln_1_beta, c_attn_t, c_attn_bias, attn_proj_t, attn_proj_bias,
                  ln_2_gamma, ln_2_beta, c_fc_t, c_fc_bias, mlp_proj_t, mlp_proj_bias,
                  k, v, key_mask, start, scale, eps):
    """One block for T new positions of each of B rows, B * T a few (see FEW_ROWS): x: [B, T, C]
    updated in place; k, v: [B, H, S, D] (the layer's cache, positions start..start+T-1 written
    here); each matrix as `stored_rows` gives it ([out, in] rows, float or narrow).

    The same maths as `ops.block`, line by line in the comments, through the same loops as a
    prompt's, in one call.
    """
    B, T, C = x.shape
    H, D = k.shape[1], k.shape[3]
    rows = x.reshape(B * T, C)                                                 # a view of x
    h = np.empty_like(rows)
    layer_norm_rows(rows, ln_1_gamma, ln_1_beta, eps, h)                       # h = ln_1(x)
    qkv = np.empty((B * T, 3 * C), dtype=x.dtype)
    rows_matmul(h, c_attn_t, qkv)                                              # h @ c_attn.weight
    q = np.empty((B, T, H, D), dtype=x.dtype)
    for r in range(B * T):                                                     # + c_attn.bias, split
        b, t = r // T, r % T
        for i in range(H * D):
            q[b, t, i // D, i % D] = qkv[r, i] + c_attn_bias[i]
            k[b, i // D, start + t, i % D] = qkv[r, C + i] + c_attn_bias[C + i]
            v[b, i // D, start + t, i % D] = qkv[r, 2 * C + i] + c_attn_bias[2 * C + i]
    heads = np.empty((B, T, H, D), dtype=x.dtype)
    attend_over_cache_parallel(q, k, v, key_mask, start, scale, heads)
    projected = np.empty_like(rows)
    rows_matmul(heads.reshape(B * T, C), attn_proj_t, projected)
    add_with_bias_(rows, projected, attn_proj_bias)                            # x = x + attention(ln_1(x))
    layer_norm_rows(rows, ln_2_gamma, ln_2_beta, eps, h)                       # h = ln_2(x)
    F = c_fc_bias.shape[0]
    widened = np.empty((B * T, F), dtype=x.dtype)
    rows_matmul(h, c_fc_t, widened)
    activated = np.empty_like(widened)
    bias_gelu_rows_of_dtype(widened, c_fc_bias, activated, 0, F)
    rows_matmul(activated, mlp_proj_t, projected)
    add_with_bias_(rows, projected, mlp_proj_bias)                             # x = x + mlp(ln_2(x))


def decode_block(x, block, k, v, key_mask, start, scale, eps):
    """x: [B, T, C], B * T <= FEW_ROWS (a decoding step, or a short prompt), updated in place by
    the block `block` (a `model.Block`), its keys and values written to k, v: [B, H, S, D] at
    start..start+T-1; key_mask: [B, S] (see `attention.causal_attention`).

    Twin of `ops.block` for a decoding step or a short prompt, in one Numba call with no Python
    between the steps of the block. A short prompt taking this path, not the prompt's, also
    means a first run compiles only these loops for it. tests/test_model.py holds the steps it
    makes to transformers' logits (`conftest.tolerance`). The block's matrices may be narrow
    (`narrow.NarrowMatrix`): `rows_matmul` reads them.
    """
    start_numba_threads()
    attn, mlp = block.attn, block.mlp
    _decode_block(x, block.ln_1.weight, block.ln_1.bias, stored_rows(attn.c_attn.weight),
                  attn.c_attn.bias, stored_rows(attn.c_proj.weight), attn.c_proj.bias,
                  block.ln_2.weight, block.ln_2.bias, stored_rows(mlp.c_fc.weight), mlp.c_fc.bias,
                  stored_rows(mlp.c_proj.weight), mlp.c_proj.bias,
                  k, v, key_mask, start, x.dtype.type(scale), float(eps))
