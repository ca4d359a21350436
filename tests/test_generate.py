"""Generation against Hugging Face transformers' `generate` and its logits warpers."""

import numpy as np
import pytest

from numpy_gpt2 import GPT2, GPT2Error
from numpy_gpt2.generate import Sampling, next_tokens, stream_text, warp_logits
from numpy_gpt2.tokenizer import Tokenizer

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    return GPT2.from_pretrained(tiny_ref.hub_dir)


def _hf_generate(ref, ids, **kwargs):
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return ref.torch_model.generate(torch.as_tensor(ids), do_sample=False, **kwargs).numpy()


def _prompt(n, seed=0, vocab=1000):
    return np.random.default_rng(seed).integers(0, vocab, (1, n))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_greedy_equals_transformers(tiny_ref, dtype):
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype)
    ids = _prompt(5)
    expected = _hf_generate(tiny_ref, ids, max_new_tokens=35)
    out = model.generate(ids, max_new_tokens=35, eos_token_id=None)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, expected)


@pytest.mark.slow
def test_greedy_equals_transformers_124m_shape(gpt2_ref):
    model = GPT2.from_pretrained(gpt2_ref.pretrained_dir)
    ids = _prompt(8, seed=2, vocab=50257)
    expected = _hf_generate(gpt2_ref, ids, max_new_tokens=56)
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=56, eos_token_id=None), expected)


def test_batch_of_different_lengths_equals_each_alone(tiny_ref, tiny):
    prompts = [_prompt(n, seed=n)[0].tolist() for n in (3, 9, 6)]
    batched = tiny.generate(prompts, max_new_tokens=20, eos_token_id=None)
    width = max(map(len, prompts))
    for row, prompt in zip(batched, prompts):
        alone = tiny.generate([prompt], max_new_tokens=20, eos_token_id=None)[0]
        np.testing.assert_array_equal(row[width - len(prompt):], alone)
        np.testing.assert_array_equal(row[width:], _hf_generate(tiny_ref, [prompt], max_new_tokens=20)[0, len(prompt):])


def test_batch_with_explicit_mask_equals_transformers_batch(tiny_ref, tiny):
    """Left padding and attention_mask passed in, as a transformers user does it."""
    ids = _prompt(7, seed=4).repeat(2, axis=0)
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    expected = _hf_generate(tiny_ref, ids, attention_mask=torch.as_tensor(mask), max_new_tokens=15)
    out = tiny.generate(ids, attention_mask=mask, max_new_tokens=15, eos_token_id=None)
    np.testing.assert_array_equal(out, expected)


def test_eos_stops_rows_and_pads_like_transformers(tiny_ref, tiny):
    """Pick as eos a token greedy decoding reaches; transformers pads finished rows the same way."""
    prompts = np.concatenate([_prompt(6, seed=7), _prompt(6, seed=8)])
    free = tiny.generate(prompts, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 6 + 3])
    expected = _hf_generate(tiny_ref, prompts, max_new_tokens=12, eos_token_id=eos, pad_token_id=eos)
    out = tiny.generate(prompts, max_new_tokens=12, eos_token_id=eos)
    np.testing.assert_array_equal(out, expected)
    assert out.shape[1] <= 18 and (out[0, 6 + 3:] == eos).all()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.9, 50, 0.6), (1.0, 1, None), (2.0, None, 0.05),
])
def test_warpers_match_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    logits = np.random.default_rng(0).standard_normal((3, 200)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, torch.from_numpy(logits)).numpy()
    ours = warp_logits(logits, Sampling(True, temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], rtol=1e-12)


def test_sampling_follows_the_distribution():
    """Empirical frequencies of 20000 draws against softmax(logits / T) (a chi-square bound)."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    sampling = Sampling(do_sample=True, temperature=1.0)
    rng = np.random.default_rng(0)
    draws = np.array([next_tokens(logits, sampling, rng)[0] for _ in range(20000)])
    counts = np.bincount(draws, minlength=4)
    expected = 20000 * np.array([0.5, 0.3, 0.15, 0.05])
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 16.3  # the 0.999 quantile of chi-square with 3 degrees of freedom


def test_seed_reproducible_and_top_k_1_is_greedy(tiny):
    ids = _prompt(4, seed=9)
    options = dict(max_new_tokens=25, do_sample=True, temperature=1.5, eos_token_id=None)
    a = tiny.generate(ids, seed=11, **options)
    assert (a == tiny.generate(ids, seed=11, **options)).all()
    assert (a != tiny.generate(ids, seed=12, **options)).any()
    greedy = tiny.generate(ids, max_new_tokens=25, eos_token_id=None)
    np.testing.assert_array_equal(tiny.generate(ids, seed=3, **{**options, "temperature": 1.0}, top_k=1), greedy)


def test_stream_yields_what_generate_returns(tiny):
    ids = _prompt(5, seed=10)
    steps = list(tiny.stream(ids, max_new_tokens=12, eos_token_id=None))
    assert all(s.shape == (1,) for s in steps)
    np.testing.assert_array_equal(np.concatenate([ids[0], np.concatenate(steps)]),
                                  tiny.generate(ids, max_new_tokens=12, eos_token_id=None)[0])


def test_stop_strings_end_generation(tiny):
    tok = Tokenizer.default()
    ids = _prompt(5, seed=13)
    free = tiny.generate(ids, max_new_tokens=20, eos_token_id=None)[0, 5:]
    # A stop string made of the text of generated tokens 6 and 7 (bytes, as tiktoken decodes them).
    stop_bytes = b"".join(tok.encoding.decode_single_token_bytes(int(t)) for t in free[6:8])
    stop = stop_bytes.decode("utf-8", errors="ignore")
    assert stop
    out = tiny.generate(ids, max_new_tokens=20, eos_token_id=None, stop_strings=[stop])[0, 5:]
    text = tok.encoding.decode_bytes(out.tolist()).decode("utf-8", errors="ignore")
    assert stop in text and len(out) <= 8
    assert stop not in tok.encoding.decode_bytes(out[:-1].tolist()).decode("utf-8", errors="ignore")


def test_stream_text_decodes_to_generated_text(tiny):
    tok = Tokenizer.default()
    ids = _prompt(5, seed=14)
    pieces = list(stream_text(tiny, tok, ids, max_new_tokens=20, eos_token_id=None))
    new = tiny.generate(ids, max_new_tokens=20, eos_token_id=None)[0, 5:]
    assert "".join(pieces) == tok.encoding.decode(new.tolist(), errors="replace")


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0, do_sample=True), "temperature must be a number >= 0"),
    (dict(temperature=0.0, do_sample=True), "temperature 0 with do_sample=True"),
    (dict(top_p=0.0, do_sample=True), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5, do_sample=True), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2, do_sample=True), "top_k must be a positive integer"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=36), r"prompt of 5 tokens \+ max_new_tokens=36 exceeds .* n_positions=40"),
    (dict(eos_token_id=5000), "eos_token_id 5000 is outside the vocabulary"),
    (dict(pad_token_id=1000), "pad_token_id 1000 is outside the vocabulary 0..999"),
    (dict(pad_token_id=-1), "pad_token_id -1 is outside the vocabulary"),
    (dict(stop_strings=[""]), "empty stop string"),
    (dict(seed=-1, do_sample=True), r"seed must be an integer >= 0 \(or None\), found -1"),
    (dict(seed=1.5, do_sample=True), r"seed must be an integer >= 0 \(or None\), found 1\.5"),
])
def test_bad_generation_arguments(tiny, kwargs, match):
    with pytest.raises(GPT2Error, match=match):
        tiny.generate(_prompt(5), **{"max_new_tokens": 10, **kwargs})


def test_context_limit_is_exact(tiny):
    """Up to n_positions in all is allowed, and the last token is a real prediction."""
    out = tiny.generate(_prompt(5), max_new_tokens=35, eos_token_id=None)
    assert out.shape == (1, 40)


@pytest.mark.parametrize("length", [40, 41])
def test_prompt_too_long_for_any_token_says_so(tiny, length):
    """A prompt that fills the context names the prompt, not "at most 0 new tokens"."""
    with pytest.raises(GPT2Error, match=rf"prompt of {length} tokens is too long for the model's "
                                        r"context of n_positions=40; shorten it to at most 39 tokens") as info:
        tiny.generate(_prompt(length), max_new_tokens=1)
    assert "new tokens" not in str(info.value)
