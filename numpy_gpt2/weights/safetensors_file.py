"""Read a .safetensors file memory-mapped, with errors that name the file and the tensor.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows), and an
optional "__metadata__" entry. We parse it ourselves so that float32 tensors come back as
read-only views of one `np.memmap` (no copy, pages loaded on first use) and so that a truncated
or corrupt file is reported as such. `load_safetensors` turns a GPT-2 file into a validated
Checkpoint. `write` is the one writer of the format, streaming one tensor at a time, bfloat16
included (as its raw bits).
"""

import json
import os
import struct

import numpy as np

from ..config import GPT2Config
from ..errors import CheckpointError
from ..fileio import atomic_path
from .checkpoint import Checkpoint, infer_config, official_names, validate
from .dtypes import STORAGE, file_dtype_of

_MAX_HEADER = 100 * 1024 * 1024


# A numpy-gpt2 int8 checkpoint (`convert.write_int8_safetensors`): the metadata's format, and the
# file's name in a model directory. Not model.safetensors, so that transformers, which would
# load the float tensors and initialise the missing matrices at random, finds no weights there.
INT8_FORMAT = "numpy-gpt2-int8"
INT8_FILE = "model.int8.safetensors"


def load_safetensors(path: str, config: GPT2Config | None = None, n_head: int | None = None) -> Checkpoint:
    """Open a .safetensors GPT-2 file memory-mapped; the config is inferred when not given.

    A numpy-gpt2 int8 file (metadata format INT8_FORMAT) stores each matrix as NAME.q (int8
    [out, in]) and NAME.scales (float32, one per 32 inputs); they become `Checkpoint.quantized`.
    """
    file = SafetensorsFile(path)
    stored = dict(file.tensors)
    quantized = {}
    if file.metadata.get("format") == INT8_FORMAT:
        for name in [k for k in stored if k.endswith(".q")]:
            base = name.removesuffix(".q")
            if base + ".scales" not in stored:
                raise CheckpointError(f"{path}: tensor {name} has no {base}.scales beside it")
            quantized[base] = (stored.pop(name), stored.pop(base + ".scales"))
    tensors = stored if quantized else official_names(stored, path)
    file_dtypes = {name: file.dtypes.get(name, file.dtypes.get("transformer." + name)) for name in tensors}
    file_dtypes.update({name: "I8" for name in quantized})
    if config is None:
        as_files = {name: q if name == "wte.weight" else q.T for name, (q, _) in quantized.items()}  # [in, out]
        config = infer_config({**tensors, **as_files}, path, n_head)
    validate(config, tensors, file_dtypes, path, quantized)
    tensors.pop("lm_head.weight", None)
    return Checkpoint(config, tensors, file_dtypes, path, quantized)


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
        dtype, shape, begin, end = _header_entry(path, name, info)
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {data_start + end} but the file has "
                f"{size} bytes (truncated file)"
            )
        if end - begin != int(np.prod(shape, dtype=np.int64)) * STORAGE[dtype].itemsize:
            raise CheckpointError(
                f"{path}: tensor {name} has {end - begin} bytes, expected "
                f"{int(np.prod(shape))} x {STORAGE[dtype].itemsize} for shape {tuple(shape)} {dtype}"
            )
        chunk = raw[data_start + begin:data_start + end]
        dtypes[name] = dtype
        tensors[name] = chunk.view(STORAGE[dtype]).reshape(shape)
    return metadata, dtypes, tensors


def _header_entry(path, name, info):
    try:
        dtype = info["dtype"]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name}: {info!r}") from None
    if dtype not in STORAGE:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    if begin < 0 or end < begin or any(n < 0 for n in shape):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name}: {info!r}")
    return dtype, shape, begin, end


def write(path, specs: dict, produce, metadata: dict | None = None) -> None:
    """Write a .safetensors file atomically, one tensor at a time.

    specs: name -> (header dtype string such as "F32" or "BF16", shape), in file order
    produce: name -> the C-contiguous array of that tensor's stored values, called as each is
        written, so a converted model never sits in memory twice
    The header is padded with spaces to a multiple of 8 bytes, so the data is 8-byte aligned.
    """
    header, offset = {"__metadata__": metadata or {}}, 0
    for name, (file_dtype, shape) in specs.items():
        size = int(np.prod(shape, dtype=np.int64)) * STORAGE[file_dtype].itemsize
        header[name] = {"dtype": file_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, (file_dtype, shape) in specs.items():
            array = produce(name)
            if array.dtype != STORAGE[file_dtype] or array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced {array.dtype} {array.shape}, declared {file_dtype} {shape}")
            f.write(np.ascontiguousarray(array).data)
        f.flush()
        os.fsync(f.fileno())


def write_arrays(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write name -> array (float32, float16, float64 or integer) as a .safetensors file."""
    specs = {name: (file_dtype_of(a.dtype), a.shape) for name, a in tensors.items()}
    write(path, specs, tensors.__getitem__, metadata)
