"""CRC-32C (Castagnoli), as LevelDB and TensorFlow's tensor bundle use it to check their bytes.

`crc32c(data)` is the checksum; `unmask` undoes LevelDB's masking of a stored value
(leveldb `util/crc32c.h`). The polynomial is 0x1EDC6F41, used reflected, with the register
starting at and finally XORed with 0xFFFFFFFF; its published check value is
crc32c(b"123456789") == 0xE3069283.
"""

import numpy as np

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


def _advance_register(register: int, data) -> int:
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
    one = [_advance_register(1 << i, b"\0") for i in range(32)]
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


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object (bytes, memoryview, mmap slice, uint8 array).

    The fast twin of `_advance_register` (one byte at a time, the table-driven reference),
    equal to it bit for bit. Large inputs are cut into up to 65536 equal lanes that advance one
    byte per NumPy step together, then joined pairwise with the zero-byte operator; the tail is
    done in Python. A whole GPT-2 data shard so costs one NumPy step per byte of a lane, not
    one Python step per byte of the file.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    n = buf.size
    if n < _CRC_VECTOR_MIN:
        return _advance_register(0xFFFFFFFF, buf.tobytes()) ^ 0xFFFFFFFF
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
    register = _advance_register(int(registers[0]), buf[lanes * width :].tobytes())
    return register ^ 0xFFFFFFFF


def unmask(masked: int) -> int:
    """LevelDB stores crc32c values rotated and offset, so a crc of data holding crcs stays strong."""
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF
