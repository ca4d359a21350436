"""The maths of GPT-2 in plain NumPy, one function per equation.

These are the reference versions: short enough to check against the paper line by line.
`kernels.py` holds Numba twins of the hot ones with the same signatures; the tests feed both the
same input. Shapes: B batch, T new positions, S key positions (cached + new), C n_embd,
H heads, D head size (C = H * D), V vocab.

Every constant is made in the dtype of the array it meets, so float32 stays float32.
"""

import math

import numpy as np


def layer_norm(x, gamma, beta, eps):
    """x: [..., C] -> [..., C]; normalise over the last axis, then scale and shift."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return gamma * (x - mean) / np.sqrt(var + x.dtype.type(eps)) + beta


def gelu_tanh(x):
    """x: any shape; GELU with the tanh approximation GPT-2 was trained with ('gelu_new')."""
    c = x.dtype.type(math.sqrt(2.0 / math.pi))
    a = x.dtype.type(0.044715)
    half = x.dtype.type(0.5)
    return half * x * (1 + np.tanh(c * (x + a * x**3)))


def softmax(x):
    """x: [..., N] -> [..., N]; exp normalised over the last axis (max subtracted for range)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def linear(x, weight, bias):
    """x: [..., in] @ weight: [in, out] + bias: [out] -> [..., out] (GPT-2's 'Conv1D')."""
    return x @ weight + bias


def attention_weights(q, k, key_mask, start, scale):
    """softmax(scale * q.k) over the keys each query may see: [B, H, T, S].

    q: [B, T, H, D] queries for absolute positions start .. start+T-1
    k: [B, H, S, D] keys for positions 0 .. S-1 (S = start + T)
    key_mask: [B, S] bool, False for padding keys that no query may see
    A query that can see no key at all gets all-zero weights.
    """
    T, S = q.shape[1], k.shape[2]
    q_pos = start + np.arange(T)[:, None]                                   # [T, 1]
    visible = (np.arange(S)[None, :] <= q_pos)[None] & key_mask[:, None, :]  # [B, T, S]
    scores = np.einsum("bthd,bhsd->bhts", q, k) * q.dtype.type(scale)      # [B, H, T, S]
    scores = np.where(visible[:, None], scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0))
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1)


def causal_attention(q, k, v, key_mask, start, scale):
    """Scaled dot-product attention of new queries over all keys, causal and masked.

    q: [B, T, H, D] queries for absolute positions start .. start+T-1
    k, v: [B, H, S, D] keys and values for positions 0 .. S-1 (S >= start + T; positions past
        start + T - 1, such as the unfilled end of a cache, are never seen)
    key_mask: [B, S] bool, False for padding keys that no query may see
    scale: the factor on q.k (1/sqrt(D), times 1/(layer+1) when so configured)
    -> [B, T, H*D]; a query that can see no key at all gets zeros.
    """
    B, T, H, D = q.shape
    S = start + T
    weights = attention_weights(q, k[:, :, :S], key_mask[:, :S], start, scale)  # [B, H, T, S]
    out = np.einsum("bhts,bhsd->bthd", weights, v[:, :, :S])                   # [B, T, H, D]
    return out.reshape(B, T, H * D)
