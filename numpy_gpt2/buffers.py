"""Memory for large results, kept for the next call once the caller lets go of the last one.

A forward pass returning all logits hands back a fresh [B, T, V] array: 103 MB for 512 tokens
of GPT-2 124M. Memory new to the process is page-faulted and zeroed by the kernel on first
write, and when the host's memory is fragmented the kernel first compacts it into huge pages
(NumPy asks for them above 4 MB). Measured here, a 512-token forward spent 100-210 ms of
system time on its logits when it alternated with PyTorch's forwards, and ran 40-70 ms faster
when the logits' memory was reused. glibc cannot keep memory this size between calls (it maps
anything above 32 MB afresh each time), so `OutputMemory` does.

The model keeps a prompt's intermediates the same way (every array of 1 MB or more that a
forward with many positions makes): made afresh each time, glibc handed much of their memory
back to the OS between layers, and a 512-token forward took 2,000 to 25,000 page faults and up
to 85 ms of system time, depending on the state of the process's heap; from kept memory, none.

Each array it hands out is a view of a block it owns. The view's memory is exported through a
small ctypes object that every array made from the result (slices, reshapes, views) keeps
alive, directly or through the result; when the last of them is gone a weak-reference callback
marks the block free, and the next request that fits gets the same memory, already mapped. A
block that anything still views is never handed out again.
"""

import ctypes
import functools
import math
import sys
import threading
import weakref

import numba
import numpy as np

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


class OutputMemory:
    """Hands out arrays for results, reusing the memory of results nobody holds any more.

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

    For the weights a model copies out of its file (500 MB for GPT-2 124M). The first write to
    a fresh page costs more than the copy into it: the kernel clears it (and NumPy asks for huge
    pages for large arrays), and on a virtual machine the host may have to back it first. Here
    that took 0.1-1.7 s of system time from one minute to the next, on one core, and made a cold
    start of the command line miss its 2 s now and then. With the array cut into one range per
    thread, each faulted in by madvise(MADV_POPULATE_WRITE), the cores share it: 0.04-0.05 s
    against 0.05-0.6 s for 494 MB. Where that advice does not exist (not Linux, a kernel older
    than 5.14) the pages are left to be faulted in by the first write, as np.empty's are.
    """
    array = np.empty(shape, dtype)
    madvise = _madvise()
    if madvise is None or array.nbytes < 2 * _HUGE_PAGE:
        return array
    # The whole pages inside the array, cut on huge-page boundaries into one range per thread.
    first, last = -(-array.ctypes.data // _PAGE) * _PAGE, (array.ctypes.data + array.nbytes) // _PAGE * _PAGE
    parts = numba.get_num_threads()
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
