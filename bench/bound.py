"""What bounds a row, measured in the run itself rather than argued.

- A prompt (prefill) is bound by arithmetic. `prefill_bound` profiles numpy-gpt2's forward
  into its parts (the blocks' products with their bias and GELU, the head, attention,
  layernorms, the rest) and then times the same dense products on their own: every product
  the forward made, on the model's own weights and random rows of the same shape, each by the
  faster of numpy-gpt2's path and one NumPy matmul on all the BLAS's threads. Those products
  are work no engine on this BLAS can skip, so torch's time over theirs is the highest ratio
  reachable with nothing else done at all.
- A decoding step is bound by memory. `decode_bound` streams every weight matrix once through
  numpy-gpt2's own few-rows loop, as a step does, and times that alone, in turn with
  numpy-gpt2's own steps: the bytes a second the machine gives, the most tokens a second it
  allows, and what the step spends beside them.

Both use numpy-gpt2's kernels through their measuring entry points (`kernels.recorded_products`,
`kernels.product`, `kernels.few_rows_matmul`) and time its public kernel functions by wrapping
them for the length of a profile.
"""

import collections
import contextlib
import time

import numpy as np

from measure import median, quiet_gc

# The kernels a prompt's forward calls, by the part of the profile they count towards.
_PARTS = {
    "linear": "block products",
    "linear_gelu": "block products",  # the GELU is done band by band inside it
    "matmul_transposed": "head",
    "causal_attention": "attention",
    "layer_norm": "layernorms",
}


@contextlib.contextmanager
def _timed(module, parts: dict, seconds: dict):
    """Within: each function module.<name> for name in `parts` adds its wall time to
    seconds[parts[name]]; restored on leaving."""
    saved = {name: getattr(module, name) for name in parts}

    def timed(name, function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[parts[name]] += time.perf_counter() - start
        return call

    for name, function in saved.items():
        setattr(module, name, timed(name, function))
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(module, name, function)


def _recorded_products(model, ids, logits_to_keep):
    """[(rows of x, the stored [N, K] matrix)] for every dense product one forward makes, in order."""
    from numpy_gpt2 import kernels

    with kernels.recorded_products() as calls:
        model(ids, logits_to_keep=logits_to_keep)
    return calls


def _fastest_seconds(function, repeats):
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def _products_alone(calls, dtype, repeats, rng):
    """Seconds of each recorded product on its own, the faster of numpy-gpt2's path and a
    plain NumPy matmul on the BLAS's own threads, each its best of `repeats`; without a bias."""
    from numpy_gpt2 import kernels

    seconds = []
    for M, weight_t in calls:
        N, K = weight_t.shape
        x = rng.standard_normal((M, K)).astype(dtype)
        out = np.empty((M, N), dtype=dtype)
        ours = _fastest_seconds(lambda: kernels.product(x, weight_t, out), repeats)
        blas = _fastest_seconds(lambda: np.matmul(x, weight_t.T, out=out), repeats)
        seconds.append(min(ours, blas))
    return seconds


def prefill_bound(model, ids, keep_last: bool, torch_seconds, repeats: int = 5) -> dict:
    """Profile of one forward of `model` over ids [B, T] and the time of its dense products
    alone; with torch_seconds (its median forward) the ratio they would allow."""
    from numpy_gpt2 import kernels

    keep = 1 if keep_last else 0
    model(ids, logits_to_keep=keep)  # warm: compiled, buffers faulted in once
    profiles = []
    for _ in range(repeats):
        parts = collections.defaultdict(float)
        with _timed(kernels, _PARTS, parts), quiet_gc():
            start = time.perf_counter()
            model(ids, logits_to_keep=keep)
            total = time.perf_counter() - start
        parts["rest"] = total - sum(parts.values())
        parts["total"] = total
        profiles.append(parts)
    # The run of median total, whole, so that its parts add up to its total.
    profile = dict(sorted(profiles, key=lambda p: p["total"])[len(profiles) // 2])

    calls = _recorded_products(model, ids, keep)
    alone = _products_alone(calls, model.dtype, repeats, np.random.default_rng(0))
    flops = sum(2 * M * weight_t.size for M, weight_t in calls)
    alone_by_part = collections.defaultdict(float)
    for (_, weight_t), seconds in zip(calls, alone):
        alone_by_part["head" if np.may_share_memory(weight_t, model.wte) else "block products"] += seconds
    result = {
        "profile_seconds": profile,
        "dense_products": len(calls),
        "dense_product_flops": flops,
        "dense_products_alone_seconds": sum(alone),
        "dense_products_alone_seconds_by_part": dict(alone_by_part),
        "dense_products_alone_flops_per_s": flops / sum(alone),
    }
    if torch_seconds is not None:
        result["torch_seconds"] = torch_seconds
        result["ratio_ceiling"] = torch_seconds / sum(alone)
    return result


def decode_bound(model, ids, torch_tokens_per_s, repeats: int = 7, steps: int = 8) -> dict:
    """A decoding step's products alone for the rows of prompts ids [B, T]: every matrix (the
    blocks' four and the tied head) streamed once through numpy-gpt2's few-rows loop.

    numpy-gpt2's own steps after ids are timed in turn with them (`steps` a round), so the two
    are compared within the same minute of the machine's memory bandwidth.
    """
    from numpy_gpt2 import kernels

    batch = len(ids)
    matrices = [kernels.transposed_contiguous(linear.weight)
                for block in model.h
                for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    matrices.append(model.wte)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((batch, rows.shape[1])).astype(model.dtype) for rows in matrices]
    outs = [np.empty((batch, rows.shape[0]), dtype=model.dtype) for rows in matrices]

    def products():
        for x, rows, out in zip(xs, matrices, outs):
            kernels.few_rows_matmul(x, rows, out)

    def decoding_steps():
        tokens = model.stream(ids, steps + 1, eos_token_id=None)
        next(tokens)  # the prompt's forward: not a step
        start = time.perf_counter()
        for _ in tokens:
            pass
        return (time.perf_counter() - start) / steps

    products()
    decoding_steps()
    alone, step = [], []
    with quiet_gc():
        for _ in range(repeats):
            start = time.perf_counter()
            products()
            alone.append(time.perf_counter() - start)
            step.append(decoding_steps())
    alone_seconds = median(alone)
    weight_bytes = sum(rows.nbytes for rows in matrices)
    result = {
        "weight_bytes_per_step": weight_bytes,
        "step_seconds": median(step),
        "products_alone_seconds_per_step": alone_seconds,
        "bytes_per_s": weight_bytes / alone_seconds,
        "tokens_per_s_ceiling": batch / alone_seconds,
    }
    if torch_tokens_per_s is not None:
        result["torch_tokens_per_s"] = torch_tokens_per_s
        result["ratio_ceiling"] = batch / alone_seconds / torch_tokens_per_s
    return result
