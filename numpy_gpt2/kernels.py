"""Numba twins of the hot ops in `ops.py`: same signatures, same results within rounding.

Each public function here has the signature of its namesake in `ops.py` (or, when it fuses two
ops, of their composition); a jitted loop does the work over a 2-D view. The tests feed both
versions the same input and compare them with torch.

Threads: the matrix products (NumPy's BLAS) use every core; these loops run on the calling
thread. After each product the BLAS workers spin for a while waiting for more work, so a Numba
thread pool started right then fights them for the cores: measured here, that made decoding
twenty times slower. The loops are cheap next to the products, so serial is the right call.

Every jitted function has `cache=True`: the compile cost (a few seconds) is paid once per
machine, not once per process.
"""

import math

import numba
import numpy as np

# error_model="numpy": a float division by zero gives inf as in NumPy instead of raising, which
# removes a branch from every division and lets loops vectorise (10x on the GELU here).
_JIT = dict(cache=True, nogil=True, error_model="numpy")
# Reassociation lets LLVM vectorise the sums; it changes only the rounding order. No flag that
# assumes finite values: the masking below relies on -inf.
_FAST = dict(_JIT, fastmath={"reassoc", "contract"})


@numba.njit(**_JIT)
def _layer_norm_rows(x, gamma, beta, eps, out):
    """x, out: [N, C]; out[n] = gamma * (x[n] - mean) / sqrt(var + eps) + beta, sums in float64."""
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


def layer_norm(x, gamma, beta, eps):
    """x: [..., C] -> [..., C]; layernorm over the last axis (see `ops.layer_norm`)."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    _layer_norm_rows(rows, gamma, beta, float(eps), out)
    return out.reshape(x.shape)


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
def _bias_gelu_rows(x, bias, out):
    """x, out: [N, M]; out = gelu(x + bias), gelu(y) = 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))."""
    n_rows, M = x.shape
    c = math.sqrt(2.0 / math.pi)
    for n in range(n_rows):
        for m in range(M):
            y = x[n, m] + bias[m]
            out[n, m] = 0.5 * y * (1.0 + math.tanh(c * (y + 0.044715 * y * y * y)))


@numba.njit(**_JIT)
def _bias_gelu_rows_float32(x, bias, out):
    """`_bias_gelu_rows` for float32 with `_tanh_float32`: no call in the loop, so it vectorises."""
    n_rows, M = x.shape
    c = np.float32(math.sqrt(2.0 / math.pi))
    a = np.float32(0.044715)
    half = np.float32(0.5)
    for n in range(n_rows):
        for m in range(M):
            y = x[n, m] + bias[m]
            out[n, m] = half * y * (1 + _tanh_float32(c * (y + a * y * y * y)))


def _bias_gelu(x, bias, out):
    kernel = _bias_gelu_rows_float32 if x.dtype == np.float32 else _bias_gelu_rows
    kernel(x, bias, out)


def gelu_tanh(x):
    """x: any shape -> same shape; the tanh GELU (see `ops.gelu_tanh`)."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1] if x.ndim else 1)
    out = np.empty_like(rows)
    _bias_gelu(rows, np.zeros(rows.shape[1], rows.dtype), out)
    return out.reshape(x.shape)


def linear_gelu(x, weight, bias):
    """x: [..., in] -> [..., out]: gelu_tanh(x @ weight + bias), the bias added in the GELU pass.

    The twin of `ops.gelu_tanh(ops.linear(x, weight, bias))`.
    """
    y = np.matmul(x, weight)
    out = np.empty_like(y)
    # A separate output, not in place: with input and output the same array LLVM's overlap
    # check fails and the loop runs unvectorised, 8x slower.
    _bias_gelu(y.reshape(-1, y.shape[-1]), bias, out.reshape(-1, y.shape[-1]))
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


@numba.njit(**_FAST)
def _attend_over_cache(q, k, v, key_mask, start, scale, out):
    """q: [B, T, H, D]; k, v: [B, H, S, D]; key_mask: [B, S]; out: [B, T, H, D].

    For each query: scores against the visible keys, their softmax, and the weighted sum of
    values, in one pass over the cache and in the compute dtype. Made for decoding (T small).
    """
    B, T, H, D = q.shape
    S = k.shape[2]
    scores = np.empty(S, dtype=q.dtype)
    zero = q.dtype.type(0)
    for b in range(B):
        for h in range(H):
            for t in range(T):
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
                    continue
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
def _scale_mask_center_(scores, key_mask, start, scale):
    """scores: [B, H, T, S] of q.k, in place -> scale * q.k - row max, -inf where not visible.

    Query t sees keys 0..start+t whose key_mask is set. A row that sees no key is all -inf.
    No exp here: that is left to NumPy's vectorised np.exp.
    """
    B, H, T, S = scores.shape
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = scores[b, h, t]
                last = min(start + t + 1, S)
                row_max = -np.inf
                for s in range(last):
                    if key_mask[b, s]:
                        row_max = max(row_max, row[s] * scale)
                for s in range(S):
                    if s < last and key_mask[b, s] and row_max != -np.inf:
                        row[s] = row[s] * scale - row_max
                    else:
                        row[s] = -np.inf


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


def causal_attention(q, k, v, key_mask, start, scale):
    """q: [B, T, H, D], k, v: [B, H, S, D], key_mask: [B, S] bool -> [B, T, H*D].

    Attention of new queries (absolute positions start..start+T-1) over keys 0..S-1, causal and
    masked; see `ops.causal_attention`. Keys past start+T-1 are never visible, so k and v may be
    a whole cache of which only the first start+T positions are filled.

    One new position per row (decoding) goes through one Numba pass over the cache; give it
    the C-contiguous cache arrays themselves (not a slice) and its inner loops vectorise.
    Several positions (a prompt) go through two BLAS products around a Numba softmax.
    """
    B, T, H, D = q.shape
    if T == 1:
        out = np.empty((B, T, H, D), dtype=q.dtype)
        _attend_over_cache(np.ascontiguousarray(q), k, v, key_mask, start, q.dtype.type(scale), out)
        return out.reshape(B, T, H * D)
    # Queries in blocks, each against only the keys it can see: a causal prompt needs about
    # half of the full T x S products, and a block's scores stay in cache.
    q = q.transpose(0, 2, 1, 3)                                                 # [B, H, T, D]
    out = np.empty((B, T, H, D), dtype=q.dtype)
    for t0 in range(0, T, _QUERY_BLOCK):
        t1 = min(T, t0 + _QUERY_BLOCK)
        visible = start + t1
        scores = np.matmul(q[:, :, t0:t1], k[:, :, :visible].transpose(0, 1, 3, 2))  # [B, H, t, s]
        _scale_mask_center_(scores, key_mask[:, :visible], start + t0, q.dtype.type(scale))
        np.exp(scores, out=scores)
        _normalise_rows_(scores.reshape(-1, visible))
        out[:, t0:t1] = np.matmul(scores, v[:, :, :visible]).transpose(0, 2, 1, 3)
    return out.reshape(B, T, H * D)


_QUERY_BLOCK = 128
