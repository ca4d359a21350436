"""GPT-2 in plain NumPy: the reference, one function per equation, each backward under its forward.

Read it top to bottom: the pieces (layer_norm, gelu_tanh, softmax, linear, embedding,
attention), the block they make, then `gpt2`, the whole network, and `cross_entropy`, its
training loss. Each `*_backward` takes the gradient of the loss with respect to its forward's
output and returns the gradients with respect to the forward's inputs, in the order of the
forward's arguments; `gpt2_backward` composes them as `gpt2` composes the forwards.

The fast path (`numpy_gpt2.kernels`) has a twin of each hot function here with the same
signature; the tests feed both the same input, and these against torch's autograd.

Shapes: B batch, T new positions, S key positions (cached + new), C n_embd, H heads, D head size
(C = H * D), F MLP width, V vocab, P n_positions, L layers.

Parameters are nested dicts under the checkpoint's names (see `params_from_tensors`):
`params["h"][3]["attn"]["c_attn"]["weight"]` is the file's `h.3.attn.c_attn.weight`.
Every constant is made in the dtype of the array it meets, so float32 stays float32.
"""

import math

import numpy as np

# ---- layer norm -----------------------------------------------------------------------------


def layer_norm(x, gamma, beta, eps):
    """x: [..., C] -> [..., C]; normalise over the last axis, then scale and shift."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return gamma * (x - mean) / np.sqrt(var + x.dtype.type(eps)) + beta


def layer_norm_backward(dout, x, gamma, eps):
    """dout, x: [..., C]; gamma: [C] -> dx [..., C], dgamma [C], dbeta [C].

    With xhat = (x - mean) * r, r = 1 / sqrt(var + eps), and g = dout * gamma:
    dx = r * (g - mean(g) - xhat * mean(g * xhat)), the two means over the C channels.
    """
    r = 1 / np.sqrt(x.var(axis=-1, keepdims=True) + x.dtype.type(eps))
    xhat = (x - x.mean(axis=-1, keepdims=True)) * r
    g = dout * gamma
    dx = r * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    leading = tuple(range(x.ndim - 1))
    return dx, (dout * xhat).sum(axis=leading), dout.sum(axis=leading)


# ---- GELU -------------------------------------------------------------------------------------


def gelu_tanh(x):
    """x: any shape; GELU with the tanh approximation GPT-2 was trained with ('gelu_new'):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    c = x.dtype.type(math.sqrt(2.0 / math.pi))
    a = x.dtype.type(0.044715)
    half = x.dtype.type(0.5)
    return half * x * (1 + np.tanh(c * (x + a * x**3)))


def gelu_tanh_backward(dout, x):
    """dout, x: any shape -> dx.

    With u = c (x + a x^3) and t = tanh(u): d/dx [0.5 x (1 + t)] = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2).
    """
    c = x.dtype.type(math.sqrt(2.0 / math.pi))
    a = x.dtype.type(0.044715)
    half = x.dtype.type(0.5)
    t = np.tanh(c * (x + a * x**3))
    return dout * (half * (1 + t) + half * x * (1 - t * t) * c * (1 + 3 * a * x * x))


# ---- softmax ----------------------------------------------------------------------------------


def softmax(x):
    """x: [..., N] -> [..., N]; exp normalised over the last axis (max subtracted for range)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    """x: [..., N] -> [..., N]; log(softmax(x)) = x - max - log(sum(exp(x - max))), over the last axis."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax_backward(dout, y):
    """dout, y = softmax(x): [..., N] -> dx [..., N] = y * (dout - sum(dout * y)), the sum over N.

    (The Jacobian of softmax is diag(y) - y y^T.)
    """
    return y * (dout - (dout * y).sum(axis=-1, keepdims=True))


# ---- linear -----------------------------------------------------------------------------------


def linear(x, weight, bias):
    """x: [..., in] @ weight: [in, out] + bias: [out] -> [..., out] (GPT-2's 'Conv1D')."""
    return x @ weight + bias


def linear_backward(dout, x, weight):
    """dout: [..., out]; x: [..., in]; weight: [in, out] -> dx [..., in], dweight [in, out], dbias [out].

    dx = dout @ weight^T; dweight = x^T @ dout and dbias = sum of dout, both over every row.
    """
    rows_in, rows_out = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    return dout @ weight.T, rows_in.T @ rows_out, rows_out.sum(axis=0)


# ---- embeddings -------------------------------------------------------------------------------


def embedding(wte, wpe, input_ids, position_ids):
    """wte: [V, C], wpe: [P, C], input_ids and position_ids: [B, T] -> x [B, T, C]: a token's row
    plus its position's row."""
    return wte[input_ids] + wpe[position_ids]


def embedding_backward(dx, input_ids, position_ids, vocab_size, n_positions):
    """dx: [B, T, C] -> dwte [V, C], dwpe [P, C]: each row's gradient summed over where it was used."""
    dwte = np.zeros((vocab_size, dx.shape[-1]), dx.dtype)
    dwpe = np.zeros((n_positions, dx.shape[-1]), dx.dtype)
    np.add.at(dwte, input_ids.ravel(), dx.reshape(-1, dx.shape[-1]))
    np.add.at(dwpe, position_ids.ravel(), dx.reshape(-1, dx.shape[-1]))
    return dwte, dwpe


# ---- attention --------------------------------------------------------------------------------


def attention_weights(q, k, key_mask, start, scale):
    """softmax(scale * q.k) over the keys each query may see: [B, H, T, S].

    q: [B, T, H, D] queries for absolute positions start .. start+T-1
    k: [B, H, S, D] keys for positions 0 .. S-1 (S = start + T)
    key_mask: [B, S] bool, False for padding keys that no query may see
    A query sees the keys at its own position and before (causal), padding excepted; one that
    can see no key at all gets all-zero weights.
    """
    T, S = q.shape[1], k.shape[2]
    q_pos = start + np.arange(T)[:, None]                                   # [T, 1]
    visible = (np.arange(S)[None, :] <= q_pos)[None] & key_mask[:, None, :]  # [B, T, S]
    scores = q.transpose(0, 2, 1, 3) @ k.transpose(0, 1, 3, 2) * q.dtype.type(scale)  # [B, H, T, S]
    scores = np.where(visible[:, None], scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0))
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1)


def combine_heads(heads):
    """heads: [B, H, T, D] -> [B, T, H*D], the heads side by side."""
    B, H, T, D = heads.shape
    return heads.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def causal_attention(q, k, v, key_mask, start, scale):
    """Scaled dot-product attention of new queries over all keys, causal and masked.

    q: [B, T, H, D] queries for absolute positions start .. start+T-1
    k, v: [B, H, S, D] keys and values for positions 0 .. S-1 (S >= start + T; positions past
        start + T - 1, such as the unfilled end of a cache, are never seen)
    key_mask: [B, S] bool, False for padding keys that no query may see
    scale: the factor on q.k (1/sqrt(D), times 1/(layer+1) when so configured)
    -> [B, T, H*D]: each head's weighted sum of the values; a query that can see no key at all
    gets zeros.
    """
    S = start + q.shape[1]
    return combine_heads(attention_weights(q, k[:, :, :S], key_mask[:, :S], start, scale) @ v[:, :, :S])


def attention_backward(dout, q, k, v, weights, scale):
    """The gradient of `causal_attention` with no cache (start = 0, S = T).

    dout: [B, T, H*D]; q: [B, T, H, D]; k, v: [B, H, T, D]; weights: [B, H, T, T] as
    `attention_weights` gave them -> dq [B, T, H, D], dk [B, H, T, D], dv [B, H, T, D].
    out = weights @ v, so dweights = dout @ v^T and dv = weights^T @ dout; then back through the
    softmax (a masked weight is 0, so its score gets no gradient) and scores = scale * q @ k^T.
    """
    B, T, H, D = q.shape
    dheads = dout.reshape(B, T, H, D).transpose(0, 2, 1, 3)                  # [B, H, T, D]
    dv = weights.transpose(0, 1, 3, 2) @ dheads
    dscores = softmax_backward(dheads @ v.transpose(0, 1, 3, 2), weights) * q.dtype.type(scale)
    dq = (dscores @ k).transpose(0, 2, 1, 3)
    dk = dscores.transpose(0, 1, 3, 2) @ q.transpose(0, 2, 1, 3)
    return dq, dk, dv


def split_heads(qkv, n_head):
    """qkv: [B, T, 3C], the output of c_attn -> q [B, T, H, D], k [B, H, T, D], v [B, H, T, D]."""
    B, T, three_c = qkv.shape
    q, k, v = qkv.reshape(B, T, 3, n_head, three_c // (3 * n_head)).transpose(2, 0, 1, 3, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def split_heads_backward(dq, dk, dv):
    """The gradients of `split_heads`' three outputs -> the gradient of qkv [B, T, 3C]."""
    B, T, H, D = dq.shape
    return np.stack((dq, dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)), axis=2).reshape(B, T, 3 * H * D)


def self_attention(x, c_attn, c_proj, n_head, key_mask, scale, past=None):
    """Multi-head causal self-attention: x [B, T, C] -> (out [B, T, C], (k, v), weights).

    c_attn, c_proj: {"weight", "bias"} of [C, 3C] and [C, C]
    key_mask: [B, S] bool over the past and new positions (S = S0 + T)
    past: None, or the keys and values (each [B, H, S0, D]) of the S0 positions before these,
        as a previous call returned them
    -> the output; the keys and values of all S positions (the cache, grown); the attention
    weights [B, H, T, S]
    """
    q, k, v = split_heads(linear(x, **c_attn), n_head)
    if past is not None:
        k, v = np.concatenate([past[0], k], axis=2), np.concatenate([past[1], v], axis=2)
    weights = attention_weights(q, k, key_mask, k.shape[2] - x.shape[1], scale)   # [B, H, T, S]
    return linear(combine_heads(weights @ v), **c_proj), (k, v), weights


# ---- the MLP ----------------------------------------------------------------------------------


def mlp(x, c_fc, c_proj):
    """x: [B, T, C] -> [B, T, C]: widen to F, tanh-GELU, project back."""
    return linear(gelu_tanh(linear(x, **c_fc)), **c_proj)


# ---- the block --------------------------------------------------------------------------------


def block(x, ln_1, attn, ln_2, mlp_params, n_head, key_mask, scale, eps, past=None):
    """One transformer block, pre-norm: x [B, T, C] -> (x [B, T, C], (k, v), attention weights).

    ln_1, ln_2: {"weight", "bias"}; attn: {"c_attn", "c_proj"}; mlp_params: {"c_fc", "c_proj"};
    key_mask, scale, past: as `self_attention` takes them.
    """
    a, kv, weights = self_attention(layer_norm(x, ln_1["weight"], ln_1["bias"], eps), **attn,
                                    n_head=n_head, key_mask=key_mask, scale=scale, past=past)
    x = x + a
    x = x + mlp(layer_norm(x, ln_2["weight"], ln_2["bias"], eps), **mlp_params)
    return x, kv, weights


def block_backward(dout, x, ln_1, attn, ln_2, mlp_params, n_head, key_mask, scale, eps):
    """The gradient of `block` with no past: dout [B, T, C] at its output, x [B, T, C] its input
    -> dx [B, T, C], and the parameters' gradients as a dict shaped like the parameters.

    The block's forward is run again first, keeping what the backward needs (activation
    recomputation: only each block's input is kept between the passes).
    """
    h1 = layer_norm(x, ln_1["weight"], ln_1["bias"], eps)
    q, k, v = split_heads(linear(h1, **attn["c_attn"]), n_head)
    weights = attention_weights(q, k, key_mask, 0, scale)
    heads = combine_heads(weights @ v)
    x2 = x + linear(heads, **attn["c_proj"])
    h2 = layer_norm(x2, ln_2["weight"], ln_2["bias"], eps)
    f = linear(h2, **mlp_params["c_fc"])
    g = gelu_tanh(f)
    # out = x2 + linear(g, c_proj): back through each line, last first; a residual sum passes
    # its gradient to both of its terms.
    dg, dw_proj, db_proj = linear_backward(dout, g, mlp_params["c_proj"]["weight"])
    dh2, dw_fc, db_fc = linear_backward(gelu_tanh_backward(dg, f), h2, mlp_params["c_fc"]["weight"])
    dx2, dgamma_2, dbeta_2 = layer_norm_backward(dh2, x2, ln_2["weight"], eps)
    dx2 = dx2 + dout
    dheads, dw_attn_proj, db_attn_proj = linear_backward(dx2, heads, attn["c_proj"]["weight"])
    dq, dk, dv = attention_backward(dheads, q, k, v, weights, scale)
    dh1, dw_attn, db_attn = linear_backward(split_heads_backward(dq, dk, dv), h1, attn["c_attn"]["weight"])
    dx, dgamma_1, dbeta_1 = layer_norm_backward(dh1, x, ln_1["weight"], eps)
    grads = {"ln_1": {"weight": dgamma_1, "bias": dbeta_1},
             "attn": {"c_attn": {"weight": dw_attn, "bias": db_attn},
                      "c_proj": {"weight": dw_attn_proj, "bias": db_attn_proj}},
             "ln_2": {"weight": dgamma_2, "bias": dbeta_2},
             "mlp": {"c_fc": {"weight": dw_fc, "bias": db_fc}, "c_proj": {"weight": dw_proj, "bias": db_proj}}}
    return dx + dx2, grads


# ---- the network ------------------------------------------------------------------------------


def attention_scales(config):
    """The factor on q.k in each layer: 1/sqrt(D), and 1/(layer + 1) on top when configured."""
    return [(1 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0)
            / (i + 1 if config.scale_attn_by_inverse_layer_idx else 1) for i in range(config.n_layer)]


def position_ids_from_mask(key_mask):
    """key_mask: [B, S] bool -> the position id of each slot [B, S].

    Padding does not advance the position: a left-padded row starts at 0 as it would alone.
    """
    return np.maximum(np.cumsum(key_mask, axis=1) - 1, 0)


def gpt2(params, input_ids, config, attention_mask=None, past=None):
    """The whole network: token ids -> next-token logits, and what happened on the way.

    params: the nested parameters (see `params_from_tensors`), all of one float dtype
    input_ids: [B, T] ints in [0, V); config: a `GPT2Config`
    attention_mask: [B, S] of 0/1 over the past and new positions, 0 for padding; None: none
    past: None, or the "past" a previous call returned (each layer's keys and values)
    -> dict with
        logits [B, T, V] (the head is the token embedding, tied);
        hidden_states: L + 1 arrays [B, T, C]: the embeddings, then each block's output, the last
            one after the final layer norm (as Hugging Face's output_hidden_states);
        residual [B, T, C]: the last block's output, before the final layer norm;
        attentions: L arrays [B, H, T, S], each layer's attention weights;
        past: each layer's keys and values [B, H, S, D], to pass back for the next positions.
    """
    B, T = input_ids.shape
    S = T + (0 if past is None else past[0][0].shape[2])
    key_mask = np.ones((B, S), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    eps = config.layer_norm_epsilon
    x = embedding(params["wte"], params["wpe"], input_ids, position_ids_from_mask(key_mask)[:, S - T:])
    hidden_states, attentions, new_past = [x], [], []
    for layer, (p, scale) in enumerate(zip(params["h"], attention_scales(config))):
        x, kv, weights = block(x, p["ln_1"], p["attn"], p["ln_2"], p["mlp"], config.n_head, key_mask, scale,
                               eps, past=None if past is None else past[layer])
        hidden_states.append(x)
        attentions.append(weights)
        new_past.append(kv)
    out = layer_norm(x, params["ln_f"]["weight"], params["ln_f"]["bias"], eps)
    hidden_states[-1] = out
    return {"logits": out @ params["wte"].T, "hidden_states": hidden_states, "residual": x,
            "attentions": attentions, "past": new_past}


def gpt2_backward(dlogits, params, input_ids, config, forward, attention_mask=None):
    """The gradient of `gpt2` with no past: dlogits [B, T, V], and `forward`, what `gpt2` returned
    for these inputs -> the gradients of every parameter, nested as `params`.

    The head is tied: wte gets the head's gradient added to the embedding's, as autograd gives.
    """
    B, T = input_ids.shape
    key_mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    eps, wte = config.layer_norm_epsilon, params["wte"]
    final = forward["hidden_states"][-1]                                       # ln_f's output
    dhead = dlogits.reshape(-1, dlogits.shape[-1]).T @ final.reshape(-1, final.shape[-1])  # [V, C]
    dx, dgamma, dbeta = layer_norm_backward(dlogits @ wte, forward["residual"], params["ln_f"]["weight"], eps)
    grads = {"ln_f": {"weight": dgamma, "bias": dbeta}, "h": [None] * config.n_layer}
    for layer, scale in reversed(list(enumerate(attention_scales(config)))):
        p = params["h"][layer]
        dx, grads["h"][layer] = block_backward(dx, forward["hidden_states"][layer], p["ln_1"], p["attn"],
                                               p["ln_2"], p["mlp"], config.n_head, key_mask, scale, eps)
    dwte, grads["wpe"] = embedding_backward(dx, input_ids, position_ids_from_mask(key_mask), wte.shape[0],
                                            params["wpe"].shape[0])
    grads["wte"] = dwte + dhead
    return grads


# ---- the loss ---------------------------------------------------------------------------------

IGNORE_INDEX = -100  # a label that counts in no loss (transformers' and torch's convention)


def cross_entropy(logits, targets):
    """logits: [N, V]; targets: [N] ints, IGNORE_INDEX where nothing is predicted -> the mean over
    the counted rows of -log softmax(logits)[target], a scalar of the logits' dtype (nan when no
    row counts)."""
    counted = targets != IGNORE_INDEX
    if not counted.any():
        return logits.dtype.type(np.nan)  # a mean over nothing, as torch gives it
    rows = logits[counted]
    log_probs = log_softmax(rows)
    return -log_probs[np.arange(len(rows)), targets[counted]].sum() / logits.dtype.type(len(rows))


def cross_entropy_backward(logits, targets):
    """The gradient of `cross_entropy`: logits [N, V], targets [N] -> dlogits [N, V] =
    (softmax(logits) - onehot(target)) / count on counted rows, 0 on ignored ones."""
    counted = targets != IGNORE_INDEX
    dlogits = np.zeros_like(logits)
    dlogits[counted] = softmax(logits[counted])
    dlogits[np.flatnonzero(counted), targets[counted]] -= 1
    return dlogits / logits.dtype.type(max(counted.sum(), 1))


# ---- parameters by name -----------------------------------------------------------------------


def params_from_tensors(tensors, n_layer):
    """The checkpoint's flat names (`h.3.attn.c_attn.weight`, ...) -> the nested params of `gpt2`."""
    def pair(prefix):
        return {"weight": tensors[prefix + ".weight"], "bias": tensors[prefix + ".bias"]}

    blocks = [{"ln_1": pair(f"h.{i}.ln_1"),
               "attn": {"c_attn": pair(f"h.{i}.attn.c_attn"), "c_proj": pair(f"h.{i}.attn.c_proj")},
               "ln_2": pair(f"h.{i}.ln_2"),
               "mlp": {"c_fc": pair(f"h.{i}.mlp.c_fc"), "c_proj": pair(f"h.{i}.mlp.c_proj")}}
              for i in range(n_layer)]
    return {"wte": tensors["wte.weight"], "wpe": tensors["wpe.weight"], "h": blocks, "ln_f": pair("ln_f")}


def tensors_from_params(params):
    """The inverse of `params_from_tensors`: nested params (or gradients) -> flat checkpoint names."""
    flat = {"wte.weight": params["wte"], "wpe.weight": params["wpe"]}

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value

    for i, block_params in enumerate(params["h"]):
        walk(f"h.{i}.", block_params)
    walk("ln_f.", params["ln_f"])
    return flat
