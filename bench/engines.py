"""The engines under test, one small class each, with the same methods.

`prefill(ids, keep_last) -> seconds`: one forward pass over ids [B, T] (no cache kept);
    keep_last asks for the last position's logits only, else logits for every position.
`decode(ids, n_new) -> (seconds, tokens [B, n_new])`: greedy decoding of n_new tokens after
    the prompts ids [B, T], end-of-text disabled. The first new token comes out of the prefill
    and is not timed; `seconds` covers the n_new - 1 steps after it, each one forward of one
    token per row plus the argmax. Decode tokens/s = B * (n_new - 1) / seconds for every engine.

numpy-gpt2 decodes through its public `GPT2.stream`, timed from the first yielded token to the
last. Hugging Face decodes through a hand-written loop over `past_key_values` rather than
`generate` with a streamer: the loop is the least overhead transformers allows per step (no
logits processors or stopping criteria), so the comparison is against torch at its best, and
it performs exactly the steps the stream performs (a one-token forward on the cache, argmax).

Run as a script, `python bench/engines.py torch-generate DIR IDS N THREADS` is the torch side
of the peak-memory measurement: load the model and `generate` N tokens after IDS in a fresh
process. The ids come tokenized, so that process imports torch and transformers only.
"""

import sys
import time

import numpy as np

from measure import quiet_gc


class NumpyGPT2Engine:
    """numpy-gpt2 itself, float32, its weights loaded as `from_pretrained` loads them."""

    name = "numpy"
    label = "numpy-gpt2"

    def __init__(self, path, threads):
        from numpy_gpt2 import GPT2
        from numpy_gpt2.threads import set_threads

        set_threads(threads)  # the BLAS, Numba's pool and numpy-gpt2's parts
        self.model = GPT2.from_pretrained(path)

    def prefill(self, ids, keep_last):
        with quiet_gc():
            start = time.perf_counter()
            self.model(ids, logits_to_keep=1 if keep_last else 0)
            return time.perf_counter() - start

    def decode(self, ids, n_new):
        steps = self.model.stream(ids, n_new, eos_token_id=None)
        with quiet_gc():
            tokens = [next(steps)]
            start = time.perf_counter()
            tokens.extend(steps)
            seconds = time.perf_counter() - start
        return seconds, np.stack(tokens, axis=1)


class TorchEngine:
    """Hugging Face transformers' GPT2LMHeadModel on torch: fp32, no_grad, its default
    attention implementation and KV cache, `threads` intra-op threads."""

    name = "torch"
    label = "torch"

    def __init__(self, path, threads):
        import torch

        self.torch = torch
        self.model = _load_torch_model(path, threads)
        self.attn_implementation = self.model.config._attn_implementation

    def prefill(self, ids, keep_last):
        torch = self.torch
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        with torch.no_grad(), quiet_gc():
            start = time.perf_counter()
            if keep_last:
                self.model(ids, logits_to_keep=1)
            else:
                self.model(ids)  # transformers' default: logits for every position
            return time.perf_counter() - start

    def decode(self, ids, n_new):
        torch = self.torch
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        with torch.no_grad(), quiet_gc():
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)                    # [B, 1]
            tokens = [token]
            start = time.perf_counter()
            for _ in range(n_new - 1):
                # The cache goes second, positionally: transformers 5 renamed the argument from
                # past_key_values to cache, and the position is the same in both.
                out = self.model(token, _kv_cache(out), use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            seconds = time.perf_counter() - start
        return seconds, torch.cat(tokens, dim=1).numpy()


def _kv_cache(output):
    """The KV cache a transformers forward returned (`cache` since 5.x, `past_key_values` before)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def _load_torch_model(path, threads):
    """transformers' GPT2LMHeadModel from `path`, float32, eval mode, torch on `threads` threads."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    return transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()


class NaiveEngine:
    """bench/naive.py: picoGPT-style NumPy, no cache, one sequence at a time."""

    name = "naive"
    label = "naive NumPy"

    def __init__(self, path, threads):
        from naive import NaiveGPT2

        # Threads reach it only through the BLAS, set by the environment before NumPy loaded.
        self.model = NaiveGPT2(path)

    def prefill(self, ids, keep_last):
        (row,) = ids
        with quiet_gc():
            start = time.perf_counter()
            self.model.logits(row, logits_to_keep=1 if keep_last else 0)
            return time.perf_counter() - start

    def decode(self, ids, n_new):
        (row,) = ids
        sequence = list(row)
        with quiet_gc():
            sequence.append(int(self.model.logits(sequence, logits_to_keep=1)[-1].argmax()))
            start = time.perf_counter()
            for _ in range(n_new - 1):
                # The whole sequence again, every step: what a cache saves.
                sequence.append(int(self.model.logits(sequence, logits_to_keep=1)[-1].argmax()))
            seconds = time.perf_counter() - start
        return seconds, np.array([sequence[len(row):]])


ENGINES = {cls.name: cls for cls in (NumpyGPT2Engine, TorchEngine, NaiveEngine)}


def torch_generate_command(path, ids, n_new, threads) -> list:
    """The command line of a fresh process that runs transformers' `generate` (see `_main`)."""
    return [sys.executable, __file__, "torch-generate", str(path), ",".join(map(str, ids)),
            str(n_new), str(threads)]


def _torch_generate(path, ids, n_new, threads):
    """What a user of transformers runs: load, then greedy `generate` of exactly n_new tokens."""
    import torch

    model = _load_torch_model(path, threads)
    ids = torch.tensor([ids])
    with torch.no_grad():
        # min_new_tokens keeps end-of-text from ending the run early, like --no-eos.
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)


if __name__ == "__main__":
    command, path, ids, n_new, threads = sys.argv[1:]
    if command != "torch-generate":
        sys.exit(f"engines.py: unknown command {command!r}; expected torch-generate")
    _torch_generate(path, [int(i) for i in ids.split(",")], int(n_new), int(threads))
