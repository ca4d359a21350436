"""Decoding: the token loop over the KV cache, logits warpers, stopping rules, streaming.

Shapes: B batch, T prompt length, V vocab. The loop runs the prompt once (prefill), then one
token per step; every row of a batch sees exactly what it would see alone (left padding,
padding masked out of attention, positions counted without it), as Hugging Face does.

Context policy: a prompt plus max_new_tokens longer than the model's n_positions is refused
up front with an error that gives the numbers; nothing is silently truncated.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

from . import kernels
from .errors import GPT2Error
from .threads import StepThreads

_DEFAULT = object()


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy, or sampled after the warpers.

    The warpers apply in Hugging Face's order: temperature, then top-k, then top-p.
    `top_k` None or 0 and `top_p` None or 1.0 disable those filters.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t < 0:
            raise GPT2Error(f"temperature must be a number >= 0, found {t!r}")
        if self.do_sample and t == 0:
            raise GPT2Error("temperature 0 with do_sample=True: use greedy decoding (do_sample=False)")
        k = self.top_k
        if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0):
            raise GPT2Error(f"top_k must be a positive integer (or None / 0 to disable), found {k!r}")
        p = self.top_p
        if p is not None and (not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise GPT2Error(f"top_p must be in (0, 1], found {p!r}")


def warp_logits(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """logits: [B, V] -> [B, V] float64 scores, -inf for tokens the filters remove.

    A temperature so small that logits / temperature overflows to inf is an error: a softmax
    of infinities is NaN, from which no token can be drawn (transformers' sampler refuses too).
    """
    with np.errstate(over="ignore"):  # reported below as an error of its own
        scores = logits.astype(np.float64) / sampling.temperature
    if np.isposinf(scores.max()):
        raise GPT2Error(f"temperature {sampling.temperature!r} is too small: logits / temperature overflows "
                        f"float64; use a larger temperature, or greedy decoding (do_sample=False)")
    if sampling.top_k:
        k = min(int(sampling.top_k), scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k:].min(axis=-1, keepdims=True)
        scores = np.where(scores < kth, -np.inf, scores)
    if sampling.top_p is not None and sampling.top_p < 1:
        # Drop the least likely tokens whose probabilities sum to at most 1 - top_p; the most
        # likely token always stays.
        order = np.argsort(scores, axis=-1, kind="stable")
        ascending = np.take_along_axis(scores, order, axis=-1)
        probs = np.exp(ascending - ascending[:, -1:])
        cumulative = np.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
        remove = cumulative <= 1 - sampling.top_p
        remove[:, -1] = False
        removed = np.zeros_like(remove)
        np.put_along_axis(removed, order, remove, axis=-1)
        scores = np.where(removed, -np.inf, scores)
    return scores


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits: [B, V] -> [B] int64: the argmax, or a draw from softmax(warp_logits(logits))."""
    if not sampling.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    scores = warp_logits(logits, sampling)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(len(scores)) * cumulative[:, -1]
    chosen = [np.searchsorted(row, u, side="right") for row, u in zip(cumulative, draws)]
    return np.minimum(chosen, scores.shape[-1] - 1).astype(np.int64)


def left_pad(sequences, pad_token_id: int) -> tuple:
    """A list of id lists of different lengths -> (ids [B, T], attention_mask [B, T]).

    Shorter rows are padded on the left, as GPT-2 generation needs the last column to be
    each row's last real token.
    """
    rows = [np.asarray(s).reshape(-1) for s in sequences]
    if not rows or any(len(r) == 0 for r in rows):
        raise GPT2Error("input_ids: every prompt must hold at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def _as_batch(input_ids, attention_mask, pad_token_id):
    """Accept (T,), (B, T) or a ragged list of prompts; return (ids [B, T], mask [B, T] or None)."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        lengths = {len(row) for row in input_ids}
        if len(lengths) > 1:
            if attention_mask is not None:
                raise GPT2Error("attention_mask given with prompts of different lengths; pass a padded array")
            return left_pad(input_ids, pad_token_id)
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
        if attention_mask.ndim == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != ids.shape:
            raise GPT2Error(f"attention_mask has shape {attention_mask.shape}, input_ids {ids.shape}")
        if not attention_mask[:, -1].all():
            raise GPT2Error("attention_mask: pad on the left; every row's last position must be a token")
    return ids, attention_mask


def _eos_set(model, eos_token_id):
    """The stop ids: the config's when not given (if in the vocab), none for None."""
    V = model.config.vocab_size
    if eos_token_id is _DEFAULT:
        eos = model.config.eos_token_id
        return {eos} if eos is not None and 0 <= eos < V else set()
    if eos_token_id is None:
        return set()
    ids = [eos_token_id] if np.ndim(eos_token_id) == 0 else list(eos_token_id)
    for i in ids:
        if not 0 <= int(i) < V:
            raise GPT2Error(f"eos_token_id {i} is outside the vocabulary 0..{V - 1}")
    return {int(i) for i in ids}


def stream(model, input_ids, max_new_tokens: int = 50, **kwargs) -> Iterator[np.ndarray]:
    """An iterator over the next token of every row, [B] int64, one step at a time.

    Arguments as `generate`; they are checked here, before the first step runs. Rows that have
    finished (end-of-text or a stop string) yield `pad_token_id` (default: the first eos id,
    else 0) until every row is done.
    """
    return _start(model, input_ids, max_new_tokens, **kwargs)[1]


def _start(model, input_ids, max_new_tokens: int = 50, do_sample: bool = False, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_token_id=_DEFAULT, attention_mask=None, stop_strings=None, tokenizer=None,
           pad_token_id: int | None = None):
    """Check every argument and set up; -> (the padded prompts [B, T], the step iterator)."""
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise GPT2Error(f"max_new_tokens must be an integer >= 0, found {max_new_tokens!r}")
    eos = _eos_set(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else min(eos, default=0)
    if not 0 <= pad < model.config.vocab_size:
        raise GPT2Error(f"pad_token_id {pad} is outside the vocabulary 0..{model.config.vocab_size - 1}")
    ids, mask = _as_batch(input_ids, attention_mask, pad)
    ids = model.check_ids(ids)
    B, T = ids.shape
    P = model.config.n_positions
    if T + min(max_new_tokens, 1) > P:
        raise GPT2Error(f"prompt of {T} tokens is too long for the model's context of n_positions={P}; "
                        f"shorten it to at most {P - 1} tokens")
    if T + max_new_tokens > P:
        raise GPT2Error(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
            f"of n_positions={P}; shorten the prompt or ask for at most {P - T} new tokens"
        )
    stops = _StopStrings(stop_strings, tokenizer, B)
    rng = _rng(seed)
    return ids, _decode(model, ids, mask, max_new_tokens, sampling, rng, eos, pad, stops)


def _rng(seed):
    """numpy's generator for `seed`: None, an integer >= 0, or anything default_rng takes."""
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise GPT2Error(f"seed must be an integer >= 0 (or None), found {seed!r}") from exc


def _decode(model, ids, mask, max_new_tokens, sampling, rng, eos, pad, stops):
    """The loop itself: prefill once, then one token per step over the cache."""
    if max_new_tokens == 0:
        return
    B, T = ids.shape
    cache = model.new_cache(B, T + max_new_tokens)
    eos = np.array(sorted(eos), dtype=np.int64)
    finished = np.zeros(B, dtype=bool)

    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]    # [B, V]
    positions = cache.key_mask[:, :T].sum(axis=1)  # each row's next position: padding does not count
    # A few rows a step run in Numba's threads: all of them, or one while a core is taken.
    threads = StepThreads(active=B <= kernels.FEW_ROWS)
    try:
        for step in range(max_new_tokens):
            # Kept lean: a step leaves the CPU's caches cold from its weights, so every NumPy call
            # here costs more than it would alone (np.isin, for one, is avoided).
            token = next_tokens(logits, sampling, rng)
            token[finished] = pad
            yield token
            if len(eos):
                finished |= (token[:, None] == eos).any(axis=1)
            if stops.stops:
                finished |= stops.update(token, finished)
            if finished.all() or step == max_new_tokens - 1:
                return
            with threads.step():
                logits = model.decode_step(token, positions, cache)
            positions += 1
    finally:
        threads.close()


def generate(model, input_ids, max_new_tokens: int = 50, **kwargs) -> np.ndarray:
    """Generate up to `max_new_tokens` after each prompt; -> (B, T + new) int64 ids.

    input_ids: (T,), (B, T), or a list of prompts of different lengths (left-padded for you)
    do_sample, temperature, top_k, top_p: greedy when do_sample is False; else sampling after
        the warpers (see `Sampling`)
    seed: seeds the sampler; the same seed gives the same tokens
    eos_token_id: int or list of ints; a row stops after producing one; None never stops
        early; by default the config's (50256, <|endoftext|>)
    attention_mask: (B, T) with 0 on the left padding of shorter prompts
    stop_strings: strings that end a row once its generated text contains one; decoded with
        `tokenizer` (default: the GPT-2 tokenizer)
    Like Hugging Face, the result holds the (padded) prompts followed by the new tokens, and
    stops early once every row has finished.
    """
    ids, steps = _start(model, input_ids, max_new_tokens, **kwargs)
    steps = list(steps)
    new = np.stack(steps, axis=1) if steps else np.zeros((ids.shape[0], 0), dtype=np.int64)
    return np.concatenate([ids.astype(np.int64), new], axis=1)


def stream_text(model, tokenizer, input_ids, **kwargs) -> Iterator[str]:
    """Generate for one prompt; yield the new text as it becomes whole characters.

    Arguments are checked when this is called, before anything is yielded.
    """
    steps = stream(model, input_ids, tokenizer=tokenizer, **kwargs)
    return tokenizer.decode_stream(int(token[0]) for token in steps)


class _StopStrings:
    """Tracks, per row, whether the generated bytes contain one of the stop strings."""

    def __init__(self, stop_strings, tokenizer, batch_size):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.stops = [s.encode("utf-8") for s in (stop_strings or [])]
        if any(not s for s in self.stops):
            raise GPT2Error("stop_strings: an empty stop string would stop at once")
        if self.stops and tokenizer is None:
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.default()
        self.tokenizer = tokenizer
        self.generated = [bytearray() for _ in range(batch_size)]
        self.longest = max((len(s) for s in self.stops), default=0)

    def update(self, token: np.ndarray, finished: np.ndarray) -> np.ndarray:
        """Append this step's tokens; -> [B] bool, True where a stop string now appears."""
        hit = np.zeros(len(token), dtype=bool)
        if not self.stops:
            return hit
        for row, (t, done) in enumerate(zip(token, finished)):
            if done:
                continue
            piece = self.tokenizer.token_bytes(int(t))
            text = self.generated[row]
            text += piece
            # Only the tail can hold a stop string that this token completed.
            tail = bytes(text[-(self.longest + len(piece)):])
            hit[row] = any(s in tail for s in self.stops)
        return hit
