"""Continuous batching: one decoding loop steps every active request together.

A fixed number of rows (`max_batch`) share one `KVCache`; the active requests hold its first
rows. Each row keeps its own positions in the cache (its `key_mask` row marks them) and its own
position ids, so a request joins between two steps and leaves after any step, and every row
sees exactly what it would see decoding alone:

- joining: the prompt is run alone (its own cache, as `generate.generate` runs it), its keys and
  values copied into the next free row so that they end where the shared cache ends; positions
  of that row before them are masked. A prompt longer than the shared cache so far lengthens
  it, the new positions masked for the other rows.
- stepping: each row samples its next token from its last logits with its own `Sampling` and
  its own generator (seeded as `generate(..., seed=)` seeds it), then one `GPT2.decode_step`
  over the rows still running.
- leaving (end-of-text, max_tokens, a stop string, or `cancel`): the last active row moves
  into the freed one, so the active rows stay the first ones.
- full: when the shared cache reaches its capacity, each row's live positions move left
  (`_compact`), in order, so the attention still sums the same keys in the same order.

Shapes: L layers, B rows, H heads, S cache positions, D head size, V vocab.
"""

import dataclasses
import queue
import threading
import traceback

import numpy as np

from .errors import GPT2Error
from .generate import Sampling, _rng, _StopStrings, next_tokens
from .ops import log_softmax


class QueueFullError(GPT2Error):
    """The engine's queue of waiting requests is full; try again later."""


@dataclasses.dataclass
class Token:
    """One generated token as the engine reports it.

    logprob: log-probability of `id` under the model (log-softmax of the raw logits, before
    temperature and top-p); top: (id, logprob) of the most likely tokens, best first, as many
    as the request's `logprobs` asked for (empty when it asked for none).
    """

    id: int
    logprob: float | None = None
    top: tuple = ()
    index: int = 0  # the request's `index`


@dataclasses.dataclass
class Finished:
    """The request is over: reason "stop" (end-of-text or a stop string), "length"
    (max_tokens), "cancelled", or "error" (with `message`)."""

    reason: str
    message: str = ""
    index: int = 0  # the request's `index`


class Request:
    """A prompt to continue and how; its events (`Token`s, then one `Finished`) arrive on
    `events`, a queue the engine fills and the caller reads.

    prompt: token ids, at least one; max_tokens >= 1; sampling: see `generate.Sampling`;
    seed: as `generate`'s; eos: the ids that end it; stop: strings that end it once the
    generated text holds one (decoded with `tokenizer`); logprobs: how many alternatives to
    report with each token (None: no log-probabilities at all); events: a queue to share
    with other requests (default: a new one), their events told apart by `index`.
    """

    def __init__(self, prompt, max_tokens: int, sampling: Sampling = Sampling(), seed=None, eos=(),
                 stop=None, tokenizer=None, logprobs: int | None = None, events: queue.Queue | None = None,
                 index: int = 0):
        self.prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
        if len(self.prompt) == 0:
            raise GPT2Error("prompt: at least one token is needed")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise GPT2Error(f"max_tokens must be an integer >= 1, found {max_tokens!r}")
        self.max_tokens = int(max_tokens)
        self.sampling = sampling
        self.rng = _rng(seed)
        self.eos = frozenset(int(e) for e in eos)
        self.stops = _StopStrings(stop, tokenizer, 1)
        self.logprobs = logprobs
        self.events = queue.Queue() if events is None else events
        self.index = index
        self.cancelled = threading.Event()
        self.generated = 0
        self.last_token = None

    def cancel(self) -> None:
        """Stop generating for this request; its row is freed before the next step."""
        self.cancelled.set()

    def finish(self, reason: str, message: str = "") -> None:
        self.events.put(Finished(reason, message, self.index))

    def __iter__(self):
        """The events until the `Finished` one (included), waiting for each."""
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, Finished):
                return


class Engine:
    """The decoding loop over a shared cache of `max_batch` rows, run by `start()` on a thread.

    submit(request) queues a request (QueueFullError past `max_queue` waiting); the loop admits
    waiting requests into free rows between steps. `stop()` ends the loop; requests still
    running or waiting then finish as "cancelled".
    """

    def __init__(self, model, max_batch: int = 4, max_queue: int = 16, capacity: int | None = None):
        """capacity: positions of the shared cache (default the model's n_positions)."""
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GPT2Error(f"{name} must be an integer >= 1, found {value!r}")
        self.model = model
        self.max_batch = max_batch
        self.cache = model.new_cache(max_batch, capacity)
        self.waiting = queue.Queue(max_queue)
        self.rows = []             # the active requests; request i holds row i of the cache
        self.logits = np.empty((max_batch, model.config.vocab_size), dtype=model.dtype)  # each row's next
        self.positions = np.zeros(max_batch, dtype=np.int64)  # each row's next position id
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = None

    # ---- the caller's side ---------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue `request`; -> it. GPT2Error if its prompt plus max_tokens exceeds the context,
        QueueFullError if the queue is full."""
        P = self.cache.capacity
        if len(request.prompt) + request.max_tokens > P:
            raise GPT2Error(f"prompt of {len(request.prompt)} tokens + max_tokens={request.max_tokens} exceeds "
                            f"the model's context of {P} tokens")
        self.model.check_ids(request.prompt)
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFullError(f"the queue of waiting requests is full ({self.waiting.maxsize})") from None
        with self._wake:
            self._wake.notify()
        return request

    def start(self) -> "Engine":
        """Run the loop on a daemon thread; -> self."""
        self._thread = threading.Thread(target=self._run, name="numpy-gpt2 engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """End the loop after its current step; every unfinished request finishes "cancelled"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        """How many requests hold a row."""
        return len(self.rows)

    # ---- the loop ------------------------------------------------------------------------

    def _run(self):
        while True:
            with self._wake:
                while not self._stopping and not self.rows and self.waiting.empty():
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:
                # A bug, not bad input: report it, end the requests in flight, keep serving.
                traceback.print_exc()
                self._drop(list(self.rows), "error")
                self.cache.length = 0
        for request in self.rows + _drain(self.waiting):
            request.finish("cancelled")
        self.rows = []

    def step(self) -> None:
        """Admit waiting requests into free rows, give every active row its next token, drop
        the rows that are done, and run one decoding step for the others."""
        self._drop([r for r in self.rows if r.cancelled.is_set()], "cancelled")
        while len(self.rows) < self.max_batch and not self.waiting.empty():
            request = self.waiting.get_nowait()
            if request.cancelled.is_set():
                request.finish("cancelled")
                continue
            try:
                self._admit(request)
            except GPT2Error as exc:
                request.finish("error", str(exc))
        done = {}
        for row, request in enumerate(self.rows):
            logits = self.logits[row:row + 1]
            token = next_tokens(logits, request.sampling, request.rng)
            request.last_token = int(token[0])
            request.events.put(_token_event(logits[0], request.last_token, request.logprobs, request.index))
            request.generated += 1
            if request.last_token in request.eos or request.stops.update(token, np.zeros(1, dtype=bool))[0]:
                done[request] = "stop"
            elif request.generated == request.max_tokens:
                done[request] = "length"
        for request, reason in done.items():
            self._drop([request], reason)
        if self.rows:
            self._decode(np.array([r.last_token for r in self.rows], dtype=np.int64))
        else:
            self.cache.length = 0  # nothing is live: the next prompt starts at the left

    def _decode(self, tokens):
        """One step for the active rows: tokens [n] -> each row's next logits."""
        n = len(self.rows)
        if self.cache.length == self.cache.capacity:
            self._compact()
        view = self.cache.first_rows(n)
        self.logits[:n] = self.model.decode_step(tokens, self.positions[:n], view)
        self.cache.length = view.length
        self.positions[:n] += 1

    def _admit(self, request: Request):
        """Run the prompt alone and copy its keys and values into the next free row."""
        model, cache, row = self.model, self.cache, len(self.rows)
        T = len(request.prompt)
        alone = model.new_cache(1, T + request.max_tokens)
        self.logits[row] = model(request.prompt[None], cache=alone, logits_to_keep=1)[0, -1]
        if cache.length < T:
            cache.key_mask[:row, cache.length:T] = False
            cache.length = T
        end = cache.length
        cache.k[:, row, :, end - T:end] = alone.k[:, 0, :, :T]
        cache.v[:, row, :, end - T:end] = alone.v[:, 0, :, :T]
        cache.key_mask[row, :end] = False
        cache.key_mask[row, end - T:end] = True
        self.positions[row] = T
        self.rows.append(request)

    def _drop(self, requests, reason: str):
        """Free the rows of `requests`, each taken by the last active row."""
        for request in requests:
            row = self.rows.index(request)
            last = len(self.rows) - 1
            if row != last:
                S = self.cache.length
                for array in (self.cache.k, self.cache.v):
                    array[:, row, :, :S] = array[:, last, :, :S]
                self.cache.key_mask[row, :S] = self.cache.key_mask[last, :S]
                self.logits[row] = self.logits[last]
                self.positions[row] = self.positions[last]
                self.rows[row] = self.rows[last]
            self.rows.pop()
            request.finish(reason)

    def _compact(self):
        """Move each active row's live positions to the left, in order, ending at the longest
        row's count; the cache's length becomes that count."""
        cache, n = self.cache, len(self.rows)
        live = [np.flatnonzero(cache.key_mask[row, :cache.length]) for row in range(n)]
        end = max(len(positions) for positions in live)
        for row, positions in enumerate(live):
            start = end - len(positions)
            for array in (cache.k, cache.v):
                array[:, row, :, start:end] = array[:, row][:, :, positions]
            cache.key_mask[row, :end] = False
            cache.key_mask[row, start:end] = True
        cache.length = end


def _token_event(logits, token: int, alternatives: int | None, index: int) -> Token:
    """The `Token` for `token` drawn from logits [V], with log-probabilities if asked for."""
    if alternatives is None:
        return Token(token, index=index)
    logprobs = log_softmax(logits.astype(np.float64))
    top = np.argsort(-logprobs, kind="stable")[:alternatives]
    return Token(token, float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in top), index)


def _drain(q: queue.Queue) -> list:
    """Everything waiting in q, taken out."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
