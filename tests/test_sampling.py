"""The logits warpers at their boundaries, against Hugging Face transformers' own warpers.

The reference is the list transformers' `generate` builds for sampling (GenerationMixin.
_get_logits_processor, one token kept at least): TemperatureLogitsWarper when temperature != 1,
TopKLogitsWarper when top_k is neither None nor 0, TopPLogitsWarper when top_p < 1, applied in
that order to the same scores. Both sides must remove the same tokens (-inf) and leave the
others at the same values.

A cumulative probability that lands exactly on top_p needs probabilities that are exact binary
fractions after the softmax, and exp is exact only at 0: so n tokens share logit 0 (each
probability exactly 1/n, n a power of two) and the rest sit far below (probability exactly 0).
The kept set then has a size known by hand, whatever order ties are sorted in.
"""

import numpy as np
import pytest

from numpy_gpt2 import GPT2Error
from numpy_gpt2.generate import Sampling, next_tokens, warp_logits

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def _transformers_warp(scores: np.ndarray, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """scores [B, V] warped as transformers' generate does for do_sample=True."""
    warpers = logits_process.LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(logits_process.TemperatureLogitsWarper(float(temperature)))
    if top_k:
        warpers.append(logits_process.TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(logits_process.TopPLogitsWarper(top_p))
    return warpers(None, torch.from_numpy(scores)).numpy()


def _assert_same_warp(scores, temperature=1.0, top_k=None, top_p=None, ties=False):
    """Ours against transformers on the same scores; -> our warped scores [B, V].

    ties: the scores hold ties at a cutoff. Which of several equal tokens top-p drops is then
    the order its sort leaves them in, and torch's default sort is not stable (beyond 16
    values it reorders equal ones), so there the kept values are compared as a multiset: the
    same number of tokens, of the same scores. float32 scores: transformers divides by the
    temperature in float32, ours in float64, so the values agree to one float32 rounding.
    """
    expected = _transformers_warp(scores, temperature, top_k, top_p)
    ours = warp_logits(scores, Sampling(True, temperature, top_k, top_p))
    rtol = 2.0 ** -23 if scores.dtype == np.float32 else 1e-15
    assert not np.isnan(ours).any() and not np.isposinf(ours).any()
    if ties:
        for mine, theirs in zip(ours, expected):
            np.testing.assert_allclose(np.sort(mine[np.isfinite(mine)]), np.sort(theirs[np.isfinite(theirs)]),
                                       rtol=rtol, atol=0)
        return ours
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected))
    kept = np.isfinite(expected)
    np.testing.assert_allclose(ours[kept], expected[kept], rtol=rtol, atol=0)
    return ours


def _ties(n_equal: int, vocab: int, dtype, seed=0, far=-1e4) -> np.ndarray:
    """[2, vocab]: in each row n_equal tokens at logit 0, the others at `far`, places shuffled."""
    rng = np.random.default_rng(seed)
    rows = np.full((2, vocab), far, dtype=dtype)
    for row in rows:
        row[rng.choice(vocab, n_equal, replace=False)] = 0
    return rows


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kept", range(1, 8))
def test_top_p_landing_exactly_on_the_cumulative_probability(dtype, kept):
    """8 tokens of probability 1/8 and 24 of 0; top_p = kept/8. The least likely tokens whose
    probabilities sum to at most 1 - top_p go: the 24 zeros and 8 - kept of the eighths, whose
    running sum reaches 1 - top_p exactly on the last one removed, so exactly `kept` remain."""
    scores = _ties(8, 32, dtype, seed=kept)
    ours = _assert_same_warp(scores, top_p=kept / 8, ties=True)
    assert (np.isfinite(ours).sum(axis=1) == kept).all()
    assert (scores[np.isfinite(ours)] == 0).all()


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75, 0.875, 0.9375, 0.96875])
def test_top_p_on_binary_fraction_probabilities(top_p):
    """Probabilities 1/2, 1/4, ..., 1/32, 1/32 from their logarithms (exp(log p) is p within an
    ulp, so the sums land on the cutoffs up to rounding, which both sides do in float64)."""
    p = np.array([1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 32])
    scores = np.log(np.stack([p, p[::-1]]))
    _assert_same_warp(scores, top_p=top_p)


@pytest.mark.parametrize("temperature", [1e-6, 0.01, 1.0, 100.0, 1e6])
@pytest.mark.parametrize("top_p", [1 / 8, 1 / 2, 7 / 8])
def test_top_p_boundary_holds_at_any_temperature(temperature, top_p):
    """Equal logits stay equal and zero probabilities stay zero under any temperature that keeps
    the far tokens far (at 1e6, -1e10 / 1e6 is still -1e4), so the boundary stays exact."""
    scores = _ties(16, 64, np.float64, far=-1e10)
    ours = _assert_same_warp(scores, temperature=temperature, top_p=top_p, ties=True)
    assert (np.isfinite(ours).sum(axis=1) == round(16 * top_p)).all()


@pytest.mark.parametrize("top_k, kept", [(1, 1), (2, 2), (3, 5), (4, 5), (5, 5), (6, 6), (9, 9), (10, 10), (50, 10)])
def test_ties_at_the_top_k_cutoff_are_all_kept(top_k, kept):
    """Logits 5, 4, 3, 3, 3, 2, 1, 0, -1, -2 (shuffled): every token tied with the k-th largest
    stays, as in transformers (`scores < k-th largest` removed); top_k >= V removes nothing."""
    row = np.array([5, 4, 3, 3, 3, 2, 1, 0, -1, -2], dtype=np.float64)
    scores = np.stack([row, np.random.default_rng(top_k).permutation(row)])
    ours = _assert_same_warp(scores, top_k=top_k, ties=True)
    assert (np.isfinite(ours).sum(axis=1) == kept).all()


def test_ties_at_the_maximum_with_top_k_1():
    scores = np.array([[1.0, 7.0, 7.0, -3.0, 7.0]])
    ours = _assert_same_warp(scores, top_k=1, ties=True)
    np.testing.assert_array_equal(np.isfinite(ours[0]), [False, True, True, False, True])


@pytest.mark.parametrize("temperature", [1e-6, 1e-3, 0.5, 1.0, 2.0, 1e3, 1e6, 1e300])
@pytest.mark.parametrize("top_k, top_p", [(None, None), (None, 0.9), (20, None), (20, 0.5), (300, 0.99),
                                          (0, 1.0), (200, 1.0)])
def test_temperature_extremes_with_both_filters(temperature, top_k, top_p):
    """Random logits of model scale, in float64 (the precision both sides then warp in): at 1e-6
    the scores are ~1e7 apart and top-p keeps one token; at 1e300 they are ~1e-300 and every
    probability is 1/V up to rounding; top_p 1 and top_k 0 or >= V (200) disable their filters,
    as in transformers' generate."""
    scores = np.random.default_rng(3).standard_normal((3, 200)) * 4
    _assert_same_warp(scores, temperature=temperature, top_k=top_k, top_p=top_p)


@pytest.mark.parametrize("temperature", [0.01, 0.7, 1.0, 1.5, 100.0])
@pytest.mark.parametrize("top_k, top_p", [(None, 0.9), (40, None), (40, 0.6), (1, None)])
def test_float32_logits_as_the_model_gives_them(temperature, top_k, top_p):
    """The model's float32 logits: transformers warps them in float32, ours in float64."""
    scores = (np.random.default_rng(5).standard_normal((4, 1000)) * 4).astype(np.float32)
    _assert_same_warp(scores, temperature=temperature, top_k=top_k, top_p=top_p)


def test_nothing_is_removed_when_both_filters_are_off():
    scores = np.random.default_rng(4).standard_normal((2, 50))
    ours = warp_logits(scores, Sampling(True, 0.5, top_k=50, top_p=1.0))
    np.testing.assert_allclose(ours, scores / 0.5, rtol=1e-15)


def test_draws_come_only_from_the_kept_tokens():
    """3 of 8 equally likely tokens kept by top_p = 3/8: 3000 draws give exactly three tokens,
    each of logit 0 and each about a third of the time (a binomial bound of 5 standard
    deviations)."""
    scores = _ties(8, 32, np.float64, seed=9)[:1]
    sampling = Sampling(True, 1.0, None, 3 / 8)
    rng = np.random.default_rng(0)
    draws = np.array([next_tokens(scores, sampling, rng)[0] for _ in range(3000)])
    kept, counts = np.unique(draws, return_counts=True)
    assert len(kept) == 3 and (scores[0, kept] == 0).all()
    assert (np.abs(counts - 1000) < 5 * np.sqrt(3000 * (1 / 3) * (2 / 3))).all(), counts


def test_a_temperature_so_small_that_the_scores_overflow_is_an_error():
    """logits / 1e-310 overflows float64 to inf, and a softmax of infinities is NaN: transformers'
    sampler then refuses (torch.multinomial on NaN); ours says which argument did it, instead
    of drawing from NaNs."""
    scores = np.array([[3.0, -2.0, 0.5]], dtype=np.float32)
    sampling = Sampling(True, 1e-310)
    with pytest.raises(GPT2Error, match=r"temperature 1e-310 is too small.*do_sample=False"):
        warp_logits(scores, sampling)
    with pytest.raises(GPT2Error, match="temperature 1e-310 is too small"):
        next_tokens(scores, sampling, np.random.default_rng(0))
