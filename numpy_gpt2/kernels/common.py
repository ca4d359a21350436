"""What every kernel shares: the Numba options, the row counts that choose a path, and the
start of Numba's threads (`threads.start_numba_threads`, imported here for the kernels).

Every jitted function has `cache=True`: the compile cost is paid once per machine, not once per
process.
"""

import numpy as np

from ..threads import start_numba_threads  # noqa: F401  -- the kernels' import of it

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

def transposed_contiguous(weight):
    """weight: [K, N] as the maths has it -> weight_t: [N, K], C-contiguous, one row per output:
    a view when the model stores it so (see `memory.blocks_in_one_array`), else a copy.

    Every product takes its matrix this way: each output is then a dot product over one
    contiguous row, and each thread of a decoding step reads one contiguous stream of rows.
    """
    return weight.T if weight.T.flags.c_contiguous else np.ascontiguousarray(weight.T)
