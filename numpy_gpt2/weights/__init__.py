"""Checkpoint loading: one reader per format, all ending in the same validated Checkpoint.

This package front only dispatches: `load_checkpoint` tells the format of a path apart and
hands it to its reader. The modules behind it:

    checkpoint.py        Checkpoint, the official names and shapes, validation, config inference,
                         the file pages behind the arrays
    dtypes.py            the one table of file dtypes and the conversions between them
    safetensors_file.py  Hugging Face .safetensors, read memory-mapped and written
    tf_checkpoint.py     OpenAI's TensorFlow checkpoint directory (tf_bundle.py, crc32c.py beneath)
    llmc.py              karpathy/llm.c's .bin, read and written
    torch_state.py       PyTorch state dicts, Hugging Face's or nanoGPT's (needs torch)
    resolve.py           a model name -> the directory that holds it

Submodules never import this front; the readers of rarer formats are imported when first asked
for, so loading a .safetensors file imports only what it uses.
"""

import os

from ..config import GPT2Config
from ..errors import CheckpointError, ModelNotFoundError
from .checkpoint import (Checkpoint, expected_shapes, infer_config, mapped_file, official_names, release_pages,
                         validate)
from .safetensors_file import INT8_FILE, load_safetensors

__all__ = ["Checkpoint", "expected_shapes", "infer_config", "load_checkpoint", "load_safetensors", "mapped_file",
           "official_names", "release_pages", "validate"]


def load_checkpoint(path: str | os.PathLike, n_head: int | None = None, verify: bool = False) -> Checkpoint:
    """Load and validate the checkpoint at `path`.

    `path` is a directory holding config.json + model.safetensors (Hugging Face, or
    pytorch_model.bin when torch is installed, or numpy-gpt2's int8 model.int8.safetensors), a directory holding OpenAI's TensorFlow
    checkpoint (hparams.json, model.ckpt.*), an llm.c .bin file (told apart by its magic), a
    PyTorch .bin/.pt/.pth state dict (Hugging Face or nanoGPT; needs torch), or a single
    .safetensors file (config.json beside it, else inferred from the shapes and `n_head`).

    Every load checks each tensor's size and place against the file's header or index.
    `verify=True` also checks the tensors' bytes where the format stores a checksum: the
    crc32c of every TensorFlow tensor, which reads the whole file. The other formats store
    none, so for them it adds nothing to those checks.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        st_path = os.path.join(path, "model.safetensors")
        int8_path = os.path.join(path, INT8_FILE)
        torch_path = os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st_path):
            return load_safetensors(st_path, _config_in(path), n_head)
        if os.path.isfile(int8_path):
            return load_safetensors(int8_path, _config_in(path), n_head)
        if os.path.isfile(torch_path):
            from .torch_state import load_torch_checkpoint

            return load_torch_checkpoint(torch_path, _config_in(path), n_head)
        from . import tf_checkpoint

        if tf_checkpoint.is_tf_checkpoint_dir(path):
            return tf_checkpoint.load_tf(path, verify)
        raise ModelNotFoundError(
            f"{path}: no checkpoint in this directory; expected config.json + model.safetensors "
            "(Hugging Face) or hparams.json + model.ckpt.index + model.ckpt.data-* (OpenAI)"
        )
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{path}: no such file or directory")
    if not os.path.isfile(path):  # a named pipe or a device: reading it could wait forever
        raise CheckpointError(f"{path}: not a regular file, expected a checkpoint file or directory")
    from . import llmc, torch_state

    if llmc.is_llmc_file(path):
        return llmc.load_llmc(path)
    config = _config_in(os.path.dirname(path))
    if path.endswith(torch_state.SUFFIXES):
        return torch_state.load_torch_checkpoint(path, config, n_head)
    return load_safetensors(path, config, n_head)


def _config_in(directory: str) -> GPT2Config | None:
    """The config.json of `directory`, or None when it has none (the reader infers one)."""
    config_path = os.path.join(directory, "config.json")
    return GPT2Config.from_json(config_path) if os.path.isfile(config_path) else None
