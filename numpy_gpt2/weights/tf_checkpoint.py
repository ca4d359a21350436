"""Read OpenAI's original TensorFlow GPT-2 checkpoint without TensorFlow, under Hugging Face's names.

A checkpoint directory, as the `openai/gpt-2` download script leaves it:

    checkpoint                       text proto: model_checkpoint_path: "model.ckpt"
    hparams.json                     n_vocab, n_ctx, n_embd, n_head, n_layer
    model.ckpt.index                 the tensor-bundle index (see `tf_bundle`)
    model.ckpt.data-00000-of-00001   the raw tensor bytes, back to back

OpenAI's variables are `model/wte`, `model/wpe`, `model/h{i}/{ln_1,attn/c_attn,...}/{g,b,w}`
and `model/ln_f/{g,b}`; `load_tf_checkpoint` renames them to Hugging Face's and `load_tf`
returns them validated as a Checkpoint.
"""

import os
import re

import numpy as np

from ..config import GPT2Config
from ..errors import CheckpointError, ModelNotFoundError
from .checkpoint import Checkpoint, validate
from .tf_bundle import TensorBundle

DEFAULT_PREFIX = "model.ckpt"
HPARAMS = "hparams.json"

_MISSING_HINT = (
    "a TensorFlow GPT-2 checkpoint directory holds hparams.json, <prefix>.index and "
    "<prefix>.data-00000-of-00001 (prefix from the `checkpoint` file, default model.ckpt)"
)

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
    # A LayerNorm has g and b (gamma and beta, Hugging Face's weight and bias); a Conv1D has w and b.
    if param not in ("gb" if module.startswith("ln_") else "wb"):
        return None
    return f"h.{layer}.{module.replace('/', '.')}.{_PARAM_SUFFIX[param]}"


def _checkpoint_prefix(directory: str) -> str:
    """The bundle prefix named by the `checkpoint` file, else `<directory>/model.ckpt`."""
    state = os.path.join(directory, "checkpoint")
    if not os.path.isfile(state):  # absent, or a named pipe whose reading would wait forever
        return os.path.join(directory, DEFAULT_PREFIX)
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


def load_tf(directory: str | os.PathLike, verify: bool = False) -> Checkpoint:
    """The checkpoint directory as a Checkpoint validated against its hparams.json.

    `verify=True` checks every tensor's crc32c against the index (reading all its bytes).
    """
    directory = os.fspath(directory)
    config, tensors, file_dtypes = _read_gpt2(directory, verify)
    validate(config, tensors, file_dtypes, directory)
    return Checkpoint(config, tensors, file_dtypes, directory)


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
    variable is an error. Presence and shapes against the config are `load_tf`'s check.
    `verify=True` checks every tensor's crc32c.
    """
    config, tensors, _ = _read_gpt2(os.fspath(directory), verify)
    return config, tensors


def _read_gpt2(directory: str, verify: bool) -> tuple[GPT2Config, dict, dict]:
    """(config, Hugging Face name -> array, Hugging Face name -> file dtype) of the directory."""
    if not os.path.isdir(directory):
        raise ModelNotFoundError(f"{directory}: no such directory; {_MISSING_HINT}")
    hparams = os.path.join(directory, HPARAMS)
    prefix = _checkpoint_prefix(directory)
    for required in (hparams, prefix + ".index"):
        if not os.path.isfile(required):
            raise CheckpointError(f"{required}: file not found; {_MISSING_HINT}")
    config = GPT2Config.from_json(hparams)

    bundle = TensorBundle(prefix)
    renames = {}
    for tf_name in bundle.entries:
        if not tf_name.startswith("model/"):
            continue
        hf_name = _hf_name(tf_name)
        if hf_name is not None:
            renames[tf_name] = hf_name
        elif _hf_name(tf_name.rpartition("/")[0]) is None:  # not an optimizer slot such as w/Adam
            raise CheckpointError(f"{bundle.index_path}: unknown GPT-2 variable {tf_name}")

    tensors = bundle.read(renames, verify)
    params, file_dtypes = {}, {}
    for tf_name, hf_name in renames.items():
        array = tensors[tf_name]
        if tf_name.endswith("/w"):
            if array.ndim != 3 or array.shape[0] != 1:
                raise CheckpointError(
                    f"{bundle.index_path}: tensor {tf_name} has shape {array.shape}, expected [1, in, out]"
                )
            array = array[0]
        params[hf_name] = array
        file_dtypes[hf_name] = bundle.file_dtype(tf_name)
    return config, params, file_dtypes
