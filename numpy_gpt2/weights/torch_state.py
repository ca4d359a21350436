"""PyTorch GPT-2 checkpoints (`pytorch_model.bin`, nanoGPT's `ckpt.pt`), read with torch when it is installed.

Two layouts of the same weights reach us as pickled state dicts:

- Hugging Face (`pytorch_model.bin`, `torch.save(model.state_dict())`): official names with
  or without a `transformer.` prefix, Conv1D weights [in, out], as in the safetensors files.
- nanoGPT (`model.py`; `ckpt.pt` is {"model": state dict, "model_args": {n_layer, n_head,
  n_embd, block_size, bias, vocab_size, ...}, "optimizer": ..., ...}): names
  `transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ..., `lm_head.weight`,
  perhaps under torch.compile's `_orig_mod.` prefix, and `nn.Linear` weights [out, in], which
  are transposed here.

The file is read with `torch.load(weights_only=True)`, which rebuilds tensors and plain
containers only: a pickle that names any other object is refused, never run. torch is
imported inside the reader, so the rest of numpy-gpt2 works without it.
"""

import os
import pickle
import re

import numpy as np

from ..config import GPT2Config
from ..errors import CheckpointError, ConfigError
from .checkpoint import Checkpoint, infer_config, official_names, validate
from .dtypes import FILE_DTYPE_BY_NAME

SUFFIXES = (".bin", ".pt", ".pth")
NEEDS_TORCH = "reading a PyTorch .bin/.pt needs torch: pip install torch, or convert it where torch is installed"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel
_LINEAR_WEIGHTS = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")


def _torch_load(path: str):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: {NEEDS_TORCH}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        # weights_only refuses any global outside torch's allow-list before it could be called.
        refused = isinstance(exc, pickle.UnpicklingError) and re.search(r"GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: refused to unpickle {refused.group(1)}: the file holds objects other than "
                "tensors and plain containers, and loading those could run code"
            ) from None
        # A file that is not a torch checkpoint fails anywhere inside torch.load (KeyError,
        # EOFError, RuntimeError, UnpicklingError...): bad input, not a bug here.
        if isinstance(exc, pickle.UnpicklingError):
            detail = "a pickle that torch's weights_only loader rejects"  # torch's text is a page long
        else:
            detail = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None


def _to_numpy(tensor, path: str, name: str) -> tuple[np.ndarray, str]:
    """A torch tensor as (array sharing its memory, safetensors dtype string)."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{path}: entry {name} is a {type(tensor).__name__}, expected a tensor")
    tensor = tensor.detach()
    file_dtype = FILE_DTYPE_BY_NAME.get(str(tensor.dtype).removeprefix("torch."))
    if file_dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected a float type")
    if file_dtype == "BF16":  # NumPy has no bfloat16: hand over its bits
        return tensor.view(torch.int16).numpy().view(np.uint16), file_dtype
    return tensor.numpy(), file_dtype


def _state_dict(obj, path: str) -> tuple[dict, dict | None]:
    """(state dict, nanoGPT model_args or None) from what torch.load returned."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    model_args = obj.get("model_args")
    for key in ("model", "state_dict"):  # nanoGPT's ckpt.pt; a training checkpoint's wrapper
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if model_args is not None and not isinstance(model_args, dict):
        raise CheckpointError(f"{path}: model_args is a {type(model_args).__name__}, expected a dict")
    state = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: has key {name!r}, expected tensor names")
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        state[name] = value
    return state, model_args


def _config_from_model_args(model_args: dict, path: str) -> GPT2Config:
    """nanoGPT's GPTConfig as ours: block_size is n_positions; eps 1e-5 and a 4C MLP are fixed there."""
    if model_args.get("bias") is False:
        # GPT-2 has biases everywhere; a bias-free model is a different architecture, and
        # filling in zeros would pass it off as GPT-2 without telling anyone.
        raise CheckpointError(
            f"{path}: nanoGPT model_args has bias=False; GPT-2 needs the linear and layernorm "
            "biases, so this model cannot be loaded as GPT-2"
        )
    try:
        return GPT2Config(vocab_size=model_args["vocab_size"], n_positions=model_args["block_size"],
                          n_embd=model_args["n_embd"], n_layer=model_args["n_layer"], n_head=model_args["n_head"])
    except KeyError as exc:
        raise CheckpointError(f"{path}: nanoGPT model_args has no {exc.args[0]}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{path}: nanoGPT model_args: {str(exc).removeprefix('config: ')}") from None


def _is_linear_layout(tensors: dict, model_args) -> bool:
    """nanoGPT's nn.Linear [out, in] rather than Conv1D [in, out].

    A nanoGPT checkpoint says so with model_args; a bare state dict shows it in c_attn, which
    is [3C, C] as nn.Linear and [C, 3C] as Conv1D (C being wte's width).
    """
    if model_args is not None:
        return True
    C = tensors["wte.weight"].shape[1]
    c_attn = tensors.get("h.0.attn.c_attn.weight")
    return c_attn is not None and tuple(c_attn.shape) == (3 * C, C)


def load_torch_checkpoint(path: str | os.PathLike, config: GPT2Config | None = None,
                          n_head: int | None = None) -> Checkpoint:
    """Load a PyTorch GPT-2 state dict (Hugging Face or nanoGPT) as a validated Checkpoint.

    The config comes from nanoGPT's model_args, else `config` (a config.json beside the file),
    else the shapes and `n_head`. Arrays share the memory torch loaded them into.
    """
    path = os.fspath(path)
    state, model_args = _state_dict(_torch_load(path), path)
    if model_args is not None:
        config = _config_from_model_args(model_args, path)
    tensors = official_names(state, path)
    arrays, file_dtypes = {}, {}
    for name, tensor in tensors.items():
        arrays[name], file_dtypes[name] = _to_numpy(tensor, path, name)
    if "h.0.attn.c_attn.bias" not in arrays and "h.0.attn.c_attn.weight" in arrays:
        raise CheckpointError(f"{path}: has no biases (nanoGPT bias=False?); GPT-2 needs them")
    if _is_linear_layout(arrays, model_args):
        arrays = {name: a.T if _LINEAR_WEIGHTS.fullmatch(name) else a for name, a in arrays.items()}
    if config is None:
        config = infer_config(arrays, path, n_head)
    validate(config, arrays, file_dtypes, path)
    arrays.pop("lm_head.weight", None)
    return Checkpoint(config, arrays, file_dtypes, path)
