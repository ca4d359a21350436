"""Write any checkpoint numpy-gpt2 reads as a Hugging Face directory or an llm.c .bin file.

A Hugging Face directory, as transformers' `GPT2LMHeadModel.from_pretrained` loads it (with
int8 weights, model.int8.safetensors in place of model.safetensors: numpy-gpt2's alone):

    config.json        GPT2Config.save_json
    model.safetensors  the official hub key layout (wte.weight, h.0.attn.c_attn.weight [in, out], ...)
    vocab.json         SRC's own tokenizer files (vocab.json/merges.txt or OpenAI's
    merges.txt         encoder.json/vocab.bpe), else the packaged ones: the same bytes

The tensors stream to disk one at a time (`safetensors_file.write`), converted to the stored
dtype as they go, so the model is never in memory twice.
"""

import pathlib

import numpy as np

from .errors import GPT2Error
from .fileio import atomic_write_bytes
from .tokenizer import find_tokenizer_files, packaged_files
from .weights import Checkpoint, expected_shapes, load_checkpoint
from .weights.dtypes import FILE_DTYPE_BY_NAME, encode
from .weights.llmc import VERSIONS as LLMC_VERSIONS
from .weights.llmc import write_llmc
from .weights.resolve import resolve_model
from .weights.safetensors_file import INT8_FILE, INT8_FORMAT
from .weights.safetensors_file import write as write_safetensors_file

DTYPES = ("float32", "float16", "bfloat16")
LLMC_DTYPES = tuple(LLMC_VERSIONS.values())
# Files whose presence means a directory already holds a model numpy-gpt2 or transformers reads.
_MODEL_FILES = ("config.json", "model.safetensors", INT8_FILE, "pytorch_model.bin", "hparams.json")


def convert(src, dst, dtype: str = "float32", n_head: int | None = None, force: bool = False,
            verify: bool = False, weights: str | None = None) -> pathlib.Path:
    """Convert the checkpoint `src` (any format `load_checkpoint` reads, or a model name) to `dst`.

    `dst` ending in `.bin` is written as an llm.c checkpoint (float32 or bfloat16); anything
    else is a Hugging Face directory (created if needed). `dtype` is the stored dtype:
    float32, float16 (half the size) or bfloat16. `dst` must not already hold a model unless
    `force`. `verify` checks the source first as `load_checkpoint(verify=True)` does (every
    TensorFlow tensor's crc32c). Every file is written atomically. Returns the path written.
    `weights="int8"` writes the matrices quantized (`write_int8_safetensors`) into a Hugging
    Face directory only numpy-gpt2 loads; `dtype` must then be float32 (the rest is stored so).
    """
    if dtype not in DTYPES:
        raise GPT2Error(f"dtype must be one of {', '.join(DTYPES)}, found {dtype!r}")
    if weights not in (None, "float32", "int8"):
        raise GPT2Error(f"weights must be 'int8' or None, found {weights!r}")
    int8 = weights == "int8"
    if int8 and dtype != "float32":
        raise GPT2Error(f"weights='int8' stores the matrices in int8 and the rest in float32, not {dtype}")
    src = pathlib.Path(resolve_model(src))
    dst = pathlib.Path(dst)
    to_llmc = dst.suffix == ".bin"
    outputs = [dst] if to_llmc else [dst, dst / "model.safetensors", dst / INT8_FILE]
    if any(src.resolve() == out.resolve() for out in outputs):
        raise GPT2Error(f"{dst}: is the source itself; convert to another file or directory")
    if to_llmc and int8:
        raise GPT2Error(f"{dst}: llm.c has no int8 format; convert to a directory for int8 weights")
    if to_llmc and dtype not in LLMC_DTYPES:
        raise GPT2Error(f"{dst}: llm.c stores {' or '.join(LLMC_DTYPES)}, not {dtype}")
    _check_destination(dst, to_llmc, force)

    checkpoint = load_checkpoint(src, n_head=n_head, verify=verify)
    if to_llmc:
        write_llmc(checkpoint, dst, dtype)
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    if int8:
        write_int8_safetensors(checkpoint, dst / INT8_FILE)
    else:
        write_safetensors(checkpoint, dst / "model.safetensors", dtype)
    _copy_tokenizer(src, dst)
    # The hub file also holds h.{i}.attn.bias, the causal mask as a buffer. It is left out:
    # transformers builds the mask itself and lists "attn.bias" in GPT2's
    # _keys_to_ignore_on_load_unexpected, so it loads the same with or without it, and the
    # buffers would cost L x n_positions^2 floats (48 MB for 124M) of nothing.
    checkpoint.config.save_json(dst / "config.json")
    return dst


def _check_destination(dst: pathlib.Path, to_llmc: bool, force: bool) -> None:
    if to_llmc:
        if dst.is_dir():
            raise GPT2Error(f"{dst}: is a directory, expected the path of an llm.c .bin file")
        if dst.exists() and not force:
            raise GPT2Error(f"{dst}: already exists; use --force (force=True) to overwrite it")
        return
    if dst.exists() and not dst.is_dir():
        raise GPT2Error(f"{dst}: is a file, expected a directory (or a path ending in .bin for llm.c)")
    present = [name for name in _MODEL_FILES if (dst / name).exists()]
    if present and not force:
        raise GPT2Error(f"{dst}: already holds a model ({', '.join(present)}); "
                        "use --force (force=True) to overwrite it")
    others = sorted(p.name for p in dst.iterdir()) if dst.is_dir() else []
    if others and not force:
        raise GPT2Error(f"{dst}: is not empty and holds no model ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); convert into a new or empty directory, "
                        "or use --force (force=True) to write into it")


def write_safetensors(checkpoint: Checkpoint, path, dtype: str = "float32") -> None:
    """Write `checkpoint`'s tensors as a .safetensors file of `dtype`, atomically, in the hub layout."""
    file_dtype = FILE_DTYPE_BY_NAME[dtype]
    specs = {name: (file_dtype, shape) for name, shape in expected_shapes(checkpoint.config).items()}

    def stored(name):
        return encode(checkpoint.array(name, np.float32), file_dtype, path, name)

    write_safetensors_file(path, specs, stored, metadata={"format": "pt"})


def write_int8_safetensors(checkpoint: Checkpoint, path) -> None:
    """Write `checkpoint` as a numpy-gpt2 int8 .safetensors file, atomically: each matrix (the
    blocks' and wte) as NAME.q, int8 [out, in] rows, and NAME.scales, float32 [out, in / 32],
    quantized as `kernels.narrow.int8_matrix` does (an int8 checkpoint's own kept as they are);
    wpe, the biases and the layernorms as float32.

    The metadata's "format" is not "pt": transformers refuses the file rather than misread it.
    """
    from .kernels.narrow import GROUP, int8_matrix

    shapes = expected_shapes(checkpoint.config)
    specs = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and name != "wpe.weight":
            rows = shape if name == "wte.weight" else shape[::-1]
            specs[name + ".q"] = ("I8", rows)
            specs[name + ".scales"] = ("F32", (rows[0], -(-rows[1] // GROUP)))
        else:
            specs[name] = ("F32", shape)
    last = {}  # the matrix whose .q was just written, for its .scales next

    def stored(key):
        if key in shapes:
            return np.ascontiguousarray(checkpoint.array(key, np.float32))
        name, part = key.rsplit(".", 1)
        if part == "q":
            if name in checkpoint.quantized:
                last[name] = checkpoint.quantized[name]
            else:
                array = checkpoint.array(name, np.float32)
                last[name] = int8_matrix(array if name == "wte.weight" else array.T).stored
            return last[name][0]
        return last.pop(name)[1]

    metadata = {"format": INT8_FORMAT, "weights": "int8", "group_size": str(GROUP),
                "note": "GPT-2 with int8 weights (llama.cpp's q8_0: a float32 scale per 32 inputs of a row), "
                        "written by numpy-gpt2 convert --weights int8; only numpy-gpt2 loads it, transformers "
                        "cannot; numpy-gpt2 convert turns it back into a float32 file"}
    write_safetensors_file(path, specs, stored, metadata=metadata)


def _copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copy the BPE files the engine would use for `src` to dst/vocab.json and dst/merges.txt."""
    vocab, merges = find_tokenizer_files(src if src.is_dir() else src.parent) or packaged_files()
    for source, name in ((vocab, "vocab.json"), (merges, "merges.txt")):
        target = dst / name
        if pathlib.Path(str(source)).resolve() != target.resolve():
            atomic_write_bytes(target, source.read_bytes())
