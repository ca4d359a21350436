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
import math
import os
import struct

import numpy as np

from ..config import GPT2Config
from ..errors import CheckpointError, brief
from ..fileio import atomic_path
from .checkpoint import Checkpoint, infer_config, official_names, validate
from .dtypes import STORAGE, file_dtype_of, shape_problem

# A GPT-2 checkpoint lists about 14 tensors a layer (gpt2-xl's header is under 100 KB), so a
# header of more bytes or more tensors than these is refused before it is read entry by entry:
# the limits keep a hostile header's parse to a fraction of a second and a few tens of MB.
_MAX_HEADER = 4 * 1024 * 1024
_MAX_TENSORS = 20_000


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
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested or a number too long to read
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ is {brief(metadata)}, expected an object of strings")
    if len(header) > _MAX_TENSORS:
        raise CheckpointError(f"{path}: the header lists {len(header)} tensors, more than the {_MAX_TENSORS} "
                              "a GPT-2 checkpoint could hold")
    entries = {name: _header_entry(path, name, info) for name, info in header.items()}
    for name, (_, _, _, end) in entries.items():
        if end > data_len:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {data_start + end} but the file has "
                f"{size} bytes (truncated file)"
            )
    _check_coverage(path, entries, data_len)

    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.empty(0, np.uint8)
    dtypes, tensors = {}, {}
    for name, (dtype, shape, begin, end) in entries.items():
        chunk = raw[data_start + begin:data_start + end]
        dtypes[name] = dtype
        tensors[name] = chunk.view(STORAGE[dtype]).reshape(shape)
    return metadata, dtypes, tensors


def _refuse_duplicates(pairs):
    """A JSON object as a dict, refusing a name given twice (Python's json would keep the last)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        twice = next(name for name, _ in pairs if name in seen or seen.add(name))
        raise ValueError(f"{brief(twice)} is named twice")
    return obj


def _header_entry(path, name, info):
    """(dtype, shape, begin, end) of one tensor's header entry, each checked against the format."""
    def corrupt():
        return CheckpointError(f"{path}: corrupt header entry for tensor {name}: {brief(info)}")

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise corrupt()
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
        raise corrupt()
    if dtype not in STORAGE:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {brief(dtype)}")
    begin, end = offsets
    if begin < 0 or end < begin or any(n < 0 for n in shape):
        raise corrupt()
    itemsize = STORAGE[dtype].itemsize
    problem = shape_problem(shape, itemsize)
    if problem:
        raise CheckpointError(f"{path}: tensor {name} has shape {brief(tuple(shape))}: {problem}")
    if end - begin != math.prod(shape) * itemsize:
        raise CheckpointError(
            f"{path}: tensor {name} has {end - begin} bytes, expected "
            f"{math.prod(shape)} x {itemsize} for shape {tuple(shape)} {dtype}"
        )
    return dtype, shape, begin, end


def _ints(value) -> bool:
    """True for a JSON list of integers (true and false are not)."""
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)


def _check_coverage(path, entries, data_len):
    """The tensors' byte ranges tile the data exactly, as the format requires: no byte is read
    as two tensors (which would let a small file stand for a large model), none is left over."""
    covered, previous = 0, None
    for begin, end, name in sorted((begin, end, name) for name, (_, _, begin, end) in entries.items()):
        if begin < covered:
            raise CheckpointError(
                f"{path}: tensor {name} has data bytes [{begin}, {end}), which overlap those of tensor {previous}"
            )
        if begin > covered:
            raise CheckpointError(f"{path}: data bytes [{covered}, {begin}) belong to no tensor (corrupt header)")
        covered, previous = end, name
    if covered != data_len:
        raise CheckpointError(
            f"{path}: {data_len - covered} bytes after the last tensor (the header accounts for "
            f"{covered} of the {data_len} data bytes)"
        )


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
