"""The BLAS's ?gemm called by address from Numba's threads.

A prompt's products and attention are cut into one part per thread, and each part is one ?gemm
call made from inside a Numba parallel loop (the BLAS single-threaded meanwhile, see
`threads.blas_single_threaded_parts`): with no Python between the parts, they start together.

Which NumPy builds get this path: those whose BLAS exports `cblas_sgemm64_` / `cblas_dgemm64_`
(or the same with a `scipy_` prefix), whose integers are known to be 64-bit: scipy-openblas64,
the OpenBLAS that NumPy's own wheels ship. Wherever the symbol is not found (another BLAS, MKL,
a 32-bit-integer OpenBLAS, an unknown platform) `GEMM_ADDRESS` holds None for that dtype and the
callers take their np.matmul fallback in `threads.run_in_parts` instead: the same results, the
parts started from Python's threads.
"""

import ctypes

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from ..threads import blas_function


def _gemm_address(dtype):
    """The address of the BLAS's cblas_?gemm64_ for `dtype`, for `gemm` to call from Numba's
    threads; None where NumPy's BLAS does not export it under a name whose integer width is
    known (see the module's docstring)."""
    name = {np.float32: "cblas_sgemm64_", np.float64: "cblas_dgemm64_"}[dtype]
    gemm = blas_function("scipy_" + name, name)
    return None if gemm is None else ctypes.cast(gemm, ctypes.c_void_p).value


# dtype (np.float32, np.float64) -> the address of its ?gemm, or None: the callers' fallback.
GEMM_ADDRESS = {dtype: _gemm_address(dtype) for dtype in (np.float32, np.float64)}


@intrinsic
def gemm(typingctx, address, trans_b, M, N, K, a, lda, b, ldb, beta, c, ldc):
    """c = a @ op(b) + beta * c, row-major, through the ?gemm at `address` (cblas_?gemm64_):
    a [M, K] at address a, row stride lda; op(b) [K, N]: b as [N, K] rows (trans_b true) or as
    [K, N] (false), row stride ldb; c [M, N] at address c, row stride ldc; strides in elements,
    the precision that of beta (float32: sgemm, float64: dgemm).

    A direct call with no Python around it, so Numba's threads can share a product: the
    address is an argument, so the functions that call it can be cached.
    """
    sig = types.void(address, trans_b, M, N, K, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, args):
        address, trans_b, M, N, K, a, lda, b, ldb, beta, c, ldc = args
        real, i32, i64 = context.get_value_type(signature.args[9]), ir.IntType(32), ir.IntType(64)
        pointer = ir.IntType(8).as_pointer()
        gemm_type = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, real, pointer, i64,
                                                    pointer, i64, real, pointer, i64])
        gemm = builder.inttoptr(address, gemm_type.as_pointer())
        row_major, no_trans, trans = (ir.Constant(i32, n) for n in (101, 111, 112))
        as_int = lambda value: builder.sext(value, i64) if value.type.width < 64 else value
        builder.call(gemm, [row_major, no_trans, builder.select(trans_b, trans, no_trans), as_int(M), as_int(N),
                            as_int(K), ir.Constant(real, 1.0), builder.inttoptr(a, pointer), as_int(lda),
                            builder.inttoptr(b, pointer), as_int(ldb), beta, builder.inttoptr(c, pointer), as_int(ldc)])
        return context.get_dummy_value()

    return sig, codegen


def blas_rows(a):
    """Whether a: [..., rows, n] can be a BLAS operand as it is: unit steps along a row, and a
    step between rows that is a whole number of elements and at least a row long."""
    row_step, step = a.strides[-2:]
    return step == a.itemsize and row_step % a.itemsize == 0 and row_step >= a.shape[-1] * a.itemsize
