"""One weight of a decoding product, read from how its matrix is stored.

A decoding step's product (`decode.few_rows_matmul`) is the same loop for every way a matrix
is kept; only the reading of weight k of row n differs, and Numba picks it by the types when
compiling (`weight_row`, `weight`):

- float32 or float64 rows [N, K]: the value itself.
- bfloat16 bits, uint16 [N, K]: the upper half of a float32, so the bits shifted 16 up are the
  float32 (`as_float32`), exactly.
- float16 bits, int16 [N, K]: the half's sign and its other 15 bits put in a float32's places,
  which stands for the value times 2**-112 (`PLACED_HALF`); the caller multiplies x by 2**112
  once instead (`narrow.float16_rows_matmul`).
- int8, the pair (q int8 [N, K], scales float32 [N, ceil(K / GROUP)]): float32(q) times the
  scale of its group, one rounding: the dequantized weight, the very value `narrow`'s widening
  gives.

Read in the loop, the weight stays in a register: nothing is written to memory and read back,
and LLVM vectorises the reading with the multiply-adds (a zero-extending load and a shift for
bfloat16, a sign-extending load, a shift and a mask for float16, a sign-extending load, a
conversion and a multiplication by the broadcast scale for int8). A row of 16-bit weights is
then read at twice the rate of widening it into a buffer first, which kept a step's matrices
from streaming at the memory's speed.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .common import FAST

GROUP = 32  # int8: consecutive inputs of a row sharing one scale, as llama.cpp's q8_0

# A half's exponent is biased by 15, a float32's by 127: its bits moved into a float32's place
# stand for the value times 2**(15 - 127), undone by one exact multiplication. Half subnormals,
# float32 subnormals when moved, come out of it as the float32 normals they are.
HALF_BIAS_SCALE = np.float32(2.0 ** (127 - 15))
PLACED_HALF = np.uint32(0x8FFFE000)  # a sign-extended half shifted 13 up: its sign and its 15 bits


@intrinsic
def as_float32(typingctx, bits):
    """The float32 whose bits are the low 32 of the unsigned integer `bits`: a reinterpretation,
    no conversion. (Numba widens uint32 arithmetic to 64 bits; LLVM narrows it back.)"""
    if not isinstance(bits, types.Integer) or bits.signed or bits.bitwidth < 32:
        return None

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@numba.njit(inline="always", **FAST)
def bfloat16_value(bits):
    """The float32 a bfloat16's bits (uint16) stand for, exactly."""
    return as_float32(np.uint32(bits) << np.uint32(16))


@numba.njit(inline="always", **FAST)
def placed_half(bits):
    """A float16's bits (int16) in a float32's places: the half's value times 2**-112, exactly
    (see HALF_BIAS_SCALE); the sign extended to 32 bits is dropped by the mask."""
    return as_float32((np.uint32(np.int32(bits)) << np.uint32(13)) & PLACED_HALF)


def weight_row(rows, n):
    """Row n of a stored matrix: rows[n], or (q[n], scales[n]) for int8's pair. Jitted only."""
    raise NotImplementedError("weight_row is for jitted code")


@overload(weight_row, jit_options=FAST, inline="always")
def _weight_row_typed(rows, n):
    if isinstance(rows, types.BaseTuple):
        return lambda rows, n: (rows[0][n], rows[1][n])
    return lambda rows, n: rows[n]


def weight(row, k):
    """Weight k of a row from `weight_row`, as float (see the module's list). Jitted only."""
    raise NotImplementedError("weight is for jitted code")


@overload(weight, jit_options=FAST, inline="always")
def _weight_typed(row, k):
    if isinstance(row, types.BaseTuple):
        # k // GROUP with the constant GROUP: a shift, and LLVM sees the scale is one value
        # across each vector of a group, so it broadcasts it rather than gathering.
        return lambda row, k: np.float32(row[0][k]) * row[1][k // GROUP]
    if row.dtype == types.uint16:
        return lambda row, k: bfloat16_value(row[k])
    if row.dtype == types.int16:
        return lambda row, k: placed_half(row[k])
    return lambda row, k: row[k]
