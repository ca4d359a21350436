"""The one table of file dtypes: how each format names a dtype, how NumPy stores it, the conversions.

Every reader and writer speaks of a tensor's dtype by its safetensors name ("F32", "F16",
"BF16", "F64", "I32", ...), the name a `Checkpoint` records in `file_dtypes`. The other
formats' names map onto those here: TensorFlow's DataType enum (`core/framework/types.proto`),
and the names NumPy, torch (`str(torch.float16)` without "torch.") and llm.c's versions use.

NumPy has no bfloat16. bfloat16 is the top half of a float32, so its values are stored and read
as their raw uint16 bits: `to_float` widens them, `bfloat16_bits` rounds a float to them.
"""

import math

import numpy as np

from ..errors import CheckpointError

# File dtype -> the NumPy dtype of the values as stored (little-endian, as safetensors is).
STORAGE = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# The file dtypes a GPT-2 weight may have.
FLOATS = ("F32", "F16", "BF16", "F64")
# The names NumPy, torch, llm.c and our `dtype=` arguments give the float file dtypes.
FILE_DTYPE_BY_NAME = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# TensorFlow DataType enum -> file dtype, for the values a tensor bundle stores.
TF_DATATYPES = {
    1: "F32", 2: "F64", 3: "I32", 4: "U8", 5: "I16", 6: "I8", 9: "I64", 10: "BOOL",
    17: "U16", 19: "F16", 22: "U32", 23: "U64",
}
# DataType enum values a GPT-2 bundle could hold that this reader does not decode.
TF_UNSUPPORTED = {7: "DT_STRING", 8: "DT_COMPLEX64", 14: "DT_BFLOAT16", 18: "DT_COMPLEX128"}

# The most dimensions a stored tensor may have: NumPy 1.x's limit (2.x allows 64; GPT-2 needs 3).
MAX_DIMS = 32

# bfloat16's bits look like uint16: a NumPy dtype names the file dtype only when it is not that.
_BY_NUMPY = {dtype: name for name, dtype in STORAGE.items() if name != "BF16"}


def file_dtype_of(dtype) -> str | None:
    """The file dtype whose stored values have NumPy `dtype`, or None (a big-endian dtype, say)."""
    return _BY_NUMPY.get(np.dtype(dtype))


def shape_problem(shape, itemsize: int) -> str | None:
    """Why NumPy cannot hold an array of `shape` with items of `itemsize` bytes, or None.

    A file's byte count bounds the sizes of a shape only when it holds bytes: with a zero in
    it, the other sizes could be anything, and NumPy refuses those whose product passes the
    largest array it can address.
    """
    if len(shape) > MAX_DIMS:
        return f"{len(shape)} dimensions, more than the {MAX_DIMS} a tensor may have"
    if math.prod(n for n in shape if n) * itemsize >= 1 << 63:
        return "sizes whose product passes the largest array NumPy can hold"
    return None


def to_float(array: np.ndarray, file_dtype: str, dtype) -> np.ndarray:
    """The stored values `array` of `file_dtype` as float `dtype`; a view when no conversion is needed."""
    if file_dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits, then reinterpret.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array if array.dtype == dtype else array.astype(dtype)


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float -> the uint16 bits of bfloat16, rounded to nearest even (as torch rounds)."""
    x = np.ascontiguousarray(array, dtype=np.float32)
    bits = x.view(np.uint32)
    # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop 16 bits.
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    # A NaN would round into infinity or wrap around: keep its sign and make it a quiet NaN.
    return np.where(np.isnan(x), ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16), rounded)


def encode(array: np.ndarray, file_dtype: str, path, name: str) -> np.ndarray:
    """A float tensor as the C-contiguous values stored for the float `file_dtype`.

    A finite value beyond float16's range is a CheckpointError naming `path` and tensor `name`,
    rather than an infinity written into the file.
    """
    if file_dtype == "BF16":
        return bfloat16_bits(array)
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(array, dtype=STORAGE[file_dtype])
    if file_dtype == "F16" and not np.isfinite(out).all() and np.isfinite(array).all():
        big = float(np.abs(array).max())
        raise CheckpointError(f"{path}: tensor {name} has a value of magnitude {big:g}, beyond float16's 65504")
    return out
