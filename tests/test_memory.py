"""The pools of `memory` (the logits', the keys and values', a prompt's intermediates): memory is
reused only once nothing views it: a result the caller holds, or any slice or view of it, never
changes. NumPy's own `np.shares_memory` is the judge of overlap, and transformers' logits of what
was asked are the judge of content."""

import concurrent.futures
import ctypes
import gc
import subprocess
import sys

import numpy as np
import pytest

from conftest import tolerance
from numpy_gpt2 import GPT2
from numpy_gpt2 import memory as memory_module
from numpy_gpt2.memory import ReusableMemory

MiB = 1 << 20


def _address(a):
    return a.__array_interface__["data"][0]


def _resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.parametrize("shape", [(3, 5), (4 * MiB // 4 + 7,), (12, 2 * MiB // 4 + 3)], ids=["small", "4 MiB", "2-D"])
def test_faulted_in_empty_is_an_empty_array(shape):
    a = memory_module.faulted_in_empty(shape, np.float32)
    assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    a[...] = 1.5
    assert a.sum() == 1.5 * a.size


_RESIDENT_BEFORE_THE_FIRST_WRITE = """
import numpy as np
from numpy_gpt2 import memory
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
if memory._madvise() is None:
    print("no-madvise")
else:
    before = resident()
    a = memory.faulted_in_empty((64 << 20 >> 2,), np.float32)
    after_a = resident()
    b = np.empty(64 << 20 >> 2, np.float32)
    print(after_a - before, resident() - before, a.nbytes)
"""


def test_faulted_in_empty_pages_are_resident_before_the_first_write():
    """The pages of a large array are in memory when it is handed out (the load's weights then
    take no page faults while they are copied). In a fresh process: in this one, memory an
    earlier test freed may come back already resident, and the array would prove nothing."""
    out = subprocess.run([sys.executable, "-c", _RESIDENT_BEFORE_THE_FIRST_WRITE], capture_output=True, text=True,
                         check=True).stdout.split()
    if out == ["no-madvise"]:
        pytest.skip("madvise(MADV_POPULATE_WRITE) does not exist here (not Linux, or a kernel before 5.14)")
    grown_by_a, grown_by_both, nbytes = map(int, out)
    assert grown_by_a >= 0.95 * nbytes
    assert grown_by_both < 1.5 * nbytes  # np.empty's pages, for contrast, wait for a write


def test_arrays_are_plain_writable_c_arrays():
    memory = ReusableMemory(max_bytes=64 * MiB, min_bytes=0)
    a = memory.empty((3, 5, 7), np.float32)
    assert a.shape == (3, 5, 7) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
    a[...] = 1.5
    assert a.sum() == 1.5 * 105


@pytest.mark.parametrize("keep", [
    lambda a: a,
    lambda a: a[1, 2:],
    lambda a: a.reshape(-1),
    lambda a: a.T,
    lambda a: a.view(np.int32),
    lambda a: memoryview(a),
    lambda a: np.lib.stride_tricks.as_strided(a, shape=(2,), strides=(4,)),
    lambda a: [a[0]],
])
def test_memory_a_view_holds_is_not_handed_out(keep):
    memory = ReusableMemory(max_bytes=64 * MiB, min_bytes=0)
    first = memory.empty((4, 1000), np.float32)
    first[...] = 7
    kept = keep(first)
    del first
    second = memory.empty((4, 1000), np.float32)
    second[...] = -1
    held = np.asarray(kept[0] if isinstance(kept, list) else kept)
    assert not np.shares_memory(held, second)
    assert np.all(held.view(np.float32) == 7) if held.dtype != np.float32 else np.all(held == 7)


def test_memory_is_reused_once_every_view_is_gone():
    memory = ReusableMemory(max_bytes=64 * MiB, min_bytes=0)
    first = memory.empty((4, 1000), np.float32)
    address, view = _address(first), first[2:]
    del first
    assert _address(memory.empty((4, 1000), np.float32)) != address  # the view still holds it
    del view
    assert _address(memory.empty((4, 1000), np.float32)) == address
    assert _address(memory.empty((3, 1000), np.float32)) == address   # smaller, at least half
    assert _address(memory.empty((1, 1000), np.float32)) != address   # under half: a new block


def test_a_result_in_a_reference_cycle_is_freed_by_the_collector():
    memory = ReusableMemory(max_bytes=64 * MiB, min_bytes=0)
    first = memory.empty((1000,), np.float32)
    address = _address(first)
    cycle = [first]
    cycle.append(cycle)
    del first, cycle
    gc.collect()
    assert _address(memory.empty((1000,), np.float32)) == address


def test_what_is_kept_is_bounded():
    memory = ReusableMemory(max_bytes=8 * MiB, max_blocks=2, min_bytes=MiB)
    small = memory.empty((MiB // 8,), np.float32)            # 0.5 MiB: under min_bytes
    large = memory.empty((3 * MiB,), np.float32)             # 12 MiB: over max_bytes
    assert small.flags.owndata and large.flags.owndata and memory.kept_bytes == 0
    held = [memory.empty((MiB,), np.float32) for _ in range(3)]  # 4 MiB each, two blocks at most
    assert memory.kept_bytes == 8 * MiB and held[2].flags.owndata
    assert not any(np.shares_memory(a, b) for i, a in enumerate(held) for b in held[i + 1:])
    del held
    memory.empty((2 * MiB,), np.float32)                     # 8 MiB: replaces a free block
    assert memory.kept_bytes == 12 * MiB


def test_threads_never_share_a_block():
    memory = ReusableMemory(max_bytes=64 * MiB, max_blocks=4, min_bytes=0)

    def fill(value):
        arrays = []
        for _ in range(200):
            a = memory.empty((256,), np.int64)
            a[...] = value
            arrays.append(a)
            if len(arrays) > 2:
                arrays.pop(0)
            assert np.all(arrays[0] == value) and np.all(arrays[-1] == value)
        return True

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(fill, range(8)))


@pytest.fixture
def pooled_model(tiny_ref, monkeypatch):
    """The tiny model, its logits pooled however small (the model's own rule keeps blocks of
    4 MB and more, which only the larger shapes reach)."""
    monkeypatch.setattr(memory_module, "MIN_BYTES", 0)
    return GPT2.from_pretrained(tiny_ref.hub_dir)


def test_held_logits_stay_those_of_their_input(tiny_ref, pooled_model):
    vocab = tiny_ref.config["vocab_size"]
    a, b, c = (np.random.default_rng(seed).integers(0, vocab, (2, 16)) for seed in range(3))
    last_of_a = pooled_model(a)[:, -1]                       # the result dropped, a view kept
    logits_b = pooled_model(b)
    assert not np.shares_memory(last_of_a, logits_b)
    for got, ids in ((last_of_a, a), (logits_b, b)):
        expected = tiny_ref.logits(ids)
        np.testing.assert_allclose(got, expected[:, -1] if got.ndim == 2 else expected,
                                   rtol=0, atol=tolerance(expected, "float32", tiny_ref.config))
    address = _address(logits_b)
    del logits_b, got
    logits_c = pooled_model(c)                               # b's memory again, all rewritten
    assert _address(logits_c) == address
    expected = tiny_ref.logits(c)
    np.testing.assert_allclose(logits_c, expected, rtol=0, atol=tolerance(expected, "float32", tiny_ref.config))


def test_two_threads_prompting_at_once_get_their_own_logits(tiny_ref, pooled_model):
    sequences = np.random.default_rng(5).integers(0, tiny_ref.config["vocab_size"], (6, 1, 24))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(pooled_model, sequences))
    for ids, logits in zip(sequences, results):
        expected = tiny_ref.logits(ids)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance(expected, "float32", tiny_ref.config))


# ---- the keys and values of a forward pass without a cache ---------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(2, 9), (2, 1), (9, 1)], ids=["prompt", "one position", "one position, 9 rows"])
def test_a_forward_without_a_cache_never_reads_what_it_did_not_write(tiny_ref, dtype, shape, monkeypatch):
    """Its keys and values come uninitialised from kept memory: filled with NaN here, the logits
    are still transformers' (padding included)."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype)
    monkeypatch.setattr(model.workspace.keys_values, "empty", lambda shape, dtype: np.full(shape, np.nan, dtype))
    ids = np.random.default_rng(5).integers(0, tiny_ref.config["vocab_size"], shape)
    mask = np.ones(shape, dtype=np.int64)
    mask[1, :shape[1] // 2] = 0                              # row 1 left-padded (when T > 1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = tiny_ref.logits(ids, dtype=dtype, attention_mask=mask, position_ids=positions)
    logits = model(ids, attention_mask=mask)
    seen = mask.astype(bool)                                 # padded positions' logits are not defined
    np.testing.assert_allclose(logits[seen], expected[seen], rtol=0, atol=tolerance(expected, dtype, tiny_ref.config))


def test_the_keys_and_values_of_forwards_without_a_cache_are_kept_once(tiny_ref, pooled_model):
    ids = np.random.default_rng(6).integers(0, tiny_ref.config["vocab_size"], (2, 16))
    pooled_model(ids)
    kept = pooled_model.workspace.keys_values.kept_bytes
    c = tiny_ref.config
    assert kept == 2 * c["n_layer"] * 2 * c["n_head"] * 16 * (c["n_embd"] // c["n_head"]) * 4   # k and v
    for _ in range(3):
        logits = pooled_model(ids)
    assert pooled_model.workspace.keys_values.kept_bytes == kept
    expected = tiny_ref.logits(ids)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance(expected, "float32", tiny_ref.config))


# ---- a prompt's intermediates ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_prompt_never_reads_what_it_did_not_write(tiny_ref, dtype, monkeypatch):
    """Every intermediate a prompt takes from the model's work memory comes uninitialised:
    filled with NaN here, the logits are still transformers' (a padded batch; a prompt after
    cached positions; the last block at the kept positions only)."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype)
    handed_out = []

    def nan_filled(shape, dtype):
        handed_out.append(shape)
        return np.full(shape, np.nan, dtype)

    monkeypatch.setattr(model.workspace.intermediates, "empty", nan_filled)
    ids = np.random.default_rng(7).integers(0, tiny_ref.config["vocab_size"], (2, 20))
    mask = np.ones(ids.shape, dtype=np.int64)
    mask[1, :6] = 0                                          # row 1 left-padded
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = tiny_ref.logits(ids, dtype=dtype, attention_mask=mask, position_ids=positions)
    seen = mask.astype(bool)                                 # padded positions' logits are not defined
    np.testing.assert_allclose(model(ids, attention_mask=mask)[seen], expected[seen], rtol=0,
                               atol=tolerance(expected, dtype, tiny_ref.config))
    assert len(handed_out) > 7 * tiny_ref.config["n_layer"]  # embeddings, every block's ops, ln_f

    cache = model.new_cache(2)
    model(ids[:, :12], attention_mask=mask[:, :12], cache=cache)
    last = model(ids[:, 12:], attention_mask=mask, cache=cache, logits_to_keep=3)
    np.testing.assert_allclose(last, expected[:, -3:], rtol=0, atol=tolerance(expected, dtype, tiny_ref.config))


def test_a_prompts_intermediates_are_kept_once(tiny_ref, monkeypatch):
    """After a first prompt, every intermediate of the next ones of the same shape comes from
    memory kept by then, and nothing more is kept."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    monkeypatch.setattr(model.workspace.intermediates, "min_bytes", 0)  # the tiny model's are all small
    kept_results = []
    take = model.workspace.intermediates.empty

    def recorded(shape, dtype):
        array = take(shape, dtype)
        kept_results.append(isinstance(array.base, ctypes.Array))
        return array

    monkeypatch.setattr(model.workspace.intermediates, "empty", recorded)
    ids = np.random.default_rng(8).integers(0, tiny_ref.config["vocab_size"], (2, 16))
    model(ids)
    kept = model.workspace.intermediates.kept_bytes
    assert kept > 0
    kept_results.clear()
    for _ in range(3):
        logits = model(ids)
    assert kept_results and all(kept_results)
    assert model.workspace.intermediates.kept_bytes == kept
    expected = tiny_ref.logits(ids)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance(expected, "float32", tiny_ref.config))
