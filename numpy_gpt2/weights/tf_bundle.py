"""Read a TensorFlow tensor bundle (what a TF1 `Saver` writes) without TensorFlow.

A bundle with prefix P is `P.index`, naming each tensor and where its bytes are, and the data
shards `P.data-00000-of-0000N`, holding the raw tensor bytes back to back.

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
Tensors are returned as read-only views over a memory map of their shard: reading one copies
nothing and makes nothing resident until it is touched.
"""

import dataclasses
import math
import mmap
import os

import numpy as np

from ..errors import CheckpointError, brief
from .crc32c import crc32c, unmask
from .dtypes import STORAGE, TF_DATATYPES, TF_UNSUPPORTED, shape_problem

_FOOTER_SIZE = 48
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_SIZE = 5
_COMPRESSION_NAMES = {0: "none", 1: "snappy", 2: "zlib"}


class _Corrupt(Exception):
    """Raised by the byte-level decoders; the caller adds the file name as a CheckpointError."""


class _Unsupported(Exception):
    """A well-formed table using a feature this reader does not implement (compression)."""


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
    if unmask(stored) != crc32c(table[offset : offset + size + 1]):
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


class TensorBundle:
    """The tensor bundle `<prefix>.index` + `<prefix>.data-*`: its index, and its tensors on request.

    `entries` maps each TF tensor name to its index entry, in key order. Opening a bundle reads
    only the index (kilobytes); `read` maps the data shards.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.index_path = self.prefix + ".index"
        if not os.path.isfile(self.index_path):
            raise CheckpointError(
                f"{self.index_path}: file not found; a tensor bundle is <prefix>.index + <prefix>.data-*"
            )
        self.num_shards, self.byte_order, self.entries = _read_index(self.index_path)

    def file_dtype(self, name: str) -> str:
        """The file dtype ("F32", ...) of tensor `name`, as its index entry gives it."""
        return TF_DATATYPES[self.entries[name].dtype]

    def read(self, names=None, verify: bool = False) -> dict[str, np.ndarray]:
        """The tensors `names` (default: all) by their TF names, in their entry's dtype and shape.

        Sizes and bounds are always checked, which touches no tensor data. `verify=True` also
        checks each tensor's crc32c, which reads every byte of it.
        """
        shards: dict[int, tuple[str, mmap.mmap | bytes]] = {}
        tensors, spans = {}, []
        for name in self.entries if names is None else names:
            entry = self._entry(name)
            dtype = STORAGE[TF_DATATYPES[entry.dtype]].newbyteorder(self.byte_order)
            problem = shape_problem(entry.shape, dtype.itemsize)
            if problem:
                raise CheckpointError(f"{self.index_path}: tensor {name} has shape {brief(entry.shape)}: {problem}")
            count = math.prod(entry.shape)
            if entry.size != count * dtype.itemsize:
                raise CheckpointError(
                    f"{self.index_path}: tensor {name} has {entry.size} bytes, expected "
                    f"{count * dtype.itemsize} for shape {entry.shape} of {dtype.name}"
                )
            if entry.shard_id not in shards:
                shards[entry.shard_id] = self._map_shard(entry.shard_id, name)
            path, buffer = shards[entry.shard_id]
            if entry.offset < 0 or entry.offset + entry.size > len(buffer):
                raise CheckpointError(
                    f"{path}: tensor {name} needs bytes [{entry.offset}, {entry.offset + entry.size}) "
                    f"but the file has {len(buffer)} bytes; is it truncated?"
                )
            flat = np.frombuffer(buffer, dtype=dtype, count=count, offset=entry.offset)
            if verify:
                actual = crc32c(flat.view(np.uint8))
                if actual != unmask(entry.crc32c):
                    raise CheckpointError(
                        f"{path}: tensor {name} fails its crc32c check "
                        f"(stored {unmask(entry.crc32c):#010x}, computed {actual:#010x})"
                    )
            tensors[name] = flat.reshape(entry.shape)
            if entry.size:
                spans.append((path, entry.offset, entry.offset + entry.size, name))
        # No byte read as two tensors: a small shard must not stand for a large model.
        spans.sort()
        for (path, _, end, first), (same, begin, _, second) in zip(spans, spans[1:]):
            if same == path and begin < end:
                raise CheckpointError(f"{path}: tensors {first} and {second} share bytes [{begin}, {end})")
        return tensors

    def _entry(self, name: str) -> _BundleEntry:
        """The index entry of `name`, refused unless this reader can return it as one array."""
        if name not in self.entries:
            raise CheckpointError(f"{self.index_path}: no tensor named {name}")
        entry = self.entries[name]
        if entry.sliced:
            raise CheckpointError(
                f"{self.index_path}: tensor {name} is saved as partitioned slices, which is not supported"
            )
        if entry.dtype not in TF_DATATYPES:
            dtype_name = TF_UNSUPPORTED.get(entry.dtype, f"DataType enum {entry.dtype}")
            raise CheckpointError(f"{self.index_path}: tensor {name} has unsupported dtype {dtype_name}")
        return entry

    def _map_shard(self, shard: int, name: str) -> tuple[str, mmap.mmap | bytes]:
        """(path, read-only map) of data shard `shard`; mmap refuses empty files, which hold no tensor."""
        if not 0 <= shard < self.num_shards:
            raise CheckpointError(f"{self.index_path}: tensor {name} is in shard {shard} of {self.num_shards}")
        path = f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}"
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{path}: data shard not found (named by {self.index_path} for tensor {name}); "
                "a tensor bundle is <prefix>.index + <prefix>.data-*"
            )
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return path, b""
            return path, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
