"""Every published GPT-2 size loads through the same paths, checked against transformers.

The shapes are the presets' (n_embd, n_head, MLP width); where memory or time demands it the
vocabulary and depth are cut (the code paths do not depend on them). gpt2-medium is also run
once at its full shape (355M parameters), marked slow.
"""

import numpy as np
import pytest

from conftest import PUBLISHED, build_reference, tolerance
from numpy_gpt2 import GPT2


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_reduced_size_matches_transformers(name, tmp_path):
    n_embd, _, n_head = PUBLISHED[name]
    config = dict(vocab_size=512, n_positions=64, n_embd=n_embd, n_layer=2, n_head=n_head)
    ref = build_reference(config, tmp_path, seed=len(name))
    ids = np.random.default_rng(0).integers(0, 512, (2, 24))
    expected = ref.logits(ids)
    for directory in (ref.pretrained_dir, ref.hub_dir):
        model = GPT2.from_pretrained(directory)
        assert model.config.head_dim == n_embd // n_head
        np.testing.assert_allclose(model(ids), expected, atol=tolerance(expected, "float32", config))


@pytest.mark.slow
def test_full_gpt2_medium_shape(tmp_path):
    ref = build_reference(dict(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16),
                          tmp_path, seed=355)
    ids = np.random.default_rng(1).integers(0, 50257, (1, 32))
    expected = ref.logits(ids)
    model = GPT2.from_pretrained(ref.hub_dir)
    assert model.num_parameters() == sum(p.numel() for p in ref.torch_model.parameters())
    np.testing.assert_allclose(model(ids), expected, atol=tolerance(expected, "float32", ref.config))
    greedy = model.generate(ids[:, :8], max_new_tokens=8, eos_token_id=None)
    import torch

    with torch.no_grad():
        hf = ref.torch_model.generate(torch.as_tensor(ids[:, :8]), max_new_tokens=8, do_sample=False,
                                      pad_token_id=0).numpy()
    np.testing.assert_array_equal(greedy, hf)
