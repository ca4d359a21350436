"""The fast twins (`kernels`) against torch.nn.functional on the same random input, with the
tolerances of test_ops.py (see there): each twin on every path it can take (a few rows through
the Numba loops, thin and many rows through the BLAS called from Numba's threads, and the
np.matmul fallback where ?gemm is not found), and the float32 maths those paths use.

The tests of test_ops.py that take `impl` run here again with the twins in its place: the same
references, the same tolerances.
"""

import numpy as np
import pytest

from numpy_gpt2 import kernels, ops
from numpy_gpt2.kernels import float32math, products
from numpy_gpt2.kernels.blas import GEMM_ADDRESS
from numpy_gpt2.kernels.products import Band
from test_ops import (  # noqa: F401  (the shared tests and their fixtures, collected here too)
    LAYOUTS, PRODUCT_TOL, ROWS, TOL, _random, dtype, test_causal_attention_ignores_unfilled_cache_positions,
    test_causal_attention_key_mask_matches_sdpa, test_causal_attention_matches_sdpa, test_layer_norm_matches_torch,
    test_linear_matches_torch)

torch = pytest.importorskip("torch")
F = torch.nn.functional


class _Twins:
    """The kernels under the names of the ops they are the twins of."""

    layer_norm = staticmethod(kernels.layer_norm)
    linear = staticmethod(kernels.linear)
    attention = causal_attention = staticmethod(kernels.causal_attention)  # of ops.attention


@pytest.fixture
def impl():
    return _Twins


@pytest.mark.parametrize("path", ["gemm with the bias in", "matmul, then the bias"])
@pytest.mark.parametrize("rows", [65, 200])
def test_linear_many_rows_both_blas_paths_match_torch(dtype, rows, path, monkeypatch):
    """Beyond THIN_ROWS the bias goes into each output band first and the BLAS's own ?gemm adds
    the product to it; where the BLAS does not export ?gemm, np.matmul and then the bias."""
    if path.startswith("gemm") and GEMM_ADDRESS[np.dtype(dtype).type] is None:
        pytest.skip("NumPy's BLAS does not export cblas_?gemm64_ (not scipy-openblas64)")
    if not path.startswith("gemm"):
        monkeypatch.setitem(GEMM_ADDRESS, np.dtype(dtype).type, None)
    x, weight, bias = _random((rows, 61), dtype), LAYOUTS["out-in"](_random((61, 173), dtype, 1)), _random(173, dtype, 2)
    out = kernels.linear(x, weight, bias)
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(weight.T.copy()), torch.from_numpy(bias))
    np.testing.assert_allclose(out, ref.numpy(), **PRODUCT_TOL[dtype])


@pytest.mark.parametrize("blas", ["?gemm", "np.matmul"])
@pytest.mark.parametrize("target", ["contiguous", "strided"])
@pytest.mark.parametrize("rows", ROWS + [200])
def test_linear_add_to_adds_onto_the_target_as_torch(dtype, rows, target, blas, monkeypatch):
    """A residual sum, add_to += linear(x): beyond THIN_ROWS into a C-contiguous target the
    BLAS adds each band's product onto it; every other case adds a product made apart. Both
    against torch, and the same array comes back."""
    if blas == "np.matmul":
        monkeypatch.setitem(GEMM_ADDRESS, np.dtype(dtype).type, None)
    x, weight, bias = _random((rows, 61), dtype), LAYOUTS["out-in"](_random((61, 173), dtype, 1)), _random(173, dtype, 2)
    residual = _random((rows, 173), dtype, 3, scale=5.0)
    add_to = residual.copy() if target == "contiguous" else np.repeat(residual, 2, axis=1)[:, ::2]
    out = kernels.linear(x, weight, bias, add_to=add_to)
    ref = torch.from_numpy(residual) + F.linear(torch.from_numpy(x), torch.from_numpy(weight.T.copy()),
                                                torch.from_numpy(bias))
    assert out is add_to
    np.testing.assert_allclose(add_to, ref.numpy(), **PRODUCT_TOL[dtype])


def test_linear_add_to_of_the_wrong_shape_is_refused():
    x, weight, bias = _random((3, 4), np.float32), _random((4, 5), np.float32), _random(5, np.float32)
    add_to = np.zeros((3, 6), np.float32)
    with pytest.raises(ValueError, match=r"add_to must be a float32 array of shape \(3, 5\), found float32 \(3, 6\)"):
        kernels.linear(x, weight, bias, add_to=add_to)
    assert not add_to.any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", ROWS)
def test_linear_gelu_matches_torch(dtype, rows, layout):
    """The fused kernel against torch's linear followed by its tanh GELU, on a [2, T, K] input."""
    x = _random((2, (rows + 1) // 2, 61), dtype)
    weight, bias = LAYOUTS[layout](_random((61, 70), dtype, 1)), _random(70, dtype, 2)
    out = kernels.linear_gelu(x, weight, bias)
    ref = F.gelu(F.linear(torch.from_numpy(x), torch.from_numpy(weight.T.copy()), torch.from_numpy(bias)),
                 approximate="tanh")
    assert out.dtype == dtype and out.shape == x.shape[:2] + (70,)
    np.testing.assert_allclose(out, ref.numpy(), **PRODUCT_TOL[dtype])


@pytest.mark.parametrize("rows", ROWS)
def test_matmul_transposed_matches_torch(dtype, rows):
    """The tied head, x @ wte.T, with a strided x as the model may hand it."""
    x = _random((rows, 122), dtype)[:, ::2]
    weight = _random((301, 61), dtype, 1)
    out = kernels.matmul_transposed(x, weight)
    ref = torch.from_numpy(x.copy()) @ torch.from_numpy(weight).T
    assert out.dtype == dtype and out.shape == (rows, 301) and out.flags.c_contiguous
    np.testing.assert_allclose(out, ref.numpy(), **PRODUCT_TOL[dtype])


def test_matmul_transposed_into_out_and_a_bad_out():
    x, weight = _random((70, 61), np.float32), _random((301, 61), np.float32, 1)
    out = np.empty((70, 301), np.float32)
    assert kernels.matmul_transposed(x, weight, out) is out
    np.testing.assert_allclose(out, (torch.from_numpy(x) @ torch.from_numpy(weight).T).numpy(),
                               **PRODUCT_TOL[np.float32])
    for bad in (np.empty((70, 300), np.float32), np.empty((70, 301), np.float64), np.empty((301, 70), np.float32).T):
        with pytest.raises(ValueError, match="out must be a C-contiguous float32 array of shape"):
            kernels.matmul_transposed(x, weight, bad)


@pytest.mark.parametrize("name", ["layer_norm"])
def test_kernels_agree_with_ops_on_non_contiguous_input(name):
    """The twins on a strided view (what the model hands them after a reshape)."""
    x = _random((6, 40), np.float32)[:, ::2]
    args = (x, _random(20, np.float32, 1), _random(20, np.float32, 2), 1e-5)
    np.testing.assert_allclose(getattr(kernels, name)(*args), getattr(ops, name)(*args), rtol=1e-5, atol=1e-6)


# ---- the BLAS called from Numba's threads (kernels.blas.gemm) --------------------------------

needs_gemm = pytest.mark.skipif(GEMM_ADDRESS[np.float32] is None,
                                reason="NumPy's BLAS does not export cblas_?gemm64_ (not scipy-openblas64)")


@needs_gemm
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
@pytest.mark.parametrize("mode", ["plain", "plus bias", "then gelu", "onto"])
def test_bands_in_pool_match_torch_for_any_number_of_parts(dtype, parts, mode):
    """Every band of output columns, however the columns are cut (7 parts of 173 leave a short
    last one), is the product torch computes, with its bias or its GELU, or added with the
    bias onto what out held."""
    x, weight_t, bias = _random((70, 61), dtype), _random((173, 61), dtype, 1), _random(173, dtype, 2)
    out, product = np.full((70, 173), np.nan, dtype), np.full((70, 173), np.nan, dtype)
    held = _random((70, 173), dtype, 3, scale=5.0)
    if mode == "onto":
        out[...] = held
    band = {"plain": Band.PRODUCT, "plus bias": Band.PLUS_BIAS, "then gelu": Band.THEN_GELU,
            "onto": Band.ADDED_ONTO}[mode]
    products._bands_in_pool(GEMM_ADDRESS[dtype], x, weight_t, out, bias, product, band, parts,
                            dtype == np.float32)
    ref = torch.from_numpy(x) @ torch.from_numpy(weight_t).T
    if mode == "then gelu":
        np.testing.assert_allclose(product, ref.numpy(), **PRODUCT_TOL[dtype])
        ref = F.gelu(ref + torch.from_numpy(bias), approximate="tanh")
    elif mode == "plus bias":
        ref = ref + torch.from_numpy(bias)
    elif mode == "onto":
        ref = torch.from_numpy(held) + (ref + torch.from_numpy(bias))
    np.testing.assert_allclose(out, ref.numpy(), **PRODUCT_TOL[dtype])


@pytest.mark.parametrize("path", ["Numba's threads", "Python's threads"])
def test_prompt_attention_both_paths_match_sdpa(dtype, path, monkeypatch):
    """A padded prompt of 150 positions after 21 cached ones (several query blocks, padding in both
    rows) through the pool's ?gemm calls and through the fallback's np.matmul in run_in_parts."""
    if path == "Numba's threads" and GEMM_ADDRESS[dtype] is None:
        pytest.skip("NumPy's BLAS does not export cblas_?gemm64_ (not scipy-openblas64)")
    if path == "Python's threads":
        monkeypatch.setitem(GEMM_ADDRESS, dtype, None)
    B, H, T, start, D = 2, 3, 150, 21, 16
    S = start + T
    q_all, k, v = (_random((B, H, S, D), dtype, seed, scale=2.0) for seed in (7, 8, 9))
    key_mask = np.ones((B, S), bool)
    key_mask[0, :5] = False
    key_mask[1, 30:40] = False
    allowed = np.tril(np.ones((S, S), bool))[None, None] & key_mask[:, None, None, :]
    # torch in float64 on the same inputs; values of scale 2 weighted over up to 171 keys leave a
    # few float32 ulps of the output's scale, as a product does (PRODUCT_TOL).
    ref = F.scaled_dot_product_attention(*(torch.from_numpy(a.astype(np.float64)) for a in (q_all, k, v)),
                                         attn_mask=torch.from_numpy(allowed), scale=0.2).numpy()
    out = kernels.causal_attention(q_all[:, :, start:].transpose(0, 2, 1, 3), k, v, key_mask, start, 0.2)
    expected = ref[:, :, start:].transpose(0, 2, 1, 3).reshape(B, T, H * D)
    np.testing.assert_allclose(out, expected, **PRODUCT_TOL[dtype])


@pytest.mark.parametrize("path", ["Numba's threads", "Python's threads"])
@pytest.mark.parametrize("T, keep", [(150, 150), (150, 40), (1, 1)], ids=["prompt", "last 40 kept", "one row"])
def test_attention_stores_the_new_keys_and_values_first(dtype, T, keep, path, monkeypatch):
    """With new_k, new_v (strided views of a fused q/k/v product, as the model passes them) the
    T new positions go into the cache after 21 cached ones, and the last `keep` queries attend
    over all of them: the cache holds exactly the new keys and values, the rest of it untouched,
    and the result is torch's."""
    if path == "Python's threads":
        monkeypatch.setitem(GEMM_ADDRESS, dtype, None)
    B, H, D, start, capacity = 2, 3, 16, 21, 200
    S = start + T
    qkv = _random((B, T, 3, H, D), dtype, 5, scale=2.0)
    k, v = _random((B, H, capacity, D), dtype, 6), _random((B, H, capacity, D), dtype, 7)
    k_before, v_before = k.copy(), v.copy()
    out = kernels.causal_attention(qkv[:, T - keep:, 0], k, v, np.ones((B, capacity), bool), S - keep, 0.2,
                                   new_k=qkv[:, :, 1], new_v=qkv[:, :, 2])
    new_k, new_v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in (1, 2))
    np.testing.assert_array_equal(k[:, :, start:S], new_k)
    np.testing.assert_array_equal(v[:, :, start:S], new_v)
    for after, before in ((k, k_before), (v, v_before)):
        np.testing.assert_array_equal(after[:, :, :start], before[:, :, :start])
        np.testing.assert_array_equal(after[:, :, S:], before[:, :, S:])
    q_all = np.concatenate([_random((B, H, start, D), dtype, 8), qkv[:, :, 0].transpose(0, 2, 1, 3)], axis=2)
    keys, values = (np.concatenate([before[:, :, :start], new], axis=2) for before, new in ((k_before, new_k),
                                                                                            (v_before, new_v)))
    ref = F.scaled_dot_product_attention(*(torch.from_numpy(a.astype(np.float64)) for a in (q_all, keys, values)),
                                         is_causal=True, scale=0.2).numpy()
    expected = ref[:, :, S - keep:].transpose(0, 2, 1, 3).reshape(B, keep, H * D)
    np.testing.assert_allclose(out, expected, **PRODUCT_TOL[dtype])


def test_float32_exp_matches_torch_in_float64():
    """The softmax's exp (Cephes' expf) over the arguments a centred softmax gives it, [-87, 0],
    within 2 float32 ulps of the exact value; 0 below -87; scale and shift applied first."""
    t = np.concatenate([np.linspace(-87, 0, 200_001), [-1e-7, -0.5, -86.99]]).astype(np.float32)
    row = (t * np.float32(2)).astype(np.float32)
    float32math.exp_float32_(row, len(row), np.float32(0.5), np.float32(0))
    exact = torch.exp(torch.from_numpy(t.astype(np.float64))).numpy()
    assert np.all(np.abs(row - exact) <= 2 * np.spacing(exact.astype(np.float32)))
    below = np.array([-87.5, -100, -np.inf, np.nan, np.copysign(np.nan, -1)], np.float32)
    float32math.exp_float32_(below, 5, np.float32(1), np.float32(0))
    assert np.all(below[:3] == 0) and np.all(np.isnan(below[3:]))


@pytest.mark.parametrize("sign", [1, -1], ids=["NaN", "negative NaN"])
def test_prompt_attention_spreads_a_nan_as_torch_does(dtype, sign):
    """A NaN key (of either sign bit, which the integer maximum orders differently) makes every
    query that sees it NaN, as in torch, and leaves the queries before it alone."""
    B, H, T, D = 1, 2, 70, 8
    q, k, v = (_random((B, H, T, D), dtype, seed) for seed in (1, 2, 3))
    k[0, 1, 40, 3] = np.copysign(np.nan, sign)
    out = kernels.causal_attention(q.transpose(0, 2, 1, 3), k, v, np.ones((B, T), bool), 0, 0.3)
    ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), is_causal=True, scale=0.3).numpy()
    expected = ref.transpose(0, 2, 1, 3).reshape(B, T, H * D)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert np.isnan(out[0, 40:, D:]).all() and not np.isnan(out[0, :40]).any()


def test_float32_masked_maximum_is_numpys():
    """The softmax's maximum over integers that order as the floats do: NumPy's maximum of
    the kept entries, for all-negative, mixed and signed-zero rows, -inf when none is kept."""
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(300).astype(np.float32) - 10, rng.standard_normal(77).astype(np.float32) * 1e3,
            np.array([-0.0, -1e-30, -np.inf, -5], np.float32), np.array([-np.inf, -np.inf], np.float32)]
    for row in rows:
        for padded in (False, True):
            mask = rng.random(len(row)) < 0.5 if padded else np.ones(len(row), bool)
            for last in (1, len(row) // 2, len(row)):
                kept = row[:last][mask[:last]]
                expected = kept.max() if len(kept) else -np.inf
                assert float32math.max_float32(row, last, mask, padded) == expected
    assert float32math.max_float32(rows[0], 3, np.zeros(300, bool), True) == -np.inf


def test_prompt_attention_with_queries_no_blas_can_take_matches_sdpa(dtype):
    """Queries that are one row broadcast over the positions (a step of 0 between rows) cannot
    be handed to ?gemm as they are; they take the other path and still match torch."""
    B, H, T, D = 1, 2, 70, 8
    q_row, k, v = _random((B, 1, H, D), dtype, 1), _random((B, H, T, D), dtype, 2), _random((B, H, T, D), dtype, 3)
    q = np.broadcast_to(q_row, (B, T, H, D))
    out = kernels.causal_attention(q, k, v, np.ones((B, T), bool), 0, 0.3)
    ref = F.scaled_dot_product_attention(torch.from_numpy(np.ascontiguousarray(q.transpose(0, 2, 1, 3))),
                                         torch.from_numpy(k), torch.from_numpy(v), is_causal=True, scale=0.3)
    np.testing.assert_allclose(out, ref.numpy().transpose(0, 2, 1, 3).reshape(B, T, H * D), **TOL[dtype])
