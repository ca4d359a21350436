"""Memory plumbing kept out of the maths: the pools a forward pass reuses (`Workspace`), page
faulting of fresh arrays, and the layout of the weights.

Pools. Memory new to the process is page-faulted and zeroed by the kernel on first write, and
when the host's memory is fragmented the kernel first compacts it into huge pages (NumPy asks
for them above 4 MB); glibc cannot keep memory this size between calls (it maps anything above
32 MB afresh each time, and hands much of a freed heap back to the OS between layers). So a
`ReusableMemory` keeps it: each array it hands out is a view of a block it owns. The view's
memory is exported through a small ctypes object that every array made from the result
(slices, reshapes, views) keeps alive, directly or through the result; when the last of them is
gone a weak-reference callback marks the block free, and the next request that fits gets the
same memory, already mapped. A block that anything still views is never handed out again.

Weights. A decoding step reads every weight once per token, so its speed is that of streaming
the weights through memory: the blocks' tensors are copied into one array in the order a step
reads them, each matrix as [out, in] rows (`blocks_in_one_array`), and the tied head into the
process's own memory (`in_own_memory`).
"""

import ctypes
import functools
import math
import sys
import threading
import weakref

import numpy as np

from .config import GPT2Config
from .threads import numba_threads
from .weights import expected_shapes, mapped_file, release_pages

# Below this a result is an ordinary array: glibc reuses small blocks by itself.
MIN_BYTES = 4 << 20


class _Block:
    """One block of memory and whether a result still views it."""

    def __init__(self, nbytes: int):
        self.memory = np.empty(nbytes, dtype=np.uint8)
        self.in_use = False

    @property
    def nbytes(self) -> int:
        return self.memory.nbytes


class ReusableMemory:
    """Hands out arrays for results and scratch, reusing the memory of arrays nobody holds any
    more.

    At most `max_blocks` blocks, each at most `max_bytes`, are kept; a request that is smaller
    than `min_bytes` (default MIN_BYTES), larger than max_bytes, or finds every kept block in
    use gets an ordinary array. A free block is reused for a request of at least half its
    size. Thread-safe.
    """

    def __init__(self, max_bytes: int, max_blocks: int = 2, min_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.max_blocks = max_blocks
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self._blocks: list[_Block] = []
        self._lock = threading.Lock()

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of `shape` and `dtype`, as np.empty."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if not self.min_bytes <= nbytes <= self.max_bytes:
            return np.empty(shape, dtype=dtype)
        with self._lock:
            block = self._take(nbytes)
            if block is None:
                return np.empty(shape, dtype=dtype)
            block.in_use = True
        exporter = _exporter_type(nbytes).from_buffer(block.memory)
        weakref.finalize(exporter, self._release, block)
        return np.ndarray(shape, dtype=dtype, buffer=exporter)

    def _take(self, nbytes: int) -> _Block | None:
        """A free block for nbytes (the smallest that fits, not twice as large), else a new
        block in place of a free one or in a free place, else None. Under the lock."""
        free = [block for block in self._blocks if not block.in_use]
        fitting = [block for block in free if nbytes <= block.nbytes <= 2 * nbytes]
        if fitting:
            return min(fitting, key=lambda block: block.nbytes)
        if len(self._blocks) >= self.max_blocks:
            if not free:
                return None
            self._blocks.remove(max(free, key=lambda block: block.nbytes))
        block = _Block(nbytes)
        self._blocks.append(block)
        return block

    def _release(self, block: _Block) -> None:
        with self._lock:
            block.in_use = False

    @property
    def kept_bytes(self) -> int:
        """The bytes of all blocks kept, in use or free."""
        with self._lock:
            return sum(block.nbytes for block in self._blocks)


@functools.lru_cache(maxsize=64)
def _exporter_type(nbytes: int):
    """A ctypes byte-array type of nbytes that NumPy can view and that weak references reach
    (a Python subclass); one per size."""
    return type("_Exporter", (ctypes.c_byte * nbytes,), {})


# madvise's advice that faults a range of pages in, writable, as a first write would (Linux 5.14).
_MADV_POPULATE_WRITE = 23
_PAGE, _HUGE_PAGE = 4096, 2 << 20


def faulted_in_empty(shape, dtype) -> np.ndarray:
    """np.empty(shape, dtype), its pages faulted in by as many threads as Numba's pool has.

    For the weights a model copies out of its file. The first write to a fresh page costs more
    than the copy into it: the kernel clears it (and NumPy asks for huge pages for large
    arrays), and on a virtual machine the host may have to back it first, all on the one core
    that writes. With the array cut into one range per thread, each faulted in by
    madvise(MADV_POPULATE_WRITE), the cores share that work. Where that advice does not exist
    (not Linux, a kernel older than 5.14) the pages are left to be faulted in by the first
    write, as np.empty's are.
    """
    array = np.empty(shape, dtype)
    madvise = _madvise()
    if madvise is None or array.nbytes < 2 * _HUGE_PAGE:
        return array
    # The whole pages inside the array, cut on huge-page boundaries into one range per thread.
    first, last = -(-array.ctypes.data // _PAGE) * _PAGE, (array.ctypes.data + array.nbytes) // _PAGE * _PAGE
    parts = numba_threads()
    cuts = [first + (last - first) * i // parts // _HUGE_PAGE * _HUGE_PAGE for i in range(1, parts)]
    bounds = sorted({first, last, *(cut for cut in cuts if first < cut < last)})
    ranges = [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    workers = [threading.Thread(target=madvise, args=(address, length, _MADV_POPULATE_WRITE))
               for address, length in ranges[1:]]
    for worker in workers:
        worker.start()
    madvise(*ranges[0], _MADV_POPULATE_WRITE)
    for worker in workers:
        worker.join()
    return array


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise(address, length, advice) through ctypes (which lets go of the GIL during
    the call), or None where there is no MADV_POPULATE_WRITE to ask for."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    probe = np.empty(2 * _HUGE_PAGE, np.uint8)  # refused with EINVAL by kernels before 5.14
    page = -(-probe.ctypes.data // _PAGE) * _PAGE
    return madvise if madvise(page, _PAGE, _MADV_POPULATE_WRITE) == 0 else None


class Workspace:
    """The memory a model's forward passes reuse, in three pools sized here from the bytes of the
    model's weight matrices (the blocks' four and the tied head).

    - `logits`: the [B, T, V] logits a forward returns, kept for the next call once they are
      dropped; at most two blocks, each at most the size of the weights (blocks under
      MIN_BYTES are left to glibc).
    - `keys_values`: the keys and values of forward passes without a cache, every position
      written before it is read; up to four blocks (two passes at once), each at most a
      quarter of the weights.
    - `intermediates`: a prompt's intermediates of 1 MB and more (`empty`, which the kernels
      call); up to twelve blocks, each at most 1/32 of the weights: every intermediate of a
      full-context prompt of GPT-2 124M fits.
    Thread-safe, as `ReusableMemory` is.
    """

    def __init__(self, weight_bytes: int):
        self.logits = ReusableMemory(max_bytes=weight_bytes)
        self.keys_values = ReusableMemory(max_bytes=weight_bytes // 4, max_blocks=4)
        self.intermediates = ReusableMemory(max_bytes=weight_bytes // 32, max_blocks=12, min_bytes=1 << 20)

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array for a prompt's intermediate, as np.empty."""
        return self.intermediates.empty(shape, dtype)


# ---- the weights' layout ---------------------------------------------------------------------

def in_own_memory(array: np.ndarray) -> np.ndarray:
    """A view of a mapped file -> a copy in the process's own memory, the file pages handed
    back (`weights.release_pages`); an array already in ordinary memory (say, converted on
    load) as it is.

    For the tied head: decoding streams wte every token (a third of the bytes read), and fresh
    memory, for which NumPy asks the OS for huge pages, streams faster than the file's pages.
    """
    if mapped_file(array) is None:
        return array
    copy = faulted_in_empty(array.shape, array.dtype)
    copy[...] = array
    release_pages(array)
    return copy


# A block's tensors in the order a decoding step reads them (`kernels.decode_block`).
BLOCK_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias")


def blocks_in_one_array(config: GPT2Config, tensors, dtype) -> dict:
    """Every block's tensors copied into one array, in the order a decoding step reads them;
    -> official name -> its view there. A weight matrix [in, out] is stored as [out, in] rows
    and its view is the `.T` of those rows: the same matrix, laid out for the products.

    A decoding step reads every weight once per token, so its speed is that of streaming the
    weights through memory (see `kernels.decode`):
    - Stored [out, in], each output is a dot product over one contiguous row, and each thread
      reads one contiguous stream.
    - In one allocation, nearly all of it is backed by huge pages (NumPy asks the OS for them
      for large arrays, and a mapping gets them only on whole aligned 2 MB pieces); allocated
      one by one, a large share of the matrices' bytes sits on ordinary 4 KB pages (all of a
      matrix of a few MB, the ends of the others), which a step streams more slowly.
    The file pages each tensor was read from are handed back (`weights.release_pages`), so the
    resident size stays about that of the file.
    """
    shapes = expected_shapes(config)
    names = [f"h.{i}.{name}" for i in range(config.n_layer) for name in BLOCK_TENSORS]
    memory = faulted_in_empty(sum(math.prod(shapes[name]) for name in names), dtype)
    views, offset = {}, 0
    for name in names:
        shape, source = shapes[name], tensors[name]
        piece = memory[offset:offset + math.prod(shape)]
        offset += piece.size
        if len(shape) == 2:
            rows = piece.reshape(shape[::-1])                                       # [out, in]
            rows[...] = source.T
            views[name] = rows.T
        else:
            views[name] = piece.reshape(shape)
            views[name][...] = source
        release_pages(source)
    return views
