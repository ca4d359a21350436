"""Causal, masked attention of new queries over the cache: one query per row in one Numba pass
(`decode`), a prompt's queries through two BLAS products around a float32 softmax.

A prompt's attention is cut into groups of (row, head) pairs, one per thread, in Numba's pool,
each pair's products one ?gemm call (`blas.gemm`); where the BLAS's ?gemm is not found, into
groups of heads in `threads.run_in_parts`, each product an np.matmul. Both take the queries in
blocks of _QUERY_BLOCK, each against only the keys it can see (a causal prompt needs about half
of the full T x S products), and both use the one masked softmax of a prompt,
`_softmax_visible_`.
"""

import math

import numba
import numpy as np

from ..threads import blas_single_threaded_parts, run_in_parts, start_numba_threads
from .blas import GEMM_ADDRESS, blas_rows, gemm
from .common import FEW_ROWS, JIT
from .decode import attend_over_cache, attend_over_cache_parallel
from .float32math import exp_float32_, max_float32

_QUERY_BLOCK = 64


def causal_attention(q, k, v, key_mask, start, scale, workspace=None, new_k=None, new_v=None):
    """q: [B, T, H, D], k, v: [B, H, S, D], key_mask: [B, S] bool -> [B, T, H*D].

    Twin of `ops.attention`: attention of new queries (absolute positions start..start+T-1)
    over keys 0..S-1, causal and masked. Keys past start+T-1 are never visible, so k and v may
    be a whole cache of which only the first start+T positions are filled. tests/test_kernels.py
    holds it to torch's scaled_dot_product_attention within rtol 1e-5, atol 1e-6 in float32
    (1e-12 in float64), and a padded prompt within rtol 1e-5, atol 1e-5 (values weighted over
    up to 171 keys).

    new_k, new_v: [B, N, H, D] (N >= T), when given, are the keys and values of the N positions
    up to the last query's, written into k and v (a cache) first. For a prompt in Numba's pool
    each thread writes its own heads just before it reads them back, instead of a copy of its
    own on one core. workspace: where the result and the scores come from for a prompt
    (`workspace.empty`, see `memory.Workspace`); np.empty when None.

    One new position per row (decoding) goes through one Numba pass over the cache; give it
    the C-contiguous cache arrays themselves (not a slice) and its inner loops vectorise. With
    at most FEW_ROWS rows the step's products run in Numba's pool too, and so does this pass.
    """
    B, T, H, D = q.shape
    start_numba_threads()
    empty = np.empty if workspace is None else workspace.empty
    address = GEMM_ADDRESS.get(q.dtype.type)
    in_pool = (T > 1 and address is not None and q.dtype == k.dtype == v.dtype
               and all(map(blas_rows, (q[:, :, 0], k[:, 0], v[:, 0]))))
    first_new = start + T - (0 if new_k is None else new_k.shape[1])  # the position of new_k[:, 0]
    if new_k is not None and not in_pool:  # in the pool each thread writes its own heads
        k[:, :, first_new:start + T] = new_k.transpose(0, 2, 1, 3)
        v[:, :, first_new:start + T] = new_v.transpose(0, 2, 1, 3)
    if T == 1:
        out = np.empty((B, T, H, D), dtype=q.dtype)
        attend = attend_over_cache_parallel if B <= FEW_ROWS else attend_over_cache
        attend(np.ascontiguousarray(q), k, v, key_mask, start, q.dtype.type(scale), out)
        return out.reshape(B, T, H * D)
    out = empty((B, T, H, D), q.dtype)
    padded = not key_mask[:, :start + T].all()
    float32 = q.dtype == np.float32
    if in_pool:
        block = min(T, _QUERY_BLOCK)
        no_new = q[:, :0]
        with blas_single_threaded_parts() as parts:
            scores = empty((parts, block * (start + T)), q.dtype)
            _prompt_attention_in_pool(address, q, k, v, key_mask, start, q.dtype.type(scale), out, scores,
                                      padded, float32, no_new if new_k is None else new_k,
                                      no_new if new_v is None else new_v, first_new)
    else:
        run_in_parts(H, lambda h0, h1: _prompt_attention(q, k, v, key_mask, start, scale, padded, float32,
                                                         h0, h1, out, empty))
    return out.reshape(B, T, H * D)


@numba.njit(**dict(JIT, parallel=True))
def _prompt_attention_in_pool(address, q, k, v, key_mask, start, scale, out, scores, padded, float32,
                              new_k, new_v, first_new):
    """`causal_attention` for T > 1 positions, into out: [B, T, H, D] C-contiguous: the
    (row, head) pairs cut into len(scores) parts run in Numba's threads, each with its own
    scores: [parts, _QUERY_BLOCK * (start + T)]. Each pair's new keys and values (new_k, new_v:
    [B, N, H, D], N may be 0) are first written into k and v at positions first_new onwards.

    For each pair, the queries in blocks, each against only the keys it can see: the block's
    scores by one ?gemm call, their softmax row by row while they sit in cache, the heads by a
    second call written straight into out, then scaled by the softmax's 1 / sum.
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
                gemm(address, True, t1 - t0, visible, D, q_at + t0 * q.strides[1], q.strides[1] // item,  # q.k
                     k_at, k.strides[2] // item, zero, block.ctypes.data, visible)
                for t in range(t1 - t0):
                    norms[t] = _softmax_visible_(block[t], min(start + t0 + t + 1, visible), key_mask[b], padded,
                                                 scale, float32)
                gemm(address, False, t1 - t0, D, visible, block.ctypes.data, visible,                  # weights @ v
                     v_at, v.strides[2] // item, zero, out[b, t0:, h].ctypes.data, H * D)
                for t in range(t1 - t0):  # the softmax's division, on D values a row instead of `visible`
                    heads = out[b, t0 + t, h]
                    for d in range(D):
                        heads[d] *= norms[t]


@numba.njit(**JIT)
def _softmax_visible_(row, last, key_mask, padded, scale, float32):
    """row: [S] of q.k, in place -> exp(scale * q.k - its maximum) over the keys s < last whose
    key_mask is set (all of them unless padded), 0 elsewhere; returns 1 / their sum, by which
    the caller scales the result to make this a softmax (0 for a row that sees no key, which
    stays all 0).

    The prompt's masked softmax, for both paths (the decoding tier's is `decode._attend_one`).
    The division is left to the caller: in the pool it is made on the D values of a head
    after the second product instead of the `last` weights.
    """
    S = row.shape[0]
    row_max = row.dtype.type(-np.inf)  # every scalar here of row's dtype: float64 ones make the loops slow
    if float32:
        row_max = max_float32(row, last, key_mask, padded)
    else:
        for s in range(last):
            if not padded or key_mask[s]:
                row_max = max(row_max, row[s])
    if row_max == -np.inf:
        last = 0
    shift = row_max * scale
    if float32:
        exp_float32_(row, last, scale, shift)
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


@numba.njit(**dict(JIT, fastmath={"reassoc"}))
def _sum(x):
    """The sum of x: [N], in any order (so that it vectorises)."""
    total = x.dtype.type(0)
    for i in range(x.shape[0]):
        total += x[i]
    return total


@numba.njit(**JIT)
def _softmax_rows_(scores, key_mask, start, scale, padded, float32):
    """scores: [B, H, T, S] of q.k for queries at positions start..start+T-1, in place ->
    softmax(scale * q.k) over the keys each query sees (`_softmax_visible_`, then its division);
    a row that sees no key all 0."""
    B, H, T, S = scores.shape
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = scores[b, h, t]
                norm = _softmax_visible_(row, min(start + t + 1, S), key_mask[b], padded, scale, float32)
                for s in range(S):
                    row[s] *= norm


def _prompt_attention(q, k, v, key_mask, start, scale, padded, float32, h0, h1, out, empty=np.empty):
    """`causal_attention` of heads h0..h1-1 for T > 1 positions, into out: [B, T, H, D], by
    np.matmul: the path where the BLAS's ?gemm is not found.

    Queries in blocks, each against only the keys it can see, a block's scores staying in
    cache. The buffers are made once: a fresh array per block costs page faults.
    """
    B, T, H, D = q.shape
    q, k, v = q[:, :, h0:h1].transpose(0, 2, 1, 3), k[:, h0:h1], v[:, h0:h1]    # [B, h, T or S, D]
    H = h1 - h0
    block = min(T, _QUERY_BLOCK)
    scale = q.dtype.type(scale)
    scores_buffer = empty((B * H * block * (start + T),), q.dtype)
    heads_buffer = empty((B, H, block, D), q.dtype)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        visible = start + t1
        scores = scores_buffer[:B * H * (t1 - t0) * visible].reshape(B, H, t1 - t0, visible)
        np.matmul(q[:, :, t0:t1], k[:, :, :visible].transpose(0, 1, 3, 2), out=scores)  # [B, h, t, s]
        _softmax_rows_(scores, key_mask, start + t0, scale, padded, float32)
        heads = heads_buffer[:, :, :t1 - t0]
        np.matmul(scores, v[:, :, :visible], out=heads)                        # [B, h, t, D]
        out[:, t0:t1, h0:h1] = heads.transpose(0, 2, 1, 3)
