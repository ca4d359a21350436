"""The forward pass against Hugging Face transformers' GPT2LMHeadModel on the same weights.

Tolerances come from `conftest.tolerance`: in float32 u sqrt(n_layer n_embd) x max(1, max |logit|)
(about 2e-6 x max |logit| on the small variants, 2.3x the largest difference measured), 1e-9 in
float64 (against torch run in float64).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import VARIANTS, tolerance
from numpy_gpt2 import GPT2, GPT2Error, kernels

LAYOUTS = ["pretrained_dir", "hub_dir"]


def _ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_match_transformers(tiny_refs, variant, layout, dtype):
    ref = tiny_refs[variant]
    model = GPT2.from_pretrained(getattr(ref, layout), dtype=dtype)
    ids = _ids(ref.config["vocab_size"], (2, ref.config["n_positions"]))
    expected = ref.logits(ids, dtype=dtype)
    logits = model(ids)
    assert logits.dtype == np.dtype(dtype) and logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance(expected, dtype, ref.config))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 8, 9])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_decoding_steps_match_transformers(tiny_refs, variant, batch, dtype):
    """A prompt, then one position at a time: up to kernels.FEW_ROWS (8) rows a step goes
    through kernels.decode_block, beyond it through the ops one by one; both against
    transformers' logits for the whole sequence."""
    ref = tiny_refs[variant]
    model = GPT2.from_pretrained(ref.hub_dir, dtype=dtype)
    ids = _ids(ref.config["vocab_size"], (batch, 11), seed=batch)
    expected = ref.logits(ids, dtype=dtype)
    cache = model.new_cache(batch)
    steps = [model(ids[:, :7], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(7, 11)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, rtol=0,
                               atol=tolerance(expected, dtype, ref.config))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logits_match_transformers_124m_shape(gpt2_ref, dtype):
    ids = _ids(50257, (2, 64), seed=1)
    model = GPT2.from_pretrained(gpt2_ref.hub_dir, dtype=dtype)
    expected = gpt2_ref.logits(ids, dtype=dtype)
    logits = model(ids)
    assert logits.dtype == np.dtype(dtype)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance(expected, dtype, gpt2_ref.config))


@pytest.mark.slow
def test_124m_float32_layout_and_resident_size(gpt2_ref):
    """wpe stays memory-mapped; wte is a copy; the blocks' matrices are [out, in] copies seen as
    [in, out]; and loading plus a prompt and decoding steps adds at most 1.25x the file to the
    peak resident size of a fresh process (the OS's count), so the file pages the copies came
    from were handed back."""
    model = GPT2.from_pretrained(gpt2_ref.pretrained_dir)
    assert any(isinstance(a, np.memmap) for a in (model.wpe, model.wpe.base, getattr(model.wpe.base, "base", None)))
    assert model.wte.flags.owndata
    np.testing.assert_array_equal(model.wte, gpt2_ref.torch_model.transformer.wte.weight.detach().numpy())
    weight = model.h[11].mlp.c_proj.weight
    assert weight.shape == (3072, 768) and weight.T.flags.c_contiguous and weight.base.flags.owndata
    np.testing.assert_array_equal(weight, gpt2_ref.torch_model.transformer.h[11].mlp.c_proj.weight.detach().numpy())

    script = (
        "import sys, numpy as np\n"
        "from numpy_gpt2 import GPT2\n"
        "def peak(): return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
        "before = peak()\n"
        "model = GPT2.from_pretrained(sys.argv[1])\n"
        "cache = model.new_cache(1, 128)\n"
        "model(np.arange(64)[None], cache=cache, logits_to_keep=1)\n"
        "for _ in range(4): model(np.array([[7]]), cache=cache)\n"
        "print(peak() - before)\n"
    )
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc/self/status for the peak resident size")
    added_kib = int(subprocess.run([sys.executable, "-c", script, str(gpt2_ref.pretrained_dir)],
                                   capture_output=True, text=True, check=True).stdout)
    file_kib = os.path.getsize(gpt2_ref.pretrained_dir / "model.safetensors") / 1024
    # Holding the file's pages beside the copies would take about 1.7x.
    assert added_kib <= 1.25 * file_kib, f"{added_kib / 1024:.0f} MiB added for a {file_kib / 1024:.0f} MiB file"


def test_single_sequence_is_batch_of_one(tiny_ref):
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    ids = _ids(1000, 12)
    np.testing.assert_array_equal(model(ids), model(ids[None]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_op_stays_in_the_model_dtype(tiny_ref, dtype, monkeypatch):
    """Under NumPy 2 one float64 scalar promotes a float32 activation, and every product after
    it converts the weights (five times slower): every op of a prompt and of a decoding step,
    batch 2, takes and gives floats of the model's dtype only."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype)
    seen = []
    for name in ("layer_norm", "linear", "linear_gelu", "matmul_transposed", "causal_attention", "decode_block"):
        def checked(*args, _original=getattr(kernels, name), _name=name, **kwargs):
            out = _original(*args, **kwargs)
            floats = [a.dtype for a in (*args, *kwargs.values(), out) if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
            seen.append((_name, set(floats)))
            return out
        monkeypatch.setattr(kernels, name, checked)
    ids = _ids(1000, (2, 13), seed=4)
    cache = model.new_cache(2)
    model(ids[:, :12], cache=cache)                                  # 24 rows: the BLAS path
    logits = model(ids[:, 12:], cache=cache)                         # 2 rows: kernels.decode_block
    assert logits.dtype == np.dtype(dtype) and cache.k.dtype == np.dtype(dtype)
    # The prompt: 7 ops a block, then ln_f and the head; the step: one decode_block a block.
    assert len(seen) == (7 * tiny_ref.config["n_layer"] + 2) + (tiny_ref.config["n_layer"] + 2)
    assert all(dtypes == {np.dtype(dtype)} for _, dtypes in seen), [s for s in seen if s[1] != {np.dtype(dtype)}]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("chunks", [[12, 1, 1, 1], [1] * 15, [5, 7, 3]], ids=["prefill+decode", "tokenwise", "chunks"])
def test_cached_equals_uncached(tiny_ref, dtype, chunks):
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype)
    ids = _ids(1000, (2, sum(chunks)), seed=3)
    full = model(ids)
    cache = model.new_cache(2)
    bounds = np.cumsum([0] + chunks)
    pieces = [model(ids[:, a:b], cache=cache) for a, b in zip(bounds[:-1], bounds[1:])]
    assert cache.length == sum(chunks)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0,
                               atol=tolerance(full, dtype, tiny_ref.config))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("keep", [1, 3, 10, 25])
def test_logits_to_keep(tiny_ref, dtype, keep):
    """The last block runs only at the kept positions; the cache still gets all of them, so
    the steps after such a prompt match too."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype)
    ids = _ids(1000, (2, 13))
    expected = tiny_ref.logits(ids, dtype=dtype)
    cache = model.new_cache(2)
    logits = model(ids[:, :10], cache=cache, logits_to_keep=keep)
    assert logits.shape == (2, min(keep, 10), 1000)
    np.testing.assert_allclose(logits, expected[:, 10 - min(keep, 10):10], rtol=0,
                               atol=tolerance(expected, dtype, tiny_ref.config))
    rest = model(ids[:, 10:], cache=cache)                           # 3 positions: op by op
    np.testing.assert_allclose(rest, expected[:, 10:], rtol=0, atol=tolerance(expected, dtype, tiny_ref.config))


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True, None])
def test_bad_logits_to_keep_is_a_clear_error(tiny_ref, bad):
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    with pytest.raises(GPT2Error, match="logits_to_keep must be an integer >= 0"):
        model(_ids(1000, (1, 4)), logits_to_keep=bad)


@pytest.mark.parametrize("T, pad", [(9, 4), (4, 2)], ids=["prompt path", "decode_block (8 rows)"])
def test_left_padding_with_mask_matches_transformers(tiny_ref, T, pad):
    """Padded rows: transformers given the same mask and position ids is the reference. Two rows
    of 4 positions are at most kernels.FEW_ROWS rows, so they go through the decoding step's block."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    ids = _ids(1000, (2, T), seed=5)
    mask = np.ones((2, T), dtype=np.int64)
    mask[1, :pad] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = tiny_ref.logits(ids, attention_mask=mask, position_ids=positions)
    logits = model(ids, attention_mask=mask)
    tol = tolerance(expected, "float32", tiny_ref.config)
    np.testing.assert_allclose(logits[0], expected[0], atol=tol)
    np.testing.assert_allclose(logits[1, pad:], expected[1, pad:], atol=tol)
    alone = model(ids[1:, pad:])
    np.testing.assert_allclose(logits[1, pad:], alone[0], atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_prompt_over_several_attention_blocks_matches_transformers(long_ref, dtype):
    """A prompt of 190 positions takes the attention's queries in three blocks of 64 (the last
    partial): row 0 unpadded, row 1 with 70 positions of left padding (a whole block of them, its
    first token in the second block), row 2 with 5. Then the same prompt in two pieces over a
    cache (the second piece's blocks start at position 47, not at a block boundary), and two
    decoding steps over 190 keys. transformers, given the same mask and position ids, is the
    reference; at padded positions its values are arbitrary, so those are left out, and each
    padded row must also equal its real tokens run alone."""
    model = GPT2.from_pretrained(long_ref.hub_dir, dtype=dtype)
    ids = _ids(long_ref.config["vocab_size"], (3, 192), seed=11)
    mask = np.ones_like(ids)
    mask[1, :70] = 0
    mask[2, :5] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = long_ref.logits(ids, dtype, attention_mask=mask, position_ids=positions)
    tol = tolerance(expected, dtype, long_ref.config)
    real = mask.astype(bool)

    whole = model(ids[:, :190], attention_mask=mask[:, :190])
    np.testing.assert_allclose(whole[real[:, :190]], expected[:, :190][real[:, :190]], rtol=0, atol=tol)
    for row, pad in ((1, 70), (2, 5)):
        alone = model(ids[row:row + 1, pad:190])
        np.testing.assert_allclose(whole[row, pad:], alone[0], rtol=0, atol=tol)

    cache = model.new_cache(3)
    pieces = [model(ids[:, :47], attention_mask=mask[:, :47], cache=cache),
              model(ids[:, 47:190], attention_mask=mask[:, :190], cache=cache)]
    pieces += [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in (190, 191)]
    cached = np.concatenate(pieces, axis=1)
    np.testing.assert_allclose(cached[real], expected[real], rtol=0, atol=tol)


@pytest.mark.parametrize("bad, match", [
    (np.array([[1, 1000]]), "outside the vocabulary 0..999"),
    (np.array([[-1, 3]]), "outside the vocabulary"),
    (np.array([[0.5, 1.0]]), "must be integers"),
    (np.zeros((1, 0), dtype=int), "T >= 1"),
    (np.zeros((1, 2, 3), dtype=int), r"shape \(T,\) or \(B, T\)"),
    (np.zeros((1, 41), dtype=int), "41 positions, more than n_positions=40"),
])
def test_bad_input_ids_are_clear_errors(tiny_ref, bad, match):
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    with pytest.raises(GPT2Error, match=match):
        model(bad)


def test_cache_overflow_and_mask_shape_errors(tiny_ref):
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    cache = model.new_cache(1, capacity=8)
    model(_ids(1000, (1, 6)), cache=cache)
    with pytest.raises(GPT2Error, match="after 6 cached ones exceeds the cache capacity 8"):
        model(_ids(1000, (1, 3)), cache=cache)
    with pytest.raises(GPT2Error, match="attention_mask must have shape"):
        model(_ids(1000, (1, 3)), attention_mask=np.ones((1, 2)))
    with pytest.raises(GPT2Error, match="cache capacity must be in 1..40"):
        model.new_cache(1, capacity=41)
    with pytest.raises(GPT2Error, match="dtype must be one of"):
        GPT2.from_pretrained(tiny_ref.hub_dir, dtype="float16")


def test_num_parameters_matches_torch(tiny_ref):
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    assert model.num_parameters() == sum(p.numel() for p in tiny_ref.torch_model.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_trace_matches_transformers_hidden_states_and_attentions(tiny_refs, variant, dtype):
    """GPT2.trace against transformers' output_hidden_states / output_attentions (eager)."""
    import torch

    ref = tiny_refs[variant]
    ids = _ids(ref.config["vocab_size"], (2, 17), seed=8)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    model_t = ref.torch_model.to(getattr(torch, dtype))
    attentions = [m for m in model_t.modules() if hasattr(m, "reorder_and_upcast_attn")]
    upcast = [m.reorder_and_upcast_attn for m in attentions]
    for m in attentions:  # its upcast path refuses float64; the maths is the same (see conftest)
        m.reorder_and_upcast_attn = m.reorder_and_upcast_attn and dtype == "float32"
    try:
        with torch.no_grad():
            out = model_t(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          position_ids=torch.as_tensor(positions), output_hidden_states=True, output_attentions=True)
    finally:
        ref.torch_model.float()
        for m, flag in zip(attentions, upcast):
            m.reorder_and_upcast_attn = flag
    trace = GPT2.from_pretrained(ref.hub_dir, dtype=dtype).trace(ids, attention_mask=mask)
    assert len(trace.hidden_states) == len(out.hidden_states) == ref.config["n_layer"] + 1
    assert len(trace.attentions) == len(out.attentions) == ref.config["n_layer"]
    rows = [(0, slice(None)), (1, slice(5, None))]  # transformers' values at padded queries are arbitrary
    for ours, theirs in zip(trace.hidden_states + trace.attentions + [trace.logits],
                            list(out.hidden_states) + list(out.attentions) + [out.logits]):
        theirs = theirs.numpy()
        assert ours.dtype == np.dtype(dtype) and ours.shape == theirs.shape
        for b, t in rows:
            query_axis = 1 if ours.ndim == 3 else 2
            index = (b, t) if query_axis == 1 else (b, slice(None), t)
            np.testing.assert_allclose(ours[index], theirs[index], rtol=0,
                                       atol=tolerance(theirs[index], dtype, ref.config))


def test_trace_logits_equal_forward(tiny_ref):
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype="float64")
    ids = _ids(1000, (2, 20), seed=9)
    np.testing.assert_allclose(model.trace(ids).logits, model(ids), rtol=0, atol=1e-12)
