"""float32 maths that vectorises: a bit cast, tanh and exp without calls, and a maximum over
integers.

math.tanh and math.exp are calls that keep a Numba loop scalar, and LLVM vectorises an integer
maximum but not a float one; each function here does the same work with none of that.
"""

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from .common import FAST, JIT


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer `bits` (Numba makes the
    sum of two int32 an int64): a bit cast, no conversion, and unlike a view of an array it
    keeps a loop vectorisable."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 32:
        return None

    def codegen(context, builder, signature, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@numba.njit(inline="always", **JIT)
def tanh_float32(u):
    """tanh for float32 as a rational function, accurate to a few float32 ulps.

    A minimax [13/6] approximation on [-7.9, 7.9] (Eigen's `generic_fast_tanh_float`), beyond
    which tanh is +-1 in float32. Unlike `math.tanh` it has no branch, so loops vectorise.
    """
    u = min(max(u, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    u2 = u * u
    p = np.float32(-2.76076847742355e-16)
    p = p * u2 + np.float32(2.00018790482477e-13)
    p = p * u2 + np.float32(-8.60467152213735e-11)
    p = p * u2 + np.float32(5.12229709037114e-08)
    p = p * u2 + np.float32(1.48572235717979e-05)
    p = p * u2 + np.float32(6.37261928875436e-04)
    p = p * u2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * u2 + np.float32(1.18534705686654e-04)
    q = q * u2 + np.float32(2.26843463243900e-03)
    q = q * u2 + np.float32(4.89352518554385e-03)
    return u * p / q


@numba.njit(**JIT)
def exp_float32_(row, n, scale, shift):
    """row[:n] <- exp(row[:n] * scale - shift) in float32, for arguments up to about 0 (a
    softmax's, centred on the row's maximum); 0 below -87, past float32's smallest normal; NaN
    for NaN.

    Cephes' expf (relative error under 2e-7): exp(t) = 2^k exp(r), k = round(t / ln 2), r = t -
    k ln 2 in two parts, exp(r) a polynomial, times 2^k made from its exponent bits (exact: the
    results are normal floats). Unlike math.exp it has no call in the loop, so the loop
    vectorises. No fastmath: reassociation would merge the two parts of k ln 2.
    """
    log2e = np.float32(1.44269504088896341)
    ln2_hi, ln2_lo = np.float32(0.693359375), np.float32(-2.12194440e-4)
    floor = np.float32(-87.0)
    for s in range(n):
        t = row[s] * scale - shift
        kept = t >= floor
        u = t if kept else floor  # below the floor, and NaN, need no polynomial
        k = np.floor(u * log2e + np.float32(0.5))
        r = u - k * ln2_hi
        r = r - k * ln2_lo
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        p = p * r * r + r + np.float32(1)
        two_to_k = float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
        row[s] = p * two_to_k if kept else (t if t != t else np.float32(0))  # a NaN stays NaN


@numba.njit(**JIT)
def max_float32(row, last, key_mask, padded):
    """The largest of row[:last] (float32) where key_mask is set (everywhere unless padded),
    -inf if none.

    Taken over integers that order as the floats do (the bits of a negative float with all but
    the sign flipped): LLVM vectorises an integer maximum, not a float one. A NaN comes out as
    NaN or is passed over, and either way the NaN itself makes the row's softmax NaN.
    """
    bits = row[:last].view(np.int32)
    flip, smallest = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
    largest = smallest
    for s in range(last):
        b = bits[s]
        key = b ^ ((b >> np.int32(31)) & flip)
        largest = max(largest, key if not padded or key_mask[s] else smallest)
    if largest == smallest:
        return np.float32(-np.inf)
    return float32_from_bits(largest ^ ((largest >> np.int32(31)) & flip))


def exp_shifted_(row, shift):
    """row <- exp(row - shift) in place, for arguments up to 0: float32's `exp_float32_`, which
    vectorises, or math.exp for float64 (see the overload)."""
    row[:] = np.exp(row - shift)


@overload(exp_shifted_, jit_options=FAST)
def _exp_shifted_for(row, shift):
    if row.dtype == types.float32:
        return lambda row, shift: exp_float32_(row, len(row), np.float32(1), shift)

    def exp_shifted(row, shift):
        for j in range(len(row)):
            row[j] = math.exp(row[j] - shift)
    return exp_shifted


def row_max(row):
    """The largest of row: [N] (-inf if empty): `max_float32` for float32, which vectorises, or a
    plain loop for float64 (see the overload)."""
    return row.max() if len(row) else -np.inf


@overload(row_max, jit_options=FAST)
def _row_max_for(row):
    if row.dtype == types.float32:
        no_mask = np.zeros(0, np.bool_)
        return lambda row: max_float32(row, len(row), no_mask, False)

    def largest(row):
        top = -np.inf
        for j in range(len(row)):
            top = max(top, row[j])
        return top
    return largest
