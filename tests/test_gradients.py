"""The fast training pass (`numpy_gpt2.gradients`, behind `GPT2.loss_and_grads`) against the
reference it is the twin of: `ops.gpt2`, `ops.cross_entropy`, `ops.cross_entropy_backward` and
`ops.gpt2_backward`, on the same weights and batch. tests/test_backward.py holds the reference,
and the model, to torch's autograd.

Bounds, per tensor, relative to its largest reference gradient: float64 1e-12 (measured
<= 2e-15: the same sums in another order); float32 1e-5 (measured <= 1.6e-6 on these models:
float32 rounding through three layers and a loss over up to 1000 classes).
"""

import numpy as np
import pytest

from numpy_gpt2 import GPT2, inputs, ops

BOUND = {"float64": 1e-12, "float32": 1e-5}


def _reference(model, ids, labels, mask):
    ids, key_mask, targets = inputs.training_batch(ids, labels, mask, model.config)
    params = model.params()
    forward = ops.gpt2(params, ids, model.config, key_mask)
    logits = forward["logits"].reshape(-1, model.config.vocab_size)
    dlogits = ops.cross_entropy_backward(logits, targets.ravel()).reshape(forward["logits"].shape)
    grads = ops.gpt2_backward(dlogits, params, ids, model.config, forward, key_mask)
    return float(ops.cross_entropy(logits, targets.ravel())), ops.tensors_from_params(grads)


def _batch(vocab_size, B=3, T=17, seed=0):
    """Rows of different lengths (left padding), one ignored label."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (B, T))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :2] = 0
    labels = ids.copy()
    labels[0, 7] = -100
    return ids, labels, mask


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", ["tiny", "tiny-inner", "tiny-scaled"])
def test_fast_pass_equals_the_reference(tiny_refs, variant, dtype):
    model = GPT2.from_pretrained(tiny_refs[variant].hub_dir, dtype=dtype)
    ids, labels, mask = _batch(model.config.vocab_size)
    loss, grads = model.loss_and_grads(ids, labels, mask)
    expected_loss, expected = _reference(model, ids, labels, mask)
    assert grads.keys() == expected.keys() == model.parameters().keys()
    assert loss == pytest.approx(expected_loss, rel=BOUND[dtype])
    for name, g in expected.items():
        assert grads[name].dtype == np.dtype(dtype) and grads[name].shape == g.shape, name
        err = np.abs(grads[name] - g).max() / np.abs(g).max()
        assert err <= BOUND[dtype], f"{name}: {err:.2e}"


def test_reused_grads_and_buffers_give_the_same_result(tiny_ref):
    """A second call writing into the first call's grads, then a batch of another shape, then
    the first shape again: each equals a fresh call (no state leaks from one pass to the next)."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype="float64")
    first = _batch(model.config.vocab_size)
    other = _batch(model.config.vocab_size, B=4, T=9, seed=1)
    loss, grads = model.loss_and_grads(*first)
    fresh = {name: g.copy() for name, g in grads.items()}
    for batch in (other, first):
        loss_again, again = model.loss_and_grads(*batch, grads=grads)
        assert again is grads
    assert loss_again == loss
    for name, g in fresh.items():
        np.testing.assert_array_equal(grads[name], g, err_msg=name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_loss_loop_against_torch_with_far_apart_logits(dtype):
    """`gradients._cross_entropy_to_gradient_` (the loss and its gradient in place) against
    torch's cross_entropy and autograd, on rows where the target's logit is 200 below the row's
    maximum (its exp underflows in both dtypes) and on an ignored row."""
    torch = pytest.importorskip("torch")
    from numpy_gpt2 import gradients

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (5, 300)).astype(dtype)
    targets = np.array([7, 0, ops.IGNORE_INDEX, 299, 42])
    logits[1, 0] -= 200
    logits[3, 299] -= 200
    t = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(t, torch.from_numpy(targets), ignore_index=ops.IGNORE_INDEX)
    expected.backward()
    work = logits.copy()
    loss = gradients._cross_entropy_to_gradient_(work, targets, ops.IGNORE_INDEX)
    assert np.isfinite(loss) and loss == pytest.approx(expected.item(), rel=BOUND[dtype])
    assert np.abs(work - t.grad.numpy()).max() <= BOUND[dtype] * np.abs(t.grad.numpy()).max()


def test_grads_of_another_shape_are_refused(tiny_ref):
    """Reusing a dict that does not fit the model raises GPT2Error naming the tensor, before any
    work (the reference here is the model's own parameters' shapes)."""
    from numpy_gpt2 import GPT2Error

    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    ids = np.arange(10)
    _, grads = model.loss_and_grads(ids)
    grads["h.1.mlp.c_fc.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(GPT2Error, match=r"grads\['h.1.mlp.c_fc.weight'\] must be a float32 array of shape"):
        model.loss_and_grads(ids, grads=grads)
    del grads["wpe.weight"]
    with pytest.raises(GPT2Error, match=r"grads\['wpe.weight'\].*found missing"):
        model.loss_and_grads(ids, grads={k: v for k, v in grads.items() if k != "h.1.mlp.c_fc.weight"})
