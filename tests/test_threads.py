"""Thread control: the BLAS and Numba pools follow set_threads, and the numbers do not depend on it."""

import numba
import numpy as np
import pytest

from conftest import tolerance
from numpy_gpt2 import GPT2, GPT2Error, threads


def test_set_threads_reaches_the_blas():
    before = threads.get_threads()
    if before is None:
        pytest.skip("NumPy's BLAS is not one numpy_gpt2.threads recognises (OpenBLAS or MKL)")
    try:
        threads.set_threads(1)
        assert threads.get_threads() == 1  # as the BLAS library itself reports it
    finally:
        threads.set_threads(before)


def test_set_threads_reaches_numba():
    before = numba.get_num_threads()
    try:
        threads.set_threads(1)
        assert numba.get_num_threads() == 1
        threads.set_threads(10_000)  # more than there are cores: Numba's pool stays at its size
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    finally:
        threads.set_threads(before)


def test_logits_do_not_depend_on_thread_count(tiny_ref):
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 30))
    expected = tiny_ref.logits(ids)
    before = threads.get_threads() or 2
    try:
        for n in (1, 2):
            threads.set_threads(n)
            np.testing.assert_allclose(model(ids), expected, atol=tolerance(expected, "float32"))
            # A decoding step: two rows, so the products run in the Numba loops.
            cache = model.new_cache(2)
            model(ids[:, :-1], cache=cache)
            step = model(ids[:, -1:], cache=cache)
            np.testing.assert_allclose(step, expected[:, -1:], atol=tolerance(expected, "float32"))
    finally:
        threads.set_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_count(bad):
    with pytest.raises(GPT2Error, match="threads must be a positive integer"):
        threads.set_threads(bad)
