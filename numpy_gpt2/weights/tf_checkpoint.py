"""Read OpenAI's original TensorFlow GPT-2 checkpoint (a TF1 `Saver` tensor bundle) without TensorFlow.

A checkpoint directory, as the `openai/gpt-2` download script leaves it:

    checkpoint                       text proto: model_checkpoint_path: "model.ckpt"
    hparams.json                     n_vocab, n_ctx, n_embd, n_head, n_layer
    model.ckpt.index                 the tensor-bundle index: an SSTable of BundleEntryProto
    model.ckpt.data-00000-of-00001   the raw tensor bytes, back to back

The index is a LevelDB-format table (leveldb `doc/table_format.md`, TF `core/lib/io/table`):

    [data block 0] ... [data block n] [metaindex block] [index block] [footer, 48 bytes]
    every block is followed by a 5-byte trailer: compression type (u8), masked crc32c (u32)
    footer: BlockHandle metaindex, BlockHandle index (varint64 offset, varint64 size each),
            zero padding to 40 bytes, magic 0xdb4775248b80fb57 (u64, little-endian)
    block:  entries (varint32 shared, varint32 non_shared, varint32 value_len, key delta, value),
            restart offsets (u32 each), restart count (u32)

Its keys are tensor names; the value of each is a BundleEntryProto (TF
`core/protobuf/tensor_bundle.proto`) giving dtype, shape, shard, byte offset, byte size and the
masked crc32c of the bytes. The key "" holds the BundleHeaderProto (shard count, endianness).
The tensors are returned as read-only views over a memory map of the data shard, so a 498 MB
shard costs no copy and no resident memory until a tensor is touched.
"""

import dataclasses
import math
import mmap
import os
import re

import numpy as np

from ..config import GPT2Config
from ..errors import CheckpointError, ModelNotFoundError

DEFAULT_PREFIX = "model.ckpt"
HPARAMS = "hparams.json"

_FOOTER_SIZE = 48
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_SIZE = 5
_COMPRESSION_NAMES = {0: "none", 1: "snappy", 2: "zlib"}

# TF DataType enum values (core/framework/types.proto) that map onto a NumPy dtype.
_NUMPY_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64,
}
_UNSUPPORTED_DTYPE_NAMES = {7: "DT_STRING", 8: "DT_COMPLEX64", 14: "DT_BFLOAT16", 18: "DT_COMPLEX128"}

_MISSING_HINT = (
    "a TensorFlow GPT-2 checkpoint directory holds hparams.json, <prefix>.index and "
    "<prefix>.data-00000-of-00001 (prefix from the `checkpoint` file, default model.ckpt)"
)


class _Corrupt(Exception):
    """Raised by the byte-level decoders; the caller adds the file name as a CheckpointError."""


class _Unsupported(Exception):
    """A well-formed table using a feature this reader does not implement (compression)."""


# ---------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as LevelDB and the tensor bundle use it.

_CRC32C_POLY = 0x82F63B78  # reflected form of 0x1EDC6F41


def _make_crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1)
    return table.astype(np.uint32)


_CRC_TABLE = _make_crc_table()
_CRC_TABLE_LIST = [int(v) for v in _CRC_TABLE]
# Below this many bytes the byte-at-a-time Python loop beats NumPy's per-call overhead.
_CRC_VECTOR_MIN = 1 << 16
_CRC_MAX_LANES = 1 << 16


def _crc_register_bytes(register: int, data) -> int:
    """Feed `data` through the raw CRC register (no pre- or post-inversion)."""
    table = _CRC_TABLE_LIST
    for byte in bytes(data):
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _gf2_apply(columns: list[int], vector: int) -> int:
    """Apply the 32x32 GF(2) matrix with the given columns to a 32-bit vector."""
    out = 0
    bit = 0
    while vector:
        if vector & 1:
            out ^= columns[bit]
        vector >>= 1
        bit += 1
    return out


def _zeros_operator(n: int) -> list[int]:
    """The linear map register -> register after feeding `n` zero bytes, as 32 columns.

    CRC is linear over GF(2), so crc(A || B) = zeros_|B|(crc(A)) ^ crc(B) for raw registers;
    this is what lets independent lanes be computed in parallel and joined afterwards.
    """
    one = [_crc_register_bytes(1 << i, b"\0") for i in range(32)]
    result = [1 << i for i in range(32)]
    while n:
        if n & 1:
            result = [_gf2_apply(one, c) for c in result]
        one = [_gf2_apply(one, c) for c in one]
        n >>= 1
    return result


def _apply_operator_vectorized(columns: list[int], registers: np.ndarray) -> np.ndarray:
    """Apply a GF(2) operator to an array of uint32 registers, one byte-table per input byte."""
    values = np.arange(256, dtype=np.uint32)
    out = np.zeros_like(registers)
    for byte_index in range(4):
        table = np.zeros(256, dtype=np.uint32)
        for bit in range(8):
            table ^= np.where((values >> bit) & 1, np.uint32(columns[8 * byte_index + bit]), 0).astype(np.uint32)
        out ^= table[(registers >> np.uint32(8 * byte_index)) & np.uint32(0xFF)]
    return out


def _crc32c(data) -> int:
    """CRC-32C of a bytes-like object (bytes, memoryview, mmap slice, uint8 array).

    Large inputs are cut into up to 65536 equal lanes that advance one byte per NumPy step
    together, then joined pairwise with the zero-byte operator; the tail is done in Python.
    A few seconds for the 498 MB shard of GPT-2 124M, against minutes for a plain Python loop.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    n = buf.size
    if n < _CRC_VECTOR_MIN:
        return _crc_register_bytes(0xFFFFFFFF, buf.tobytes()) ^ 0xFFFFFFFF
    lanes = min(_CRC_MAX_LANES, 1 << ((n // 4096).bit_length() - 1))
    width = n // lanes
    grid = buf[: lanes * width].reshape(lanes, width)
    registers = np.zeros(lanes, dtype=np.uint32)
    registers[0] = 0xFFFFFFFF  # only the first lane carries the standard initial value
    table = _CRC_TABLE
    mask = np.uint32(0xFF)
    # Columns are copied in stripes so each step reads contiguous memory, not a stride of `width`.
    stripe = 64
    for start in range(0, width, stripe):
        block = np.ascontiguousarray(grid[:, start : start + stripe].T)
        for row in block:
            registers = table[(registers ^ row) & mask] ^ (registers >> np.uint32(8))
    operator = _zeros_operator(width)
    while registers.size > 1:
        registers = _apply_operator_vectorized(operator, registers[0::2]) ^ registers[1::2]
        operator = [_gf2_apply(operator, column) for column in operator]  # lanes doubled in length
    register = _crc_register_bytes(int(registers[0]), buf[lanes * width :].tobytes())
    return register ^ 0xFFFFFFFF


def _unmask_crc(masked: int) -> int:
    """LevelDB stores crc32c values rotated and offset, so a crc of data holding crcs stays strong."""
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Protobuf wire format: just enough to read BundleHeaderProto and BundleEntryProto.


def _read_varint(buf: bytes, pos: int, limit: int, bits: int = 64) -> tuple[int, int]:
    """Decode one little-endian base-128 varint of at most `bits` bits; returns (value, next position)."""
    value = 0
    start = pos
    for shift in range(0, bits, 7):
        if pos >= limit:
            raise _Corrupt(f"varint at byte {start} is truncated")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> bits:
                raise _Corrupt(f"varint at byte {start} does not fit in {bits} bits")
            return value, pos
    raise _Corrupt(f"varint at byte {start} is longer than a {bits}-bit varint can be")


def _signed64(value: int) -> int:
    """Protobuf int64 fields are two's complement in 64 bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _proto_fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """Split a protobuf message into (field number, wire type, value) triples, in file order."""
    fields = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Corrupt("protobuf field number 0")
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise _Corrupt(f"protobuf field {number} truncated")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise _Corrupt(f"protobuf field {number} claims {length} bytes, {end - pos} remain")
            value = bytes(buf[pos : pos + length])
            pos += length
        else:
            raise _Corrupt(f"protobuf field {number} has unsupported wire type {wire}")
        fields.append((number, wire, value))
    return fields


def _scalar(fields, number: int, wire: int, default=0):
    """The last value of a singular field (protobuf's merge rule), checking its wire type."""
    value = default
    for n, w, v in fields:
        if n == number:
            if w != wire:
                raise _Corrupt(f"protobuf field {number} has wire type {w}, expected {wire}")
            value = v
    return value


@dataclasses.dataclass(frozen=True)
class _BundleEntry:
    """One BundleEntryProto: where a tensor's bytes are and what they mean."""

    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 { int64 size = 1; string name = 2; }; unknown_rank = 3."""
    fields = _proto_fields(buf)
    if _scalar(fields, 3, 0):
        raise _Corrupt("tensor shape has unknown rank")
    dims = []
    for number, wire, value in fields:
        if number != 2:
            continue
        if wire != 2:
            raise _Corrupt(f"shape dim has wire type {wire}, expected 2")
        size = _signed64(_scalar(_proto_fields(value), 1, 0))
        if size < 0:
            raise _Corrupt(f"shape dim size {size} is negative")
        dims.append(size)
    return tuple(dims)


def _parse_entry(buf: bytes) -> _BundleEntry:
    """BundleEntryProto: dtype 1, shape 2, shard_id 3, offset 4, size 5, crc32c 6 (fixed32), slices 7."""
    fields = _proto_fields(buf)
    return _BundleEntry(
        dtype=_scalar(fields, 1, 0),
        shape=_parse_shape(_scalar(fields, 2, 2, b"")),
        shard_id=_scalar(fields, 3, 0),
        offset=_signed64(_scalar(fields, 4, 0)),
        size=_signed64(_scalar(fields, 5, 0)),
        crc32c=_scalar(fields, 6, 5),
        sliced=any(number == 7 for number, _, _ in fields),
    )


# ---------------------------------------------------------------------------------------------
# The SSTable.


def _read_block(table: bytes, offset: int, size: int, what: str) -> bytes:
    """The contents of the block at (offset, size), after checking its trailer."""
    data_end = len(table) - _FOOTER_SIZE
    if offset + size + _BLOCK_TRAILER_SIZE > data_end:
        raise _Corrupt(
            f"{what} block at offset {offset} with {size} bytes runs past the table data "
            f"({data_end} bytes before the footer)"
        )
    contents = table[offset : offset + size]
    compression = table[offset + size]
    stored = int.from_bytes(table[offset + size + 1 : offset + size + _BLOCK_TRAILER_SIZE], "little")
    # The checksum covers the compression byte too, so check it before trusting that byte.
    actual = _crc_register_bytes(0xFFFFFFFF, table[offset : offset + size + 1]) ^ 0xFFFFFFFF
    if _unmask_crc(stored) != actual:
        raise _Corrupt(f"{what} block at offset {offset} fails its crc32c check")
    if compression != 0:
        name = _COMPRESSION_NAMES.get(compression, "unknown")
        raise _Unsupported(
            f"{what} block at offset {offset} uses compression type {compression} ({name}); "
            f"only uncompressed tables (type 0), as tf.train.Saver writes them, are supported"
        )
    return contents


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of one block, undoing the prefix compression."""
    if len(block) < 4:
        raise _Corrupt(f"block of {len(block)} bytes is too short for its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    entries_end = len(block) - 4 - 4 * num_restarts
    if num_restarts == 0 or entries_end < 0:
        raise _Corrupt(f"block of {len(block)} bytes claims {num_restarts} restart points")
    entries = []
    key = b""
    pos = 0
    while pos < entries_end:
        shared, pos = _read_varint(block, pos, entries_end, bits=32)
        non_shared, pos = _read_varint(block, pos, entries_end, bits=32)
        value_length, pos = _read_varint(block, pos, entries_end, bits=32)
        if shared > len(key) or pos + non_shared + value_length > entries_end:
            raise _Corrupt(f"block entry at byte {pos} has inconsistent lengths")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + value_length]))
        pos += value_length
    return entries


def _decode_handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    """BlockHandle: varint64 offset, varint64 size; returns (offset, size, next position)."""
    offset, pos = _read_varint(buf, pos, len(buf))
    size, pos = _read_varint(buf, pos, len(buf))
    return offset, size, pos


def _table_items(table: bytes) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable held in memory, in key order."""
    if len(table) < _FOOTER_SIZE:
        raise _Corrupt(f"file has {len(table)} bytes, fewer than the {_FOOTER_SIZE}-byte table footer")
    footer = table[-_FOOTER_SIZE:]
    magic = int.from_bytes(footer[-8:], "little")
    if magic != _TABLE_MAGIC:
        raise _Corrupt(f"footer magic is {magic:#018x}, expected {_TABLE_MAGIC:#018x}")
    _, _, pos = _decode_handle(footer[:40])  # metaindex: TF writes it empty and never reads it
    index_offset, index_size, _ = _decode_handle(footer[:40], pos)
    items = []
    for _, handle in _block_entries(_read_block(table, index_offset, index_size, "index")):
        offset, size, used = _decode_handle(handle)
        if used != len(handle):
            raise _Corrupt("index block entry is not a block handle")
        items.extend(_block_entries(_read_block(table, offset, size, "data")))
    for (previous, _), (key, _) in zip(items, items[1:]):
        if key <= previous:
            raise _Corrupt(f"keys out of order: {key!r} after {previous!r}")
    return items


def _read_index(index_path: str) -> tuple[int, str, dict[str, _BundleEntry]]:
    """Parse `<prefix>.index`: returns (num_shards, byte order '<' or '>', entries by tensor name)."""
    with open(index_path, "rb") as f:
        table = f.read()  # kilobytes even for GPT-2 XL; the tensor bytes live in the data shards
    try:
        items = _table_items(table)
        if not items or items[0][0] != b"":
            raise _Corrupt('no bundle header (the entry with the empty key "")')
        header = _proto_fields(items[0][1])
        num_shards = _scalar(header, 1, 0)
        endianness = _scalar(header, 2, 0)
        entries = {}
        for key, value in items[1:]:
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise _Corrupt(f"tensor name {key!r} is not UTF-8") from None
            try:
                entries[name] = _parse_entry(value)
            except _Corrupt as exc:
                raise _Corrupt(f"entry of tensor {name}: {exc}") from None
    except _Corrupt as exc:
        raise CheckpointError(f"{index_path}: corrupt or truncated tensor-bundle index: {exc}") from None
    except _Unsupported as exc:
        raise CheckpointError(f"{index_path}: {exc}") from None
    if not 1 <= num_shards < 1 << 31:
        raise CheckpointError(f"{index_path}: bundle header has num_shards={num_shards}, expected >= 1")
    if endianness not in (0, 1):
        raise CheckpointError(f"{index_path}: bundle header has unknown endianness {endianness}")
    return num_shards, "<" if endianness == 0 else ">", entries


# ---------------------------------------------------------------------------------------------
# Tensors.


def _shard_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def _map_file(path: str) -> mmap.mmap | bytes:
    """A read-only map of the whole file; mmap refuses empty files, which hold no tensor anyway."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_tensor_bundle(prefix: str | os.PathLike, names=None, verify: bool = False) -> dict[str, np.ndarray]:
    """Read tensors of the TF tensor bundle `<prefix>.index` + `<prefix>.data-*` by their TF names.

    `names`: the tensor names to read (default: all). Each array is a read-only view over a
    memory map of its data shard, in the dtype and shape of its index entry.
    `verify=True` also checks every tensor's crc32c, reading all its bytes (a few seconds for
    GPT-2 124M); by default only sizes and bounds are checked, which touches no tensor data.
    """
    prefix = os.fspath(prefix)
    index_path = prefix + ".index"
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{index_path}: file not found; a tensor bundle is <prefix>.index + <prefix>.data-*")
    index = _read_index(index_path)
    return _read_tensors(prefix, index, list(index[2]) if names is None else list(names), verify)


def _read_tensors(prefix: str, index, names: list[str], verify: bool) -> dict[str, np.ndarray]:
    """The tensors `names` of the bundle at `prefix`, whose index `_read_index` has parsed."""
    index_path = prefix + ".index"
    num_shards, byte_order, entries = index
    shards: dict[int, tuple[str, mmap.mmap | bytes]] = {}
    tensors = {}
    for name in names:
        if name not in entries:
            raise CheckpointError(f"{index_path}: no tensor named {name}")
        entry = entries[name]
        if entry.sliced:
            raise CheckpointError(f"{index_path}: tensor {name} is saved as partitioned slices, which is not supported")
        if entry.dtype not in _NUMPY_DTYPES:
            dtype_name = _UNSUPPORTED_DTYPE_NAMES.get(entry.dtype, f"DataType enum {entry.dtype}")
            raise CheckpointError(f"{index_path}: tensor {name} has unsupported dtype {dtype_name}")
        dtype = np.dtype(_NUMPY_DTYPES[entry.dtype]).newbyteorder(byte_order)
        count = math.prod(entry.shape)
        if entry.size != count * dtype.itemsize:
            raise CheckpointError(
                f"{index_path}: tensor {name} has {entry.size} bytes, expected {count * dtype.itemsize} "
                f"for shape {entry.shape} of {dtype.name}"
            )
        if not 0 <= entry.shard_id < num_shards:
            raise CheckpointError(f"{index_path}: tensor {name} is in shard {entry.shard_id} of {num_shards}")
        if entry.shard_id not in shards:
            path = _shard_path(prefix, entry.shard_id, num_shards)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: data shard not found (named by {index_path}); {_MISSING_HINT}")
            shards[entry.shard_id] = (path, _map_file(path))
        path, buffer = shards[entry.shard_id]
        if entry.offset < 0 or entry.offset + entry.size > len(buffer):
            raise CheckpointError(
                f"{path}: tensor {name} needs bytes [{entry.offset}, {entry.offset + entry.size}) "
                f"but the file has {len(buffer)} bytes; is it truncated?"
            )
        flat = np.frombuffer(buffer, dtype=dtype, count=count, offset=entry.offset)
        if verify:
            actual = _crc32c(flat.view(np.uint8))
            if actual != _unmask_crc(entry.crc32c):
                raise CheckpointError(
                    f"{path}: tensor {name} fails its crc32c check "
                    f"(stored {_unmask_crc(entry.crc32c):#010x}, computed {actual:#010x})"
                )
        tensors[name] = flat.reshape(entry.shape)
    return tensors


# ---------------------------------------------------------------------------------------------
# The GPT-2 checkpoint directory.

_LAYER_VARIABLE = re.compile(r"model/h(0|[1-9][0-9]*)/(ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/([gbw])")
_PARAM_SUFFIX = {"g": "weight", "w": "weight", "b": "bias"}
_TOP_LEVEL = {
    "model/wte": "wte.weight",
    "model/wpe": "wpe.weight",
    "model/ln_f/g": "ln_f.weight",
    "model/ln_f/b": "ln_f.bias",
}


def _hf_name(tf_name: str) -> str | None:
    """The Hugging Face key (without `transformer.`) of an OpenAI variable, or None if unknown."""
    if tf_name in _TOP_LEVEL:
        return _TOP_LEVEL[tf_name]
    match = _LAYER_VARIABLE.fullmatch(tf_name)
    if match is None:
        return None
    layer, module, param = match.groups()
    # LayerNorms have g (gain) and b; the Conv1D layers have w and b.
    if param not in ("gb" if module.startswith("ln_") else "wb"):
        return None
    return f"h.{layer}.{module.replace('/', '.')}.{_PARAM_SUFFIX[param]}"


def _checkpoint_prefix(directory: str) -> str:
    """The bundle prefix named by the `checkpoint` file, else `<directory>/model.ckpt`."""
    state = os.path.join(directory, "checkpoint")
    try:
        with open(state, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return os.path.join(directory, DEFAULT_PREFIX)
    match = re.search(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if match is None:
        return os.path.join(directory, DEFAULT_PREFIX)
    name = re.sub(r"\\(.)", r"\1", match.group(1))
    if os.path.isabs(name) and not os.path.isfile(name + ".index"):
        # Savers often record absolute paths; a directory that was moved still holds the files.
        name = os.path.basename(name)
    return os.path.join(directory, name)


def is_tf_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True if `path` is a directory with hparams.json and the bundle index its `checkpoint` names."""
    path = os.fspath(path)
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, HPARAMS)):
        return False
    return os.path.isfile(_checkpoint_prefix(path) + ".index")


def load_tf_checkpoint(directory: str | os.PathLike, verify: bool = False) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    """Load an OpenAI TensorFlow GPT-2 checkpoint directory as (config, Hugging Face-named arrays).

    Keys are those of Hugging Face's `GPT2Model` state dict (no `transformer.` prefix):
    wte.weight [V, C], wpe.weight [n_ctx, C], h.{i}.ln_1.weight / .bias [C],
    h.{i}.attn.c_attn.weight [C, 3C] / .bias [3C], h.{i}.attn.c_proj.weight [C, C] / .bias [C],
    h.{i}.ln_2.weight / .bias [C], h.{i}.mlp.c_fc.weight [C, 4C] / .bias [4C],
    h.{i}.mlp.c_proj.weight [4C, C] / .bias [C], ln_f.weight / .bias [C].
    OpenAI's Conv1D weights are [1, in, out]; the leading 1 is dropped by indexing (a view), and
    [in, out] is already HF's Conv1D layout, so nothing is transposed. Arrays are read-only
    views of a memory map. Variables outside `model/` (global_step, optimizer state) and
    optimizer slots of known variables (`model/wte/Adam`) are skipped; any other `model/`
    variable is an error. Presence and shapes against the config are the caller's check.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ModelNotFoundError(f"{directory}: no such directory; {_MISSING_HINT}")
    hparams = os.path.join(directory, HPARAMS)
    prefix = _checkpoint_prefix(directory)
    for required in (hparams, prefix + ".index"):
        if not os.path.isfile(required):
            raise CheckpointError(f"{required}: file not found; {_MISSING_HINT}")
    config = GPT2Config.from_json(hparams)

    index = _read_index(prefix + ".index")
    renames = {}
    for tf_name in index[2]:
        if not tf_name.startswith("model/"):
            continue
        hf_name = _hf_name(tf_name)
        if hf_name is not None:
            renames[tf_name] = hf_name
        elif _hf_name(tf_name.rpartition("/")[0]) is None:  # not an optimizer slot such as w/Adam
            raise CheckpointError(f"{prefix}.index: unknown GPT-2 variable {tf_name}")

    tensors = _read_tensors(prefix, index, list(renames), verify)
    params = {}
    for tf_name, hf_name in renames.items():
        array = tensors[tf_name]
        if tf_name.endswith("/w"):
            if array.ndim != 3 or array.shape[0] != 1:
                raise CheckpointError(
                    f"{prefix}.index: tensor {tf_name} has shape {array.shape}, expected [1, in, out]"
                )
            array = array[0]
        params[hf_name] = array
    return config, params

