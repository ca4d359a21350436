"""Read a .safetensors file memory-mapped, with errors that name the file and the tensor.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows), and an
optional "__metadata__" entry. We parse it ourselves so that float32 tensors come back as
read-only views of one `np.memmap` (no copy, pages loaded on first use) and so that a truncated
or corrupt file is reported as such. `write` is the one writer of the format, streaming one
tensor at a time, bfloat16 included (as its raw bits).
"""

import json
import os
import struct

import numpy as np

from ..errors import CheckpointError
from ..fileio import atomic_path

# bfloat16 has no NumPy dtype: it is read as uint16 and widened to float32 (see `to_float`).
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """The tensors of one .safetensors file as memory-mapped arrays.

    `tensors[name]` is a read-only array in the file's dtype (bfloat16 as raw uint16);
    `dtypes[name]` is the dtype string from the header ("F32", "BF16", ...).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.metadata, self.dtypes, self.tensors = _read(self.path)


def _read(path):
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file of {size} bytes is too short to be safetensors")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path}: header length {header_len} does not fit a file of {size} bytes "
                    "(truncated, or not a safetensors file)"
                )
            header_bytes = f.read(header_len)
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    data_len = size - data_start
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.empty(0, np.uint8)
    metadata = header.pop("__metadata__", None) or {}
    dtypes, tensors = {}, {}
    for name, info in header.items():
        dtype, shape, begin, end = _entry(path, name, info)
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {data_start + end} but the file has "
                f"{size} bytes (truncated file)"
            )
        if end - begin != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize:
            raise CheckpointError(
                f"{path}: tensor {name} has {end - begin} bytes, expected "
                f"{int(np.prod(shape))} x {_DTYPES[dtype].itemsize} for shape {tuple(shape)} {dtype}"
            )
        chunk = raw[data_start + begin:data_start + end]
        dtypes[name] = dtype
        tensors[name] = chunk.view(_DTYPES[dtype]).reshape(shape)
    return metadata, dtypes, tensors


def _entry(path, name, info):
    try:
        dtype = info["dtype"]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name}: {info!r}") from None
    if dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    if begin < 0 or end < begin or any(n < 0 for n in shape):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name}: {info!r}")
    return dtype, shape, begin, end


def to_float(array, file_dtype, dtype):
    """The tensor as `dtype` (float32 or float64); a view when no conversion is needed."""
    if file_dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits, then reinterpret.
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array if array.dtype == dtype else array.astype(dtype)


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float -> the uint16 bits of bfloat16, rounded to nearest even (as torch rounds).

    NumPy has no bfloat16; bfloat16 is the top half of a float32, so files store those bits.
    """
    x = np.ascontiguousarray(array, dtype=np.float32)
    bits = x.view(np.uint32)
    # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop 16 bits.
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    # A NaN would round into infinity or wrap around: keep its sign and make it a quiet NaN.
    return np.where(np.isnan(x), ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16), rounded)


def write(path, specs: dict, produce, metadata: dict | None = None) -> None:
    """Write a .safetensors file atomically, one tensor at a time.

    specs: name -> (header dtype string such as "F32" or "BF16", shape), in file order
    produce: name -> the C-contiguous array of that tensor's stored values, called as each is
        written, so a converted model never sits in memory twice
    The header is padded with spaces to a multiple of 8 bytes, so the data is 8-byte aligned.
    """
    header, offset = {"__metadata__": metadata or {}}, 0
    for name, (file_dtype, shape) in specs.items():
        size = int(np.prod(shape, dtype=np.int64)) * _DTYPES[file_dtype].itemsize
        header[name] = {"dtype": file_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, (file_dtype, shape) in specs.items():
            array = produce(name)
            if array.dtype != _DTYPES[file_dtype] or array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced {array.dtype} {array.shape}, declared {file_dtype} {shape}")
            f.write(np.ascontiguousarray(array).data)
        f.flush()
        os.fsync(f.fileno())


def write_arrays(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write name -> array (float32, float16, float64 or integer) as a .safetensors file."""
    names = {dtype: name for name, dtype in _DTYPES.items() if name != "BF16"}
    specs = {name: (names[np.dtype(a.dtype).newbyteorder("<")], a.shape) for name, a in tensors.items()}
    write(path, specs, tensors.__getitem__, metadata)
