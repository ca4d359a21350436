"""karpathy/llm.c's GPT-2 checkpoint (`gpt2_124M.bin`, `gpt2_124M_bf16.bin`), read and written.

The file, as llm.c's `train_gpt2.py` `write_model` writes it and `train_gpt2.c`
`gpt2_build_from_checkpoint` reads it:

    header   256 int32: [0] magic 20240326, [1] version (3: float32, 5: bfloat16),
             [2] maxT (n_positions), [3] V (vocab_size), [4] L, [5] NH, [6] C,
             [7] Vp (V padded up to a multiple of 128: 50304 for GPT-2), the rest 0
    params   every tensor back to back, all in the version's dtype, in the order of `_LAYOUT`

The weights are those of llm.c's PyTorch GPT, whose layers are `nn.Linear`: its
`from_pretrained` transposes Hugging Face's Conv1D weights on the way in, so the four matmul
weights are stored [out, in] (qkvw [L, 3C, C], fcprojw [L, C, 4C]) and need a transpose to our
[in, out]. wte has Vp rows; rows V..Vp are padding (zeros), never a real token.
"""

import os

import numpy as np

from ..config import GPT2Config
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_path
from .checkpoint import Checkpoint, validate
from .dtypes import FILE_DTYPE_BY_NAME, STORAGE, encode

MAGIC = 20240326
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
VERSIONS = {3: "float32", 5: "bfloat16"}
_VOCAB_MULTIPLE = 128
# llm.c hard-codes these parts of GPT-2 (layernorm_forward's eps, the 4C MLP, 1/sqrt(D) scores).
_LLMC_EPS = 1e-5

# (name, llm.c shape of one tensor, stored [out, in]) in file order. Names with "{i}" are one
# tensor per layer, stored for all L layers together before the next name.
_LAYOUT = (
    ("wte.weight", ("Vp", "C"), False),
    ("wpe.weight", ("maxT", "C"), False),
    ("h.{i}.ln_1.weight", ("C",), False),
    ("h.{i}.ln_1.bias", ("C",), False),
    ("h.{i}.attn.c_attn.weight", ("3C", "C"), True),
    ("h.{i}.attn.c_attn.bias", ("3C",), False),
    ("h.{i}.attn.c_proj.weight", ("C", "C"), True),
    ("h.{i}.attn.c_proj.bias", ("C",), False),
    ("h.{i}.ln_2.weight", ("C",), False),
    ("h.{i}.ln_2.bias", ("C",), False),
    ("h.{i}.mlp.c_fc.weight", ("4C", "C"), True),
    ("h.{i}.mlp.c_fc.bias", ("4C",), False),
    ("h.{i}.mlp.c_proj.weight", ("C", "4C"), True),
    ("h.{i}.mlp.c_proj.bias", ("C",), False),
    ("ln_f.weight", ("C",), False),
    ("ln_f.bias", ("C",), False),
)


def padded_vocab(vocab_size: int) -> int:
    """Vp: the vocabulary rounded up to a multiple of 128, as llm.c's `pad_vocab` does."""
    return -(-vocab_size // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE


def is_llmc_file(path: str | os.PathLike) -> bool:
    """True if `path` is a file whose first int32 is llm.c's magic (a .bin state dict is not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and int.from_bytes(head, "little", signed=True) == MAGIC


def _shapes(config: GPT2Config, vp: int):
    """(name, shape of one tensor, transposed) in file order, the symbolic sizes filled in."""
    C = config.n_embd
    sizes = {"Vp": vp, "maxT": config.n_positions, "C": C, "3C": 3 * C, "4C": 4 * C}
    return [(name, tuple(sizes[s] for s in shape), transposed) for name, shape, transposed in _LAYOUT]


def load_llmc(path: str | os.PathLike) -> Checkpoint:
    """Memory-map an llm.c GPT-2 checkpoint as a validated Checkpoint under the official names.

    The matmul weights come back as transposed views ([in, out]) and wte without its padding
    rows; nothing is copied. Raises CheckpointError naming the file with what was expected
    and found when the magic, version or sizes disagree with the file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise CheckpointError(
            f"{path}: file of {size} bytes is shorter than the {HEADER_BYTES}-byte llm.c header (truncated)"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    header = raw[:HEADER_BYTES].view("<i4")
    magic, version, max_t, vocab, n_layer, n_head, n_embd, vp = (int(v) for v in header[:8])
    if magic != MAGIC:
        raise CheckpointError(f"{path}: llm.c magic is {magic}, expected {MAGIC}")
    if version not in VERSIONS:
        known = ", ".join(f"{v} ({d})" for v, d in VERSIONS.items())
        raise CheckpointError(f"{path}: llm.c checkpoint version is {version}, expected one of {known}")
    try:
        config = GPT2Config(vocab_size=vocab, n_positions=max_t, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: llm.c header: {str(exc).removeprefix('config: ')}") from None
    if vp < vocab:
        raise CheckpointError(f"{path}: llm.c header has padded vocab {vp}, smaller than the vocab {vocab}")

    file_dtype = FILE_DTYPE_BY_NAME[VERSIONS[version]]
    dtype = STORAGE[file_dtype]
    layout = _shapes(config, vp)
    counts = [int(np.prod(shape)) * (n_layer if "{i}" in name else 1) for name, shape, _ in layout]
    expected = HEADER_BYTES + sum(counts) * dtype.itemsize
    if size != expected:
        raise CheckpointError(
            f"{path}: file has {size} bytes, expected {expected} for the llm.c header's "
            f"maxT={max_t} V={vocab} Vp={vp} L={n_layer} NH={n_head} C={n_embd} "
            f"({VERSIONS[version]}){' (truncated file)' if size < expected else ''}"
        )

    tensors, offset = {}, HEADER_BYTES
    for (name, shape, transposed), count in zip(layout, counts):
        block = raw[offset:offset + count * dtype.itemsize].view(dtype)
        offset += count * dtype.itemsize
        if "{i}" not in name:
            tensors[name] = block.reshape(shape)
            continue
        stacked = block.reshape(n_layer, *shape)
        for i in range(n_layer):
            tensors[name.format(i=i)] = stacked[i].T if transposed else stacked[i]
    tensors["wte.weight"] = tensors["wte.weight"][:vocab]
    file_dtypes = dict.fromkeys(tensors, file_dtype)
    validate(config, tensors, file_dtypes, path)
    return Checkpoint(config, tensors, file_dtypes, path)


def check_writable(config: GPT2Config, path: str | os.PathLike) -> None:
    """Raise ConfigError if llm.c would run `config` as a different model.

    llm.c fixes what the Hugging Face config leaves free: layernorm eps 1e-5, an MLP of 4C,
    attention scores scaled by 1/sqrt(D) and nothing else.
    """
    problems = []
    if config.layer_norm_epsilon != _LLMC_EPS:
        problems.append(f"layer_norm_epsilon={config.layer_norm_epsilon} (llm.c uses {_LLMC_EPS})")
    if config.inner_dim != 4 * config.n_embd:
        problems.append(f"n_inner={config.n_inner} (llm.c uses 4 * n_embd = {4 * config.n_embd})")
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        problems.append("attention scaling other than 1/sqrt(head_dim)")
    if problems:
        raise ConfigError(f"{os.fspath(path)}: llm.c cannot represent this model: {'; '.join(problems)}")


def write_llmc(checkpoint: Checkpoint, path: str | os.PathLike, dtype: str = "float32") -> None:
    """Write `checkpoint` as an llm.c checkpoint (version 3 float32 or 5 bfloat16) at `path`, atomically.

    The matmul weights are written transposed to llm.c's [out, in], wte padded with zero rows
    to Vp; one tensor is converted at a time, so memory stays at one tensor.
    """
    path = os.fspath(path)
    if dtype not in VERSIONS.values():
        raise ConfigError(f"llm.c dtype must be one of {', '.join(VERSIONS.values())}, found {dtype!r}")
    config = checkpoint.config
    check_writable(config, path)
    file_dtype = FILE_DTYPE_BY_NAME[dtype]
    version = next(v for v, d in VERSIONS.items() if d == dtype)
    vp = padded_vocab(config.vocab_size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [MAGIC, version, config.n_positions, config.vocab_size, config.n_layer,
                  config.n_head, config.n_embd, vp]

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        for name, _, transposed in _LAYOUT:
            for one in [name.format(i=i) for i in range(config.n_layer)] if "{i}" in name else [name]:
                a = checkpoint.array(one, np.float32)
                f.write(encode(a.T if transposed else a, file_dtype, path, one).data)
            if name == "wte.weight":
                f.write(np.zeros((vp - config.vocab_size, config.n_embd), STORAGE[file_dtype]).data)
        f.flush()
        os.fsync(f.fileno())
