"""The validated weights every reader returns, the shapes GPT-2 needs, and the file pages behind them.

Every reader produces tensors under the names of the official Hugging Face file
(openai-community/gpt2 `model.safetensors`): `wte.weight` [V, C], `wpe.weight` [P, C],
`h.{i}.ln_1.weight` (gamma) and `.bias` (beta) [C], `h.{i}.attn.c_attn.weight` [C, 3C], ...,
`ln_f.bias` [C], with the "Conv1D" weights stored [in, out] so that y = x @ W + b.
`official_names` maps a state dict's layout onto them, `validate` checks them against the
config, `infer_config` reads a config off their shapes when no config.json is given.
"""

import dataclasses
import itertools
import mmap
import re

import numpy as np

from ..config import PRESETS, GPT2Config
from ..errors import CheckpointError, ConfigError
from .dtypes import FLOATS, to_float

_MASK_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


@dataclasses.dataclass
class Checkpoint:
    """Validated weights: `tensors` maps official names to arrays in the file's dtype.

    `file_dtypes` gives each tensor's dtype string in the file ("F32", "BF16", ..., "I8"),
    `path` the file the tensors came from (for messages and `info`). `quantized` holds the
    matrices a numpy-gpt2 int8 file stores (see `convert.write_safetensors`), by official
    name: (q int8 [out, in], scales float32 [out, ceil(in / 32)]), as `kernels.narrow`
    quantizes them; those names are not in `tensors`.
    """

    config: GPT2Config
    tensors: dict
    file_dtypes: dict
    path: str
    quantized: dict = dataclasses.field(default_factory=dict)

    def array(self, name: str, dtype) -> np.ndarray:
        """Tensor `name` as float `dtype`: a view of the file when it already has that dtype,
        dequantized (q * scale, then to dtype) when the file stores it in int8."""
        if name in self.quantized:
            from ..kernels.narrow import NarrowMatrix

            rows = NarrowMatrix("int8", self.quantized[name]).widen()
            return (rows if name == "wte.weight" else rows.T).astype(dtype, copy=False)
        return to_float(self.tensors[name], self.file_dtypes[name], np.dtype(dtype))

    @property
    def names(self) -> list:
        """Every tensor's official name, stored as floats or in int8."""
        return [*self.tensors, *self.quantized]


def mapped_file(array: np.ndarray) -> mmap.mmap | None:
    """The read-only map of a file that `array` is a view of, else None (ordinary memory, or a
    writable map, which may hold changes of its own)."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or np.frombuffer(base, dtype=np.uint8).flags.writeable:
        return None
    return base


def release_pages(array: np.ndarray) -> None:
    """Hand the pages of `array` back to the OS when it is a view of a read-only mapped file.

    For a model that copies a tensor out of the file (into another layout or dtype), the pages
    it read would otherwise stay in the process's resident set beside the copy until the file
    is unmapped. They stay in the OS's page cache, and reading the view again brings them back.
    Anything else (an array in ordinary memory, a writable map, a system without madvise) is
    left alone.
    """
    mapped = mapped_file(array)
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED") or not array.flags.c_contiguous:
        return
    begin = array.ctypes.data - np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, (begin + array.nbytes) // page * page  # whole pages inside
    if last > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)


def expected_shapes(config: GPT2Config) -> dict:
    """Official tensor name -> shape for `config`."""
    return dict(_named_shapes(config))


def _named_shapes(config: GPT2Config):
    """(official name, shape) of each tensor `config` needs, in the official file's order, lazily:
    a config may come from a hostile file, with a number of layers no loop could walk."""
    top = _top_shapes(config)
    yield "wte.weight", top["wte.weight"]
    yield "wpe.weight", top["wpe.weight"]
    layer = _layer_shapes(config)
    for i in range(config.n_layer):
        for suffix, shape in layer.items():
            yield f"h.{i}.{suffix}", shape
    yield "ln_f.weight", top["ln_f.weight"]
    yield "ln_f.bias", top["ln_f.bias"]


def _top_shapes(config: GPT2Config) -> dict:
    C = config.n_embd
    return {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.n_positions, C),
            "ln_f.weight": (C,), "ln_f.bias": (C,)}


def _layer_shapes(config: GPT2Config) -> dict:
    """Name within block h.{i} -> shape."""
    C, F = config.n_embd, config.inner_dim
    return {
        "ln_1.weight": (C,), "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,), "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, F), "mlp.c_fc.bias": (F,),
        "mlp.c_proj.weight": (F, C), "mlp.c_proj.bias": (C,),
    }


# A block's tensor: h.{i}.{name}. Nine digits at most: no model has a billion layers, and a
# longer index from a corrupt file is then an unknown name, not a number to parse.
_LAYER_NAME = re.compile(r"h\.(0|[1-9][0-9]{0,8})\.(.+)")


def official_names(tensors: dict, path: str) -> dict:
    """Map a Hugging Face state dict onto the official names.

    Accepts the hub layout (no prefix, with `h.{i}.attn.bias` mask buffers) and the
    `save_pretrained` layout (a `transformer.` prefix, perhaps `lm_head.weight`). The mask
    buffers are dropped; `lm_head.weight` is kept under that name for `validate` to check.
    """
    if "wte.weight" in tensors:
        renamed = dict(tensors)
    elif "transformer.wte.weight" in tensors:
        renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        if len(renamed) < len(tensors):
            twice = next(k for k in tensors if k.startswith("transformer.") and k.removeprefix("transformer.") in tensors)
            raise CheckpointError(
                f"{path}: tensor {twice.removeprefix('transformer.')} is in the file twice, as {twice} and "
                "without the prefix"
            )
    else:
        sample = ", ".join(sorted(tensors)[:4]) or "no tensors"
        raise CheckpointError(
            f"{path}: unknown checkpoint layout: found {sample}; expected GPT-2 names such as "
            "wte.weight and h.0.attn.c_attn.weight, with or without a 'transformer.' prefix"
        )
    return {k: v for k, v in renamed.items() if not _MASK_BUFFERS.fullmatch(k)}


def validate(config: GPT2Config, tensors: dict, file_dtypes: dict, path: str, quantized: dict | None = None) -> None:
    """Check that `tensors` (official names), with the int8 matrices of `quantized` (see
    `Checkpoint`), are exactly what `config` needs.

    Raises CheckpointError naming the file, the tensor, and the expected and found shape.
    """
    top, layer = _top_shapes(config), _layer_shapes(config)
    top["lm_head.weight"] = top["wte.weight"]

    def expected_shape(name):
        match = _LAYER_NAME.fullmatch(name)
        if match is None:
            return top.get(name)
        return layer.get(match[2]) if int(match[1]) < config.n_layer else None

    quantized = quantized or {}
    for name, (q, scales) in quantized.items():
        shape = expected_shape(name)
        if shape is None or len(shape) != 2 or name in ("wpe.weight", "lm_head.weight"):
            raise CheckpointError(f"{path}: {name}.q: int8 is for GPT-2's matrices, not for {name}")
        rows = shape if name == "wte.weight" else shape[::-1]
        want = (rows, (rows[0], -(-rows[1] // 32)))
        if (q.shape, scales.shape) != want or (q.dtype, scales.dtype) != (np.int8, np.float32):
            raise CheckpointError(f"{path}: {name}.q and {name}.scales are {q.dtype} {q.shape} and {scales.dtype} "
                                  f"{scales.shape}, expected int8 {want[0]} and float32 {want[1]} "
                                  f"from config n_embd={config.n_embd}")
    expected = {name: expected_shape(name) for name in tensors}
    present = {name for name, shape in expected.items() if shape is not None and name != "lm_head.weight"}
    n_missing = 4 + 12 * config.n_layer - len(present | set(quantized))
    if n_missing:
        # At most len(tensors) + 3 names in, three are missing; never a walk over all n_layer.
        missing = list(itertools.islice((name for name, _ in _named_shapes(config)
                                         if name not in tensors and name not in quantized), 3))
        more = f" and {n_missing - 3} more" if n_missing > 3 else ""
        raise CheckpointError(f"{path}: missing tensor {', '.join(missing)}{more}")
    extra = [name for name, shape in expected.items() if shape is None]
    if extra:
        raise CheckpointError(f"{path}: unknown tensor {extra[0]} for a GPT-2 with n_layer={config.n_layer}")
    for name, array in tensors.items():
        if tuple(array.shape) != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(array.shape)}, expected {expected[name]} "
                f"from config n_embd={config.n_embd} n_layer={config.n_layer} "
                f"vocab_size={config.vocab_size} n_positions={config.n_positions}"
            )
        if file_dtypes[name] not in FLOATS:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {file_dtypes[name]}, expected one of "
                f"{', '.join(FLOATS)}"
            )


def infer_config(tensors: dict, path: str, n_head: int | None = None) -> GPT2Config:
    """A config from the tensor shapes alone, for a bare .safetensors file.

    Shapes give every size but the number of heads: that comes from `n_head`, or from the
    preset (gpt2, gpt2-medium, ...) whose n_embd and n_layer match.
    """
    for name, sizes in (("wte.weight", "[vocab_size, n_embd]"), ("wpe.weight", "[n_positions, n_embd]")):
        if name not in tensors:
            raise CheckpointError(f"{path}: missing tensor {name}")
        if tensors[name].ndim != 2:
            raise CheckpointError(f"{path}: tensor {name} has shape {tensors[name].shape}, expected {sizes}")
    vocab_size, n_embd = tensors["wte.weight"].shape
    n_positions = tensors["wpe.weight"].shape[0]
    layers = {int(m[1]) for k in tensors if (m := _LAYER_NAME.fullmatch(k))}
    n_layer = max(layers) + 1 if layers else 0
    fc = tensors.get("h.0.mlp.c_fc.weight")
    n_inner = fc.shape[1] if fc is not None and fc.ndim == 2 and fc.shape[1] != 4 * n_embd else None
    if n_head is None:
        matches = [p["n_head"] for p in PRESETS.values() if (p["n_embd"], p["n_layer"]) == (n_embd, n_layer)]
        if not matches:
            raise CheckpointError(
                f"{path}: no config.json beside it and no preset has n_embd={n_embd}, n_layer={n_layer}; "
                "give the number of heads (--n-head / n_head=) or put a config.json beside the file"
            )
        n_head = matches[0]
    try:
        return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                          n_layer=n_layer, n_head=n_head, n_inner=n_inner)
    except ConfigError as exc:
        raise CheckpointError(
            f"{path}: no config.json beside it, and its tensor shapes give no valid one: "
            f"{str(exc).removeprefix('config: ')}"
        ) from None
