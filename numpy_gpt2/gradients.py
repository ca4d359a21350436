"""The fast twin of the reference training pass: `ops.gpt2`, `ops.cross_entropy`,
`ops.cross_entropy_backward` and `ops.gpt2_backward` in one, for `GPT2.loss_and_grads`.

The maths is the reference's, line for line; what differs is where the numbers live:
- each block's intermediates are kept from the forward pass (the reference recomputes them
  from the block's input), in a `TrainingBuffers` made once per batch shape and reused;
- every product is one BLAS call writing into its buffer (`np.matmul(..., out=)`), each weight's
  gradient straight into the gradient array, in the checkpoint's [in, out] orientation;
- the element-wise steps (layer norm forward and backward, GELU and its derivative, the loss's
  softmax turned into its gradient in place, the embeddings' scatter) are Numba loops over rows.
These loops are serial: between two multi-threaded BLAS calls a second thread pool would spin
against the BLAS's threads for the cores (see docs/performance.md, "One thread pool"), and
the loops are a small part of a step, whose time is the products'.

Tested against the reference on the same inputs (tests/test_gradients.py): float64 to 1e-12 and
float32 to 1e-5 relative to each tensor's largest gradient.
"""

import math

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from . import ops
from .kernels.float32math import exp_shifted_, tanh_float32

_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})


@numba.njit(**_JIT)
def _layer_norm_keep(x, gamma, beta, eps, out, xhat, rstd):
    """x: [N, C] -> out = gamma * xhat + beta, keeping xhat [N, C] and rstd [N] (`ops.layer_norm`)."""
    n, c = x.shape
    for i in range(n):
        mean = x[i].sum() / c
        var = ((x[i] - mean) ** 2).sum() / c
        r = 1 / math.sqrt(var + eps)
        rstd[i] = r
        xhat[i] = (x[i] - mean) * r
        out[i] = gamma * xhat[i] + beta


@numba.njit(**_JIT)
def _layer_norm_backward_add(dout, xhat, rstd, gamma, dx, dgamma, dbeta):
    """dx [N, C] += the input's gradient (`ops.layer_norm_backward`); dgamma, dbeta [C] set."""
    n, c = dout.shape
    dgamma[:] = 0
    dbeta[:] = 0
    for i in range(n):
        g = dout[i] * gamma
        g_mean = g.sum() / c
        gx_mean = (g * xhat[i]).sum() / c
        dx[i] += rstd[i] * (g - g_mean - xhat[i] * gx_mean)
        dgamma += dout[i] * xhat[i]
        dbeta += dout[i]


def _tanh(u):
    """tanh in the loops below: float32's `tanh_float32`, which has no call in it so that the
    loops vectorise, and math.tanh for float64 (see the overload)."""
    return math.tanh(u)


@overload(_tanh, jit_options=_JIT)
def _tanh_for(u):
    if isinstance(u, types.Float) and u.bitwidth == 32:
        return lambda u: tanh_float32(u)
    return lambda u: math.tanh(u)


@numba.njit(**_JIT)
def _bias_gelu_keep(f, bias, g):
    """f [N, F] += bias; g = gelu_tanh(f) (`ops.gelu_tanh`), f kept for the backward."""
    c = f.dtype.type(math.sqrt(2.0 / math.pi))
    a = f.dtype.type(0.044715)
    half = f.dtype.type(0.5)
    for i in range(f.shape[0]):
        f_i, g_i = f[i], g[i]
        for j in range(f.shape[1]):
            x = f_i[j] + bias[j]
            f_i[j] = x
            g_i[j] = half * x * (1 + _tanh(c * (x + a * x * x * x)))


@numba.njit(**_JIT)
def _gelu_backward_(dg, f):
    """dg [N, F] *= gelu_tanh'(f), in place (`ops.gelu_tanh_backward`)."""
    c = f.dtype.type(math.sqrt(2.0 / math.pi))
    a = f.dtype.type(0.044715)
    half = f.dtype.type(0.5)
    for i in range(f.shape[0]):
        f_i, dg_i = f[i], dg[i]
        for j in range(f.shape[1]):
            x = f_i[j]
            t = _tanh(c * (x + a * x * x * x))
            dg_i[j] *= half * (1 + t) + half * x * (1 - t * t) * c * (1 + 3 * a * x * x)


@numba.njit(**_JIT)
def _cross_entropy_to_gradient_(logits, targets, ignore):
    """logits [N, V] -> their gradient in place (`ops.cross_entropy_backward`); -> the loss.

    Row by row: the log-softmax of the target, then softmax - onehot over the counted rows,
    divided by their count; an ignored row's gradient is 0. The loss is nan when no row counts.
    """
    n = logits.shape[0]
    count = 0
    for i in range(n):
        count += targets[i] != ignore
    scale = logits.dtype.type(1 / max(count, 1))
    total = 0.0
    for i in range(n):
        row = logits[i]
        if targets[i] == ignore:
            row[:] = 0
            continue
        top = row.max()
        target_logit = row[targets[i]] - top  # log p(target) = this - log(sum): finite when exp underflows
        exp_shifted_(row, top)
        s = row.sum()
        total += math.log(s) - target_logit
        row *= scale / s
        row[targets[i]] -= scale
    return total / count if count else np.nan


@numba.njit(**_JIT)
def _embedding_backward_add(dx, input_ids, position_ids, dwte, dwpe):
    """dwte [V, C] += dx's rows at their tokens; dwpe [P, C] set to dx's rows summed at their
    positions (`ops.embedding_backward`); dx, input_ids, position_ids flattened to N rows."""
    dwpe[:] = 0
    for i in range(dx.shape[0]):
        dwte[input_ids[i]] += dx[i]
        dwpe[position_ids[i]] += dx[i]


class TrainingBuffers:
    """Everything one forward and backward pass of N = B * T rows writes, made once and reused.

    Per layer: the block's input x [N, C]; xhat_1, h_1 [N, C] and rstd_1 [N] (ln_1); qkv [N, 3C];
    the attention weights [B, H, T, T]; heads [N, C]; xhat_2, h_2, rstd_2 (ln_2); f, g [N, F]
    (c_fc's output, its GELU). Shared: the final layer norm's, the logits [N, V], and the
    gradients' scratch.
    """

    def __init__(self, config, B, T, dtype):
        N, C, F, V, H = B * T, config.n_embd, config.inner_dim, config.vocab_size, config.n_head
        L = config.n_layer

        def make(*shape):
            return np.empty(shape, dtype)

        self.shape = (B, T)
        self.x = make(L, N, C)
        self.xhat_1, self.h_1, self.rstd_1 = make(L, N, C), make(L, N, C), make(L, N)
        self.qkv = make(L, N, 3 * C)
        self.weights = make(L, B, H, T, T)
        self.heads = make(L, N, C)
        self.xhat_2, self.h_2, self.rstd_2 = make(L, N, C), make(L, N, C), make(L, N)
        self.f, self.g = make(L, N, F), make(L, N, F)
        self.residual, self.xhat_f, self.out, self.rstd_f = make(N, C), make(N, C), make(N, C), make(N)
        self.logits = make(N, V)
        self.dx, self.dwide, self.dnarrow, self.dqkv = make(N, C), make(N, F), make(N, C), make(N, 3 * C)


def new_grads(parameters: dict) -> dict:
    """Arrays for the gradients of `parameters` (name -> array): the same names and shapes, each
    laid out in memory as its parameter is (the model's matrices as [out, in] rows), so that the
    optimizer walks a parameter and its gradient in the same order; uninitialised (every pass
    writes each one whole)."""
    return {name: np.empty_like(p) for name, p in parameters.items()}


def _weight_gradient(x_in, dout, out):
    """out [in, out] = x_in^T @ dout (`ops.linear_backward`'s dweight), by one BLAS call whichever
    way `out` is laid out."""
    if out.flags.c_contiguous:
        np.matmul(x_in.T, dout, out=out)
    else:
        np.matmul(dout.T, x_in, out=out.T)


def loss_and_grads(model, ids, key_mask, targets, grads, buffers: TrainingBuffers):
    """One forward and backward pass: ids, key_mask, targets [B, T] (as `inputs.training_batch`
    makes them) -> the loss; every gradient written into `grads` (see `new_grads`)."""
    config, p = model.config, model.parameters()
    B, T = ids.shape
    N, C, H = B * T, config.n_embd, config.n_head
    eps = p["wte.weight"].dtype.type(config.layer_norm_epsilon)
    buf = buffers
    positions = ops.position_ids_from_mask(key_mask).ravel()
    scales = ops.attention_scales(config)

    def matmul(a, b, out):
        return np.matmul(a, b, out=out)

    # ---- forward, keeping each block's intermediates ----
    x = buf.residual
    np.take(p["wte.weight"], ids.ravel(), axis=0, out=x)
    x += p["wpe.weight"][positions]
    for layer in range(config.n_layer):
        name = f"h.{layer}."
        buf.x[layer] = x
        _layer_norm_keep(x, p[name + "ln_1.weight"], p[name + "ln_1.bias"], eps, buf.h_1[layer],
                         buf.xhat_1[layer], buf.rstd_1[layer])
        qkv = matmul(buf.h_1[layer], p[name + "attn.c_attn.weight"], buf.qkv[layer])
        qkv += p[name + "attn.c_attn.bias"]
        q, k, v = ops.split_heads(qkv.reshape(B, T, 3 * C), H)
        buf.weights[layer] = ops.attention_weights(q, k, key_mask, 0, scales[layer])
        buf.heads[layer] = ops.combine_heads(buf.weights[layer] @ v).reshape(N, C)
        x += matmul(buf.heads[layer], p[name + "attn.c_proj.weight"], buf.dnarrow)     # x = x + attention(ln_1(x))
        x += p[name + "attn.c_proj.bias"]
        _layer_norm_keep(x, p[name + "ln_2.weight"], p[name + "ln_2.bias"], eps, buf.h_2[layer],
                         buf.xhat_2[layer], buf.rstd_2[layer])
        _bias_gelu_keep(matmul(buf.h_2[layer], p[name + "mlp.c_fc.weight"], buf.f[layer]),
                        p[name + "mlp.c_fc.bias"], buf.g[layer])
        x += matmul(buf.g[layer], p[name + "mlp.c_proj.weight"], buf.dnarrow)          # x = x + mlp(ln_2(x))
        x += p[name + "mlp.c_proj.bias"]
    _layer_norm_keep(x, p["ln_f.weight"], p["ln_f.bias"], eps, buf.out, buf.xhat_f, buf.rstd_f)
    dlogits = matmul(buf.out, p["wte.weight"].T, buf.logits)                           # logits

    # ---- the loss, and back ----
    loss = _cross_entropy_to_gradient_(dlogits, targets.ravel(), ops.IGNORE_INDEX)
    _weight_gradient(buf.out, dlogits, grads["wte.weight"].T)                          # the tied head
    dx = buf.dx
    dx[:] = 0
    _layer_norm_backward_add(matmul(dlogits, p["wte.weight"], buf.dnarrow), buf.xhat_f, buf.rstd_f,
                             p["ln_f.weight"], dx, grads["ln_f.weight"], grads["ln_f.bias"])
    for layer in reversed(range(config.n_layer)):
        name = f"h.{layer}."

        def linear_backward(dout, x_in, part, dx_out):
            """`ops.linear_backward` into the gradient arrays; dx_out = dout @ weight^T."""
            _weight_gradient(x_in, dout, grads[name + part + ".weight"])
            np.sum(dout, axis=0, out=grads[name + part + ".bias"])
            return matmul(dout, p[name + part + ".weight"].T, dx_out)

        # x_out = x_2 + mlp(ln_2(x_2)): dx passes to x_2 as it is, and through the MLP
        dwide = linear_backward(dx, buf.g[layer], "mlp.c_proj", buf.dwide)
        _gelu_backward_(dwide, buf.f[layer])
        dh_2 = linear_backward(dwide, buf.h_2[layer], "mlp.c_fc", buf.dnarrow)
        _layer_norm_backward_add(dh_2, buf.xhat_2[layer], buf.rstd_2[layer], p[name + "ln_2.weight"], dx,
                                 grads[name + "ln_2.weight"], grads[name + "ln_2.bias"])
        # x_2 = x + attention(ln_1(x)): the same again
        dheads = linear_backward(dx, buf.heads[layer], "attn.c_proj", buf.dnarrow)
        q, k, v = ops.split_heads(buf.qkv[layer].reshape(B, T, 3 * C), H)
        dq, dk, dv = ops.attention_backward(dheads.reshape(B, T, C), q, k, v, buf.weights[layer], scales[layer])
        buf.dqkv[:] = ops.split_heads_backward(dq, dk, dv).reshape(N, 3 * C)
        dh_1 = linear_backward(buf.dqkv, buf.h_1[layer], "attn.c_attn", buf.dnarrow)
        _layer_norm_backward_add(dh_1, buf.xhat_1[layer], buf.rstd_1[layer], p[name + "ln_1.weight"], dx,
                                 grads[name + "ln_1.weight"], grads[name + "ln_1.bias"])
    _embedding_backward_add(dx, ids.ravel(), positions, grads["wte.weight"], grads["wpe.weight"])
    return float(loss)
