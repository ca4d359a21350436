"""The reference maths, op by op (`ops`), against torch.nn.functional on the same random input.

The fast twins (`kernels`) are held to the same tests and tolerances in test_kernels.py, which
runs the tests here that take `impl` again with the twins in its place.

Tolerances: float32 ops agree with torch to a few float32 ulps of the output's scale (rtol 1e-5,
atol 1e-6); float64 to 1e-12, what double rounding leaves after a sum over a few hundred terms.
Matrix products sum 61 terms in another order than torch, into outputs up to about 15 in size:
in float32 that leaves a few ulps of the output's scale (ulp(15) = 1e-6) on every element, so
they get atol 1e-5 there.
"""

import math

import numpy as np
import pytest

from numpy_gpt2 import ops

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}
PRODUCT_TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: TOL[np.float64]}


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def impl():
    """The implementation under test: the reference here, the twins in test_kernels.py."""
    return ops


def _random(shape, dtype, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("T", [5, 101], ids=["few rows", "many rows"])
def test_layer_norm_matches_torch(impl, dtype, T):
    x = _random((2, T, 96), dtype, scale=3.0) + dtype(0.5)
    gamma, beta = _random(96, dtype, 1), _random(96, dtype, 2)
    out = impl.layer_norm(x, gamma, beta, 1e-5)
    ref = F.layer_norm(torch.from_numpy(x), (96,), torch.from_numpy(gamma), torch.from_numpy(beta), eps=1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_allclose(out, ref.numpy(), **TOL[dtype])


def test_gelu_tanh_matches_torch(dtype):
    x = _random((3, 7, 50), dtype, scale=4.0)
    out = ops.gelu_tanh(x)
    ref = F.gelu(torch.from_numpy(x), approximate="tanh")
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_allclose(out, ref.numpy(), **TOL[dtype])


def test_softmax_matches_torch(dtype):
    x = _random((4, 3, 33), dtype, scale=10.0)
    out = ops.softmax(x)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, F.softmax(torch.from_numpy(x), dim=-1).numpy(), **TOL[dtype])


@pytest.mark.parametrize("T, start", [(9, 0), (1, 8), (4, 5), (300, 0), (150, 21)],
                         ids=["prefill", "decode", "chunk", "long-prefill", "long-chunk"])
def test_causal_attention_matches_sdpa(impl, dtype, T, start):
    """Queries at positions start..start+T-1 over S = start + T keys, against torch's causal SDPA."""
    B, H, D = 2, 3, 16
    S = start + T
    q_all = _random((B, H, S, D), dtype, 1)
    k, v = _random((B, H, S, D), dtype, 2), _random((B, H, S, D), dtype, 3)
    ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q_all, k, v)), is_causal=True)
    q = q_all[:, :, start:].transpose(0, 2, 1, 3)                               # [B, T, H, D]
    out = impl.causal_attention(q, k, v, np.ones((B, S), bool), start, 1 / math.sqrt(D))
    assert out.dtype == dtype and out.shape == (B, T, H * D)
    expected = ref.numpy()[:, :, start:].transpose(0, 2, 1, 3).reshape(B, T, H * D)
    np.testing.assert_allclose(out, expected, **TOL[dtype])


def test_causal_attention_key_mask_matches_sdpa(impl, dtype):
    """Padding keys masked out, as torch does with a boolean attn_mask; other scale factors."""
    B, H, S, D = 2, 2, 6, 8
    q, k, v = (_random((B, H, S, D), dtype, s) for s in (4, 5, 6))
    key_mask = np.ones((B, S), bool)
    key_mask[1, :2] = False                                                     # row 1 left-padded
    causal = np.tril(np.ones((S, S), bool))
    allowed = causal[None, None] & key_mask[:, None, None, :]
    ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), attn_mask=torch.from_numpy(allowed),
                                         scale=0.3).numpy()
    out = impl.causal_attention(q.transpose(0, 2, 1, 3), k, v, key_mask, 0, 0.3)
    expected = ref.transpose(0, 2, 1, 3).reshape(B, S, H * D)
    # Rows 1, positions 0-1 see no key at all: torch gives NaN there, we give zeros.
    assert np.all(out[1, :2] == 0)
    np.testing.assert_allclose(out[0], expected[0], **TOL[dtype])
    np.testing.assert_allclose(out[1, 2:], expected[1, 2:], **TOL[dtype])


# Row counts on both sides of kernels.FEW_ROWS (Numba loops up to it, BLAS beyond) and of the
# thin-row path (kernels.THIN_ROWS); 1-8 rows cover the Numba loop's groups of four rows and the
# rest.
ROWS = [1, 3, 4, 5, 8, 9, 64, 65]


# A weight [in, out] as a file holds it, and as the model holds it: the view through .T of an
# [out, in] array (see memory.blocks_in_one_array).
LAYOUTS = {"in-out": lambda w: w, "out-in": lambda w: np.ascontiguousarray(w.T).T}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", ROWS)
def test_linear_matches_torch(impl, dtype, rows, layout):
    x, weight, bias = _random((rows, 61), dtype), LAYOUTS[layout](_random((61, 45), dtype, 1)), _random(45, dtype, 2)
    out = impl.linear(x, weight, bias)
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(weight.T.copy()), torch.from_numpy(bias))
    assert out.dtype == dtype and out.shape == (rows, 45)
    np.testing.assert_allclose(out, ref.numpy(), **PRODUCT_TOL[dtype])


def test_float32_constants_do_not_promote():
    """Under NumPy 2 a float64 scalar times a float32 array is float64; no op may do that."""
    x = _random((2, 8), np.float32)
    g, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    for out in (ops.gelu_tanh(x), ops.layer_norm(x, g, b, 1e-5), ops.softmax(x),
                ops.linear(x, np.eye(8, dtype=np.float32), b)):
        assert out.dtype == np.float32


@pytest.mark.parametrize("T, start", [(1, 7), (3, 4)], ids=["decode", "chunk"])
def test_causal_attention_ignores_unfilled_cache_positions(impl, T, start):
    """k, v may be a whole cache: positions past start+T-1 hold garbage that must not leak in."""
    B, H, D, capacity = 2, 3, 16, 20
    S = start + T
    q_all = _random((B, H, S, D), np.float32, 1)
    k, v = _random((B, H, capacity, D), np.float32, 2), _random((B, H, capacity, D), np.float32, 3)
    k[:, :, S:], v[:, :, S:] = 1e3, np.nan
    ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q_all, k[:, :, :S].copy(), v[:, :, :S].copy())),
                                         is_causal=True)
    q = q_all[:, :, start:].transpose(0, 2, 1, 3)
    out = impl.causal_attention(q, k, v, np.ones((B, capacity), bool), start, 1 / math.sqrt(D))
    expected = ref.numpy()[:, :, start:].transpose(0, 2, 1, 3).reshape(B, T, H * D)
    np.testing.assert_allclose(out, expected, **TOL[np.float32])


def test_gpt2_with_past_equals_one_pass_and_transformers(tiny_ref):
    """`ops.gpt2` in two calls, the second over the first's `past` (keys and values), against one
    call over all positions and against transformers' logits (float64, left-padded rows).
    The reference here is GPT2LMHeadModel; the split run is held to 1e-12 of the one-pass one
    (the same sums, the keys of the first call concatenated rather than computed together)."""
    from numpy_gpt2 import GPT2

    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype="float64")
    rng = np.random.default_rng(5)
    ids = rng.integers(0, model.config.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    params, first = model.params(), 7
    whole = ops.gpt2(params, ids, model.config, mask)
    head = ops.gpt2(params, ids[:, :first], model.config, mask[:, :first])
    tail = ops.gpt2(params, ids[:, first:], model.config, mask, past=head["past"])
    np.testing.assert_allclose(tail["logits"], whole["logits"][:, first:], rtol=0, atol=1e-12)
    assert [a.shape for a in tail["attentions"]] == [(2, model.config.n_head, 12 - first, 12)] * model.config.n_layer
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = tiny_ref.logits(ids, dtype="float64", attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)  # a padding query sees no key here; transformers' sees all of them
    np.testing.assert_allclose(whole["logits"][real], expected[real], rtol=0, atol=1e-9)
