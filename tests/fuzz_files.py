"""Small valid checkpoints in every format, written from the formats' specifications, to mutate.

The seeds are one tiny GPT-2 (`TINY`) in each format the loaders read, written here and not by
numpy_gpt2's writers, so a mutation starts from bytes the code under test did not produce:

    safetensors  by the reference `safetensors` library (`save`), then re-framed by hand
    llm.c .bin   the 256-int32 header and the tensors in llm.c's order, transposed as llm.c stores them
    TensorFlow   a tensor bundle: the LevelDB table of BundleEntryProtos (`sstable`, `bundle_entry`),
                 checked byte for byte against the index real TensorFlow wrote (tests/test_fuzz.py)

`python tests/fuzz_files.py DIR` loads every file DIR holds under an address-space cap and
prints one JSON line per case: the subprocess test reads it to see crashes and peak memory.
"""

import json
import os
import resource
import struct
import sys

import numpy as np

TINY = dict(vocab_size=8, n_positions=4, n_embd=4, n_layer=2, n_head=2)
LLMC_MAGIC, LLMC_HEADER_INTS = 20240326, 256
TABLE_MAGIC = 0xDB4775248B80FB57
DT_FLOAT = 1


def gpt2_shapes(vocab_size: int, n_positions: int, n_embd: int, n_layer: int) -> dict:
    """Official Hugging Face name -> shape of a GPT-2, Conv1D weights [in, out], written out here
    from the official file's layout rather than taken from numpy_gpt2."""
    V, P, C = vocab_size, n_positions, n_embd
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C)}
    for i in range(n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def tiny_tensors(seed: int = 0) -> dict:
    """Official name -> float32 array of a random `TINY` GPT-2."""
    shapes = gpt2_shapes(*(TINY[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer")))
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


# --- safetensors ------------------------------------------------------------------------------

def safetensors_seed() -> tuple[dict, bytes]:
    """(header as a dict, the data bytes after it) of `tiny_tensors` saved by the safetensors library."""
    from safetensors.numpy import save

    raw = save(tiny_tensors(), metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def safetensors_bytes(header, data: bytes) -> bytes:
    """A .safetensors file: the 8-byte header length, the header (a dict as JSON, or raw bytes), the data."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


# --- llm.c ------------------------------------------------------------------------------------

_LLMC_ORDER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")


def llmc_seed() -> tuple[list[int], bytes]:
    """(the header's first 8 int32s, the float32 parameter bytes) of `tiny_tensors` as llm.c's
    `write_model` lays them out: wte padded to Vp = 128 rows, each per-layer tensor for all layers
    together, the four matmul weights as nn.Linear's [out, in]."""
    t = tiny_tensors()
    V, P, C, L, H = (TINY[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"))
    vp = 128
    wte = np.zeros((vp, C), np.float32)
    wte[:V] = t["wte.weight"]
    parts = [wte, t["wpe.weight"]]
    for suffix in _LLMC_ORDER:
        for i in range(L):
            a = t[f"h.{i}.{suffix}"]
            parts.append(a.T if suffix.endswith("weight") and a.ndim == 2 else a)
    parts += [t["ln_f.weight"], t["ln_f.bias"]]
    return [LLMC_MAGIC, 3, P, V, L, H, C, vp], b"".join(np.ascontiguousarray(p).tobytes() for p in parts)


def llmc_bytes(ints, params: bytes) -> bytes:
    """An llm.c file: `ints` as the header's first int32s (the rest 0), then `params`."""
    header = np.zeros(LLMC_HEADER_INTS, "<i4")
    header[:len(ints)] = ints
    return header.tobytes() + params


# --- TensorFlow tensor bundle -----------------------------------------------------------------

def crc32c_reference(data: bytes) -> int:
    """CRC-32C one bit at a time, straight from the reflected polynomial."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
    """LevelDB's crc32c::Mask (util/crc32c.h)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(value: int) -> bytes:
    """Protobuf / LevelDB base-128 varint of a non-negative int (negative: its 64-bit two's complement)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def block_handles(footer: bytes) -> list[tuple[int, int]]:
    """The (offset, size) of the metaindex and the index block, read from a table's 48-byte footer."""
    values, pos = [], 0
    for _ in range(4):
        value = shift = 0
        while True:
            value |= (footer[pos] & 0x7F) << shift
            shift += 7
            pos += 1
            if footer[pos - 1] < 0x80:
                break
        values.append(value)
    return [(values[0], values[1]), (values[2], values[3])]


def field(number: int, value) -> bytes:
    """One protobuf field: an int as a varint (wire 0), bytes length-delimited (wire 2)."""
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    return varint(number << 3) + varint(value)


def bundle_entry(dtype: int, shape, offset: int, size: int, crc: int, shard_id: int = 0) -> bytes:
    """A BundleEntryProto as TensorFlow writes it: proto3, so a zero shard_id or offset is left out."""
    dims = b"".join(field(2, field(1, n) if n else b"") for n in shape)
    return (field(1, dtype) + field(2, dims) + (field(3, shard_id) if shard_id else b"")
            + (field(4, offset) if offset else b"") + field(5, size) + b"\x35" + struct.pack("<I", crc))


BUNDLE_HEADER = field(1, 1) + field(3, field(1, 1))  # num_shards 1, little-endian, version {producer 1}


def _block(items, restart_interval: int) -> bytes:
    """One table block: prefix-compressed entries, restart offsets, restart count."""
    out, restarts, previous = bytearray(), [], b""
    for n, (key, value) in enumerate(items):
        shared = 0
        if n % restart_interval:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts or [0]) + struct.pack("<I", len(restarts or [0]))


def _short_successor(key: bytes) -> bytes:
    """LevelDB's BytewiseComparator::FindShortSuccessor: the first byte that can grow, grown."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def sstable(items, block_entries: int = 1 << 30) -> bytes:
    """A LevelDB table of (key, value) pairs in key order, as TensorFlow's table builder writes it:
    data blocks of `block_entries` entries, the empty metaindex block, the index block, the footer."""
    out, index = bytearray(), []

    def put(contents: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", masked(crc32c_reference(contents + b"\x00"))))
        return handle

    chunks = [items[i:i + block_entries] for i in range(0, len(items), block_entries)]
    for n, chunk in enumerate(chunks):
        last = chunk[-1][0]
        index.append((last if n + 1 < len(chunks) else _short_successor(last), put(_block(chunk, 16))))
    metaindex = put(_block([], 16))
    footer = metaindex + put(_block(index, 1))
    return bytes(out) + footer + bytes(40 - len(footer)) + struct.pack("<Q", TABLE_MAGIC)


def tf_name(name: str) -> str:
    """OpenAI's variable name for an official tensor name (h.0.attn.c_attn.weight -> model/h0/attn/c_attn/w)."""
    top = {"wte.weight": "model/wte", "wpe.weight": "model/wpe", "ln_f.weight": "model/ln_f/g",
           "ln_f.bias": "model/ln_f/b"}
    if name in top:
        return top[name]
    _, layer, *module, param = name.split(".")
    letter = "b" if param == "bias" else ("g" if module[0].startswith("ln_") else "w")
    return f"model/h{layer}/{'/'.join(module)}/{letter}"


def tf_seed() -> tuple[dict, bytes]:
    """(TF name -> (shape, offset, size, masked crc), data bytes) of `tiny_tensors` as a TF1 Saver
    stores them: keys in byte order, tensors back to back in that order, Conv1D weights [1, in, out]."""
    arrays = {tf_name(k): (v[None] if tf_name(k).endswith("/w") else v) for k, v in tiny_tensors().items()}
    entries, data = {}, bytearray()
    for name in sorted(arrays, key=str.encode):
        raw = arrays[name].tobytes()
        entries[name] = (arrays[name].shape, len(data), len(raw), masked(crc32c_reference(raw)))
        data += raw
    return entries, bytes(data)


def tf_index(entries: dict, header: bytes = BUNDLE_HEADER, dtype: int = DT_FLOAT) -> bytes:
    """The .index of a bundle whose `entries` are name -> (shape, offset, size, crc) or raw proto bytes."""
    items = [(b"", header)]
    for name in sorted(entries, key=str.encode):
        e = entries[name]
        items.append((name.encode(), e if isinstance(e, bytes) else bundle_entry(dtype, *e)))
    return sstable(items)


def write_tf_dir(directory, index: bytes, data: bytes, hparams=None) -> None:
    """A TensorFlow checkpoint directory as OpenAI's download leaves it."""
    os.makedirs(directory, exist_ok=True)
    hparams = hparams if hparams is not None else json.dumps(
        {"n_vocab": TINY["vocab_size"], "n_ctx": TINY["n_positions"], "n_embd": TINY["n_embd"],
         "n_head": TINY["n_head"], "n_layer": TINY["n_layer"]})
    files = {"checkpoint": 'model_checkpoint_path: "model.ckpt"\n', "hparams.json": hparams,
             "model.ckpt.index": index, "model.ckpt.data-00000-of-00001": data}
    for name, content in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode())


# --- The subprocess check ---------------------------------------------------------------------

def _check_all(directory: str) -> None:
    """Load every case under `directory` with the address space capped; one JSON line per case."""
    from numpy_gpt2.errors import GPT2Error
    from numpy_gpt2.weights import load_checkpoint
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        in_use = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + (1 << 30), hard))
    for name in sorted(os.listdir(directory)):
        try:
            load_checkpoint(os.path.join(directory, name), n_head=TINY["n_head"])
            outcome = "loaded"
        except GPT2Error:
            outcome = "GPT2Error"
        except BaseException as exc:  # the parent reports any other exception as the failure
            outcome = type(exc).__name__
        print(json.dumps({"case": name, "outcome": outcome}), flush=True)
    # VmHWM, not getrusage's ru_maxrss: that one keeps the peak of the parent this process was forked from.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_kib": peak}), flush=True)


if __name__ == "__main__":
    _check_all(sys.argv[1])
