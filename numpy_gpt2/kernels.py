"""Numba twins of the hot ops in `ops.py`: same signatures, same results within rounding.

Each public function here has the signature of its namesake in `ops.py`; a jitted `_..._rows`
loop does the work over a 2-D view. Every jitted function has `cache=True`, so the compile cost
(a few seconds) is paid once per machine, not once per process. Sums run in float64 whatever the
compute dtype: it costs little next to the matrix products and keeps float32 layernorm and
softmax as close to exact as their inputs allow.
"""

import math

import numba
import numpy as np

_JIT = dict(cache=True, nogil=True)


@numba.njit(parallel=True, **_JIT)
def _layer_norm_rows(x, gamma, beta, eps, out):
    """x, out: [N, C]; out[n] = gamma * (x[n] - mean) / sqrt(var + eps) + beta."""
    n_rows, C = x.shape
    for n in numba.prange(n_rows):
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


def layer_norm(x, gamma, beta, eps):
    """x: [..., C] -> [..., C]; layernorm over the last axis (see `ops.layer_norm`)."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    _layer_norm_rows(rows, gamma, beta, float(eps), out)
    return out.reshape(x.shape)


@numba.njit(parallel=True, **_JIT)
def _gelu_tanh_rows(x, out):
    """x, out: [N, M]; out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = math.sqrt(2.0 / math.pi)
    n_rows, M = x.shape
    for n in numba.prange(n_rows):
        for m in range(M):
            v = x[n, m]
            out[n, m] = 0.5 * v * (1.0 + math.tanh(c * (v + 0.044715 * v * v * v)))


def gelu_tanh(x):
    """x: any shape -> same shape; the tanh GELU (see `ops.gelu_tanh`)."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)
    out = np.empty_like(rows)
    _gelu_tanh_rows(rows, out)
    return out.reshape(x.shape)


@numba.njit(parallel=True, **_JIT)
def _softmax_rows(x, out):
    """x, out: [N, M]; out[n] = exp(x[n] - max) / sum(exp(x[n] - max))."""
    n_rows, M = x.shape
    for n in numba.prange(n_rows):
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


@numba.njit(parallel=True, **_JIT)
def _causal_attention_heads(q, k, v, key_mask, start, scale, out):
    """q: [B, T, H, D]; k, v: [B, H, S, D]; key_mask: [B, S]; out: [B, T, H, D], zeroed.

    One (batch row, head) pair per parallel iteration; for each query the scores over the
    visible keys, their softmax, and the weighted sum of values, in one pass over the cache.
    """
    B, T, H, D = q.shape
    S = k.shape[2]
    scores = np.empty((B * H, S))
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        row = scores[bh]
        for t in range(T):
            last = min(start + t + 1, S)
            row_max = -np.inf
            for s in range(last):
                if key_mask[b, s]:
                    dot = 0.0
                    for d in range(D):
                        dot += q[b, t, h, d] * k[b, h, s, d]
                    row[s] = dot * scale
                    row_max = max(row_max, row[s])
            if row_max == -np.inf:
                continue
            total = 0.0
            for s in range(last):
                if key_mask[b, s]:
                    row[s] = math.exp(row[s] - row_max)
                    total += row[s]
            for s in range(last):
                if key_mask[b, s]:
                    w = row[s] / total
                    for d in range(D):
                        out[b, t, h, d] += w * v[b, h, s, d]


def causal_attention(q, k, v, key_mask, start, scale):
    """q: [B, T, H, D], k, v: [B, H, S, D], key_mask: [B, S] bool -> [B, T, H*D].

    Attention of new queries (absolute positions start..start+T-1) over keys 0..S-1, causal and
    masked; see `ops.causal_attention`.
    """
    B, T, H, D = q.shape
    out = np.zeros((B, T, H, D), dtype=q.dtype)
    _causal_attention_heads(q, k, v, key_mask, start, float(scale), out)
    return out.reshape(B, T, H * D)
