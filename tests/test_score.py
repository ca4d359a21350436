"""numpy_gpt2.score against Hugging Face transformers.

References trusted here: transformers' GPT2LMHeadModel logits on the tiny reference checkpoints
(conftest.py) and on the bundled fortunes model, turned into log-probabilities by
torch.log_softmax and ranked by torch.topk; the windows of transformers' perplexity guide,
written out below from the guide's loop; bits per byte from its definition, by hand.

The guide's own code averages each window's loss and weights it by trg_len - 1 (an off-by-one of
its `num_loss_tokens`, which counts the window's first label although the shift drops it), so its
printed perplexity is not the exact per-token one. The reference here is the exact version of
that recipe: per-token log-probabilities from the logits over the same windows, summed.
"""

import math
import pathlib

import numpy as np
import pytest

from numpy_gpt2 import GPT2, ops
from numpy_gpt2.errors import GPT2Error
from numpy_gpt2.kernels import token_logprobs
from numpy_gpt2.score import score_ids, score_text, score_texts
from numpy_gpt2.tokenizer import Tokenizer

torch = pytest.importorskip("torch")

P = 40  # the tiny references' n_positions
FORTUNES = pathlib.Path(__file__).resolve().parents[1] / "weights" / "fortunes"
# Tolerances, relative, on a text's NLL: float64 leaves ~1e-15 (measured 4e-15 per token);
# float32 logits differ from torch's by ~1e-6 per token, far less on a sum (measured 3e-8).
NLL_RTOL = {"float64": 1e-9, "float32": 1e-5}
# Per token, absolute: float64 measured 4e-15; float32 measured 1.8e-6 (the logits' own error).
TOKEN_ATOL = {"float64": 1e-12, "float32": 1e-5}


def guide_windows(n_tokens, max_length, stride):
    """(begin, end, trg_len) of each window, as transformers' perplexity guide loops:

        prev_end_loc = 0
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc   # the labels counted: the window's last trg_len
            ...
            prev_end_loc = end_loc
            if end_loc == seq_len: break
    """
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def reference_logprobs(torch_model, ids, stride, dtype, top_k=0):
    """log p of each token after the first (index i: token i + 1), from transformers' logits over
    the guide's windows, each token from the window that counts it; and torch.topk of those
    log-softmax rows. Every token after the first must be counted exactly once."""
    model = torch_model.to(getattr(torch, dtype))
    n = len(ids)
    logprobs = np.full(n - 1, np.nan)
    top_ids, top_logprobs = np.zeros((n - 1, top_k), np.int64), np.zeros((n - 1, top_k))
    try:
        for begin, end, trg_len in guide_windows(n, model.config.n_positions, stride):
            with torch.no_grad():
                logits = model(torch.as_tensor(ids[None, begin:end])).logits[0]
            log_softmax = torch.log_softmax(logits, dim=-1)
            for t in range(end - trg_len, end):  # the counted labels, the token at t
                if t == begin:
                    continue  # the shift drops a window's first label
                assert np.isnan(logprobs[t - 1]), "a token counted twice"
                logprobs[t - 1] = float(log_softmax[t - begin - 1, ids[t]])
                if top_k:
                    values, where = torch.topk(log_softmax[t - begin - 1], top_k)
                    top_ids[t - 1], top_logprobs[t - 1] = where.numpy(), values.double().numpy()
    finally:
        torch_model.float()
    assert not np.isnan(logprobs).any(), "a token never counted"
    return logprobs, top_ids, top_logprobs


@pytest.fixture(scope="module")
def models(tiny_ref):
    return {dtype: GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype) for dtype in ("float32", "float64")}


# Shorter than, equal to, one longer than, and several windows longer than n_positions = 40;
# strides 15 and 17 divide neither the length nor the window.
CASES = [(17, 512), (40, 512), (41, 20), (137, 15), (137, 17), (200, 39)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_tokens, stride", CASES)
def test_score_ids_matches_transformers_sliding_window(models, tiny_ref, dtype, n_tokens, stride):
    ids = np.random.default_rng(n_tokens + stride).integers(0, 1000, n_tokens)
    reference, _, _ = reference_logprobs(tiny_ref.torch_model, ids, stride, dtype)
    score = score_ids(models[dtype], ids, stride=stride)
    assert score.tokens == n_tokens - 1
    np.testing.assert_array_equal(score.ids, ids)
    np.testing.assert_allclose(score.logprobs, reference, rtol=0, atol=TOKEN_ATOL[dtype])
    nll = -reference.sum()
    assert score.nll == pytest.approx(nll, rel=NLL_RTOL[dtype])
    assert score.perplexity == pytest.approx(math.exp(nll / (n_tokens - 1)), rel=NLL_RTOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_top_k_matches_torch_topk(models, tiny_ref, dtype):
    ids = np.random.default_rng(7).integers(0, 1000, 90)
    reference, top_ids, top_logprobs = reference_logprobs(tiny_ref.torch_model, ids, 25, dtype, top_k=5)
    score = score_ids(models[dtype], ids, stride=25, top_k=5)
    assert score.top_ids.shape == score.top_logprobs.shape == (89, 5)
    np.testing.assert_array_equal(score.top_ids, top_ids)
    np.testing.assert_allclose(score.top_logprobs, top_logprobs, rtol=0, atol=TOKEN_ATOL[dtype])
    np.testing.assert_allclose(score.logprobs, reference, rtol=0, atol=TOKEN_ATOL[dtype])
    assert score_ids(models[dtype], ids, stride=25).top_ids is None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_token_logprobs_kernel_matches_torch_log_softmax(dtype):
    """The head's reduction alone, against float64 torch on the same logits, of a wide range (a
    float32 exp underflows for the smallest): float64 to 1e-12 (measured 3e-14); float32 to 1e-7
    (measured 2e-8: the float32 exp's 2e-7 relative error on each term, summed in float64)."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((300, 5003)) * rng.uniform(0.1, 30, (300, 1))).astype(dtype)
    targets = rng.integers(0, 5003, 300)
    log_softmax = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    values, where = torch.topk(log_softmax, 4)
    top_ids, top_logprobs = np.empty((300, 4), np.int64), np.empty((300, 4))
    logprobs = token_logprobs(logits.copy(), targets, top_ids, top_logprobs)
    atol = 1e-12 if dtype == "float64" else 1e-7
    np.testing.assert_allclose(logprobs, log_softmax[np.arange(300), targets].numpy(), rtol=0, atol=atol)
    np.testing.assert_array_equal(top_ids, where.numpy())
    np.testing.assert_allclose(top_logprobs, values.numpy(), rtol=0, atol=atol)
    # ops.log_softmax, the reference the kernel is the twin of, is the same function.
    np.testing.assert_allclose(ops.log_softmax(logits.astype(np.float64)), log_softmax.numpy(), rtol=0, atol=1e-12)


def _words(tokenizer):
    """Space-led words that are one token each, below the tiny vocabulary's 1000: any sequence
    of them tokenizes to exactly their ids."""
    return [i for i in range(1000) if (p := tokenizer.decode([i])).startswith(" ") and p[1:].isalpha()
            and tokenizer.encode(p) == [i]]


def _texts(tokenizer, lengths, seed=0):
    words = _words(tokenizer)
    rng = np.random.default_rng(seed)
    return [tokenizer.decode(rng.choice(words, n)) for n in lengths]


# Batched against alone, per token: float32 measured up to 1.3e-6 (another number of rows in a
# product sums in another order, and may take another path), bound 5e-6; float64 measured 4e-15.
BATCH_ATOL = {"float64": 1e-12, "float32": 5e-6}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batched_equals_alone(models, dtype):
    """Texts of many lengths (empty, one token, exactly P, several windows) batched up to 400
    positions a batch (so the head runs in several chunks of rows) against each scored alone."""
    tokenizer = Tokenizer.default()
    lengths = [0, 1, 2, 5, 39, 40, 41, 7, 40, 90, 13, 200, 33, 1, 60, 25, 25, 25, 3, 38]
    texts = _texts(tokenizer, lengths)
    model = models[dtype]
    batched = score_texts(model, tokenizer, texts, stride=17, max_batch_tokens=400)
    assert len(batched) == len(texts)
    for text, n, got in zip(texts, lengths, batched):
        alone = score_text(model, tokenizer, text, stride=17)
        assert got.tokens == alone.tokens == max(n - 1, 0)
        np.testing.assert_array_equal(got.ids, alone.ids)
        np.testing.assert_allclose(got.logprobs, alone.logprobs, rtol=0, atol=BATCH_ATOL[dtype])
        assert got.n_bytes == alone.n_bytes == len(text.encode("utf-8"))


def test_batched_matches_transformers(models, tiny_ref):
    """The batched path on its own against the reference, float64, so a bug shared by the batched
    and the alone path cannot hide behind their agreement."""
    tokenizer = Tokenizer.default()
    lengths = [12, 40, 3, 77, 40, 21]
    texts = _texts(tokenizer, lengths, seed=1)
    for text, got in zip(texts, score_texts(models["float64"], tokenizer, texts, stride=30, max_batch_tokens=160)):
        reference, _, _ = reference_logprobs(tiny_ref.torch_model, np.array(tokenizer.encode(text)), 30, "float64")
        np.testing.assert_allclose(got.logprobs, reference, rtol=0, atol=1e-12)


def test_empty_and_one_token_texts_score_nothing(models):
    tokenizer = Tokenizer.default()
    for text in ("", " the"):
        score = score_text(models["float32"], tokenizer, text)
        assert score.tokens == 0 and score.nll == 0.0 and len(score.logprobs) == 0
        assert math.isnan(score.perplexity) and math.isnan(score.bits_per_byte)
        assert score.n_bytes == len(text)
    assert score_ids(models["float32"], []).tokens == 0


def test_bits_per_byte_with_the_bundled_model():
    """A non-ASCII text (its UTF-8 bytes more than its characters) through a full vocabulary of
    50257 (the head in chunks of many columns): NLL against transformers on the same weights,
    bits per byte = nll / ln 2 / UTF-8 bytes, by hand."""
    transformers = pytest.importorskip("transformers")
    if not (FORTUNES / "model.safetensors").exists():
        pytest.skip(f"needs the bundled model in {FORTUNES}")
    text = "Café au lait, naïve résumé: 10 € — « Ça va ? » said the fortune cookie, twice. " * 6
    tokenizer = Tokenizer.from_pretrained(FORTUNES)
    model = GPT2.from_pretrained(FORTUNES, dtype="float64")
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(FORTUNES).eval()
    ids = np.array(tokenizer.encode(text))
    assert len(ids) > model.config.n_positions // 2
    reference, _, _ = reference_logprobs(torch_model, ids, 100, "float64")
    score = score_text(model, tokenizer, text, stride=100)
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)
    assert score.n_bytes == n_bytes
    assert score.nll == pytest.approx(-reference.sum(), rel=1e-9)
    assert score.bits_per_byte == pytest.approx(-reference.sum() / math.log(2) / n_bytes, rel=1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda m: score_ids(m, np.arange(50), stride=0), "stride must be a positive integer"),
    (lambda m: score_ids(m, np.arange(50), stride=True), "stride must be a positive integer"),
    (lambda m: score_ids(m, np.arange(50), stride=40), "stride 40 must be less than the model's n_positions=40"),
    (lambda m: score_ids(m, np.arange(50), top_k=-1), "top_k must be an integer in 0..1000"),
    (lambda m: score_ids(m, np.arange(50), top_k=1001), "top_k must be an integer in 0..1000"),
    (lambda m: score_ids(m, np.zeros((2, 5), int)), "ids must be one text's token ids, shape (N,)"),
    (lambda m: score_ids(m, [3, 1000]), "input_ids contains 1000, outside the vocabulary 0..999"),
    (lambda m: score_ids(m, [0.5, 1.0]), "input_ids must be integers"),
    (lambda m: score_text(m, Tokenizer.default(), b"the"), "text must be a str, found bytes"),
    (lambda m: score_text(m, Tokenizer.default(), " the\ud800"), "text is not valid Unicode"),
    (lambda m: score_texts(m, Tokenizer.default(), [" the"], max_batch_tokens=0), "max_batch_tokens must be"),
])
def test_bad_arguments_raise_gpt2error(models, call, message):
    with pytest.raises(GPT2Error) as info:
        call(models["float32"])
    assert message in str(info.value)


def test_a_short_text_ignores_a_stride_it_does_not_need(models, tiny_ref):
    """stride 512 > n_positions is no error for a text that fits one window."""
    ids = np.random.default_rng(3).integers(0, 1000, 30)
    reference, _, _ = reference_logprobs(tiny_ref.torch_model, ids, 512, "float64")
    np.testing.assert_allclose(score_ids(models["float64"], ids).logprobs, reference, rtol=0, atol=1e-12)
