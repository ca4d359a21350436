"""A naive GPT-2 in NumPy, in the spirit of picoGPT's 60-line `gpt2.py`: the baseline.

No KV cache: every generated token runs the whole sequence through the network again, so the
cost of a step grows with the length of the text. It is here so that the benchmark shows what
numpy-gpt2's cache and kernels buy over the obvious NumPy program. One sequence at a time
(no batch axis), float32 throughout, reading the same official-name weight dict as numpy-gpt2.

Shapes: T positions, C n_embd, H heads, V vocab.
"""

import math

import numpy as np


def gelu(x):
    # math.sqrt gives a Python float, which NumPy 2 keeps in float32; np.sqrt would give a
    # float64 scalar and silently widen every activation.
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    return g * (x - mean) / np.sqrt(variance + eps) + b


def linear(x, w, b):  # [T, in] @ [in, out] + [out] -> [T, out]
    return x @ w + b


def ffn(x, c_fc, c_proj):  # [T, C] -> [T, 4C] -> [T, C]
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def attention(q, k, v, mask):  # [Tq, D], [Tk, D], [Tk, D], [Tq, Tk] -> [Tq, D]
    return softmax(q @ k.T / math.sqrt(q.shape[-1]) + mask) @ v


def mha(x, c_attn, c_proj, n_head):  # [T, C] -> [T, C]
    x = linear(x, **c_attn)                                              # [T, 3C]
    qkv_heads = [np.split(part, n_head, axis=-1) for part in np.split(x, 3, axis=-1)]
    causal_mask = (1 - np.tri(x.shape[0], dtype=x.dtype)) * x.dtype.type(-1e10)  # [T, T]
    out_heads = [attention(q, k, v, causal_mask) for q, k, v in zip(*qkv_heads)]
    return linear(np.hstack(out_heads), **c_proj)


def transformer_block(x, mlp, attn, ln_1, ln_2, n_head, eps):  # [T, C] -> [T, C]
    x = x + mha(layer_norm(x, **ln_1, eps=eps), **attn, n_head=n_head)
    return x + ffn(layer_norm(x, **ln_2, eps=eps), **mlp)


def gpt2(inputs, wte, wpe, blocks, ln_f, n_head, eps, logits_to_keep=0):  # [T] -> [T, V]
    x = wte[inputs] + wpe[range(len(inputs))]
    for block in blocks:
        x = transformer_block(x, **block, n_head=n_head, eps=eps)
    x = layer_norm(x[-logits_to_keep:], **ln_f, eps=eps)
    return x @ wte.T


def generate(inputs, params, n_head, eps, n_tokens_to_generate):
    """Greedy decoding the picoGPT way: the full sequence again for every new token."""
    inputs = list(inputs)
    for _ in range(n_tokens_to_generate):
        logits = gpt2(inputs, **params, n_head=n_head, eps=eps, logits_to_keep=1)
        inputs.append(int(np.argmax(logits[-1])))
    return inputs[len(inputs) - n_tokens_to_generate:]


def params_from_tensors(tensors: dict, n_layer: int) -> dict:
    """Official flat names (`h.3.attn.c_attn.weight`, ...) -> picoGPT's nested params dict."""
    def lin(prefix):
        return {"w": tensors[prefix + ".weight"], "b": tensors[prefix + ".bias"]}

    def norm(prefix):
        return {"g": tensors[prefix + ".weight"], "b": tensors[prefix + ".bias"]}

    blocks = [
        {
            "ln_1": norm(f"h.{i}.ln_1"),
            "attn": {"c_attn": lin(f"h.{i}.attn.c_attn"), "c_proj": lin(f"h.{i}.attn.c_proj")},
            "ln_2": norm(f"h.{i}.ln_2"),
            "mlp": {"c_fc": lin(f"h.{i}.mlp.c_fc"), "c_proj": lin(f"h.{i}.mlp.c_proj")},
        }
        for i in range(n_layer)
    ]
    return {"wte": tensors["wte.weight"], "wpe": tensors["wpe.weight"], "blocks": blocks,
            "ln_f": norm("ln_f")}


class NaiveGPT2:
    """The baseline as an object: float32 params from a checkpoint path, `logits(ids)`."""

    def __init__(self, path):
        from numpy_gpt2.weights import load_checkpoint

        checkpoint = load_checkpoint(path)
        config = checkpoint.config
        if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
            # picoGPT knows only GPT-2's own attention scale; refuse rather than differ.
            raise ValueError(f"{path}: the naive baseline supports only the standard attention scale")
        tensors = {name: checkpoint.array(name, np.float32) for name in checkpoint.tensors}
        self.config = config
        self.params = params_from_tensors(tensors, config.n_layer)
        self.eps = np.float32(config.layer_norm_epsilon)

    def logits(self, ids, logits_to_keep=0):
        """ids: [T] ints -> logits [T or logits_to_keep, V] float32."""
        return gpt2(list(ids), **self.params, n_head=self.config.n_head, eps=self.eps,
                    logits_to_keep=logits_to_keep)

    def generate(self, ids, n_new):
        """Greedy continuation of `ids`: the `n_new` new ids."""
        return generate(ids, self.params, self.config.n_head, self.eps, n_new)
