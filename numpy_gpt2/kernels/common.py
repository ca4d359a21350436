"""What every kernel shares: the Numba options, the row counts that choose a path, and the
start of Numba's threads.

Every jitted function has `cache=True`: the compile cost is paid once per machine, not once per
process.
"""

import numba
import numpy as np

# error_model="numpy": a float division by zero gives inf as in NumPy instead of raising, which
# removes a branch from every division and lets loops vectorise.
JIT = dict(cache=True, nogil=True, error_model="numpy")
# Reassociation lets LLVM vectorise the sums; it changes only the rounding order. No flag that
# assumes finite values: the masking relies on -inf.
FAST = dict(JIT, fastmath={"reassoc", "contract"})
PARALLEL = dict(FAST, parallel=True)

# Up to FEW_ROWS rows (decoding: one row per sequence) a product streams the weight once through
# a Numba loop (`decode.few_rows_matmul`), and up to FEW_ROWS sequences a decoding step runs
# each block as one Numba call (`decode.decode_block`). Beyond it the products go to the BLAS,
# up to THIN_ROWS with the weight on the left (see `products`); past THIN_ROWS a prompt's
# layernorms also share the rows between threads.
FEW_ROWS = 8
THIN_ROWS = 64

_threads_started = False


def start_numba_threads() -> None:
    """Start Numba's threading layer, once, before the first call of a cached function that is
    not parallel itself but calls parallel ones (`decode._decode_block`).

    Loaded from the cache, such a function does not start the layer, and its parallel loops then
    crash the process (numba issue #8578: a segfault on the first decoding step of a process
    whose cache earlier processes filled). Started here, on the package's first use of it,
    rather than on import: importing numpy_gpt2 starts no threads.
    """
    global _threads_started
    if not _threads_started:
        numba.get_num_threads()
        _threads_started = True


def transposed_contiguous(weight):
    """weight: [K, N] as the maths has it -> weight_t: [N, K], C-contiguous, one row per output:
    a view when the model stores it so (see `memory.blocks_in_one_array`), else a copy.

    Every product takes its matrix this way: each output is then a dot product over one
    contiguous row, and each thread of a decoding step reads one contiguous stream of rows.
    """
    return weight.T if weight.T.flags.c_contiguous else np.ascontiguousarray(weight.T)
