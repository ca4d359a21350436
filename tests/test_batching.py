"""The continuous-batching engine: each request's tokens equal `model.generate` run alone with
the same settings (generate itself is held to transformers in test_generate.py).

The tiny checkpoint has n_positions=40, so requests joining at different steps fill the shared
cache and make it compact several times in one test.
"""

import numpy as np
import pytest

from numpy_gpt2.batching import Engine, Finished, QueueFullError, Request, Token
from numpy_gpt2.errors import GPT2Error
from numpy_gpt2.generate import Sampling
from numpy_gpt2.model import GPT2


@pytest.fixture(scope="module", params=["float32", "float64"])
def model(request, tiny_ref):
    return GPT2.from_pretrained(tiny_ref.hub_dir, dtype=request.param)


def _alone(model, request_args):
    """What model.generate gives for one request alone: its new tokens."""
    prompt, max_tokens, sampling, seed, eos, stop = request_args
    out = model.generate(np.array(prompt), max_new_tokens=max_tokens, do_sample=sampling.do_sample,
                         temperature=sampling.temperature, top_p=sampling.top_p, seed=seed,
                         eos_token_id=list(eos) or None, stop_strings=stop)
    new = list(out[0, len(prompt):])
    # generate pads a finished row until every row is done; alone there is one row, so it stops.
    return new


def _tokens(request):
    events = list(request)
    assert isinstance(events[-1], Finished)
    assert all(isinstance(e, Token) for e in events[:-1])
    return [e.id for e in events[:-1]], events[-1].reason


def _requests(rng, n, vocab):
    """n requests of mixed prompt lengths, lengths of output and sampling settings."""
    out = []
    for i in range(n):
        prompt = list(rng.integers(0, vocab, size=int(rng.integers(1, 15))))
        max_tokens = int(rng.integers(1, 40 - len(prompt) + 1))
        sampling = [Sampling(), Sampling(True, 0.8), Sampling(True, 1.3, top_p=0.9)][i % 3]
        eos = (int(rng.integers(0, vocab)),) if i % 4 == 3 else ()
        out.append((prompt, max_tokens, sampling, 1000 + i, eos, None))
    return out


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_each_request_equals_generate_alone(model, max_batch):
    """Requests join at different steps (a few submitted between steps), mixed lengths, greedy
    and seeded sampling: every token equal to running it alone (no tolerance: the same tokens)."""
    rng = np.random.default_rng(max_batch)
    specs = _requests(rng, 12, model.config.vocab_size)
    engine = Engine(model, max_batch=max_batch, max_queue=len(specs))
    submitted = []
    pending = list(specs)
    while pending or engine.active or not engine.waiting.empty():
        for _ in range(int(rng.integers(0, 3))):
            if pending:
                prompt, max_tokens, sampling, seed, eos, stop = pending.pop(0)
                submitted.append(engine.submit(Request(prompt, max_tokens, sampling, seed, eos, stop)))
        engine.step()
    for spec, request in zip(specs, submitted):
        tokens, reason = _tokens(request)
        assert tokens == _alone(model, spec), spec
        assert reason == ("stop" if tokens[-1] in spec[4] else "length")


def test_compaction_keeps_every_row_exact(model):
    """Long requests joining one step apart overflow the 40-position cache again and again."""
    engine = Engine(model, max_batch=4, max_queue=8)
    specs = [([5 + i] * (3 + 2 * i), 37 - 2 * i, Sampling(True, 1.0), i, (), None) for i in range(6)]
    submitted = []
    for prompt, max_tokens, sampling, seed, eos, stop in specs:
        submitted.append(engine.submit(Request(prompt, max_tokens, sampling, seed, eos, stop)))
        engine.step()
    compactions = 0
    while engine.active or not engine.waiting.empty():
        before = engine.cache.length
        engine.step()
        compactions += engine.cache.length < before and engine.active > 0
    assert compactions >= 2
    for spec, request in zip(specs, submitted):
        assert _tokens(request)[0] == _alone(model, spec)


def test_stop_strings_cancel_and_logprobs(model):
    from numpy_gpt2.tokenizer import Tokenizer

    tokenizer = Tokenizer.default()
    engine = Engine(model, max_batch=2, max_queue=4).start()
    try:
        # A stop string: the text of a later greedy token that is whole UTF-8 on its own.
        prompt = [1, 2, 3]
        greedy = list(model.generate(np.array(prompt), max_new_tokens=10, eos_token_id=None)[0, 3:])
        whole = [t for t in greedy[2:] if tokenizer.token_bytes(t).decode("utf-8", "replace").isalpha()]
        stop = tokenizer.decode([whole[0]])
        spec = (prompt, 10, Sampling(), None, (), [stop])
        stopped = engine.submit(Request(prompt, 10, stop=[stop], tokenizer=tokenizer))
        tokens, reason = _tokens(stopped)
        assert tokens == _alone(model, spec) and reason == "stop"
        assert len(tokens) < 10

        cancelled = engine.submit(Request([7] * 5, 30))
        first = cancelled.events.get()
        cancelled.cancel()
        rest = list(cancelled)
        assert isinstance(first, Token) and rest[-1] == Finished("cancelled")
        assert engine.active == 0 or engine.rows[0] is not cancelled

        # Log-probabilities: log-softmax of transformers-checked model logits, computed by hand.
        asked = engine.submit(Request([4, 5, 6], 3, logprobs=2))
        events = list(asked)[:-1]
        ids = [4, 5, 6] + [e.id for e in events]
        logits = model(np.array(ids[:-1])).astype(np.float64)[0, 2:]
        expected = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for e, row in zip(events, expected):
            assert e.logprob == pytest.approx(row[e.id], abs=1e-5)
            assert [i for i, _ in e.top] == list(np.argsort(-row, kind="stable")[:2])
    finally:
        engine.stop(timeout=10)


def test_bad_requests_and_full_queue(model):
    engine = Engine(model, max_batch=1, max_queue=1)
    with pytest.raises(GPT2Error, match="exceeds the model's context of 40"):
        engine.submit(Request([1] * 30, 11))
    with pytest.raises(GPT2Error, match="max_tokens must be an integer >= 1"):
        Request([1], 0)
    engine.submit(Request([1], 5))
    with pytest.raises(QueueFullError, match="full"):
        engine.submit(Request([1], 5))
    engine.stop()
