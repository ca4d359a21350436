"""GPT2Config: the hyperparameters of a GPT-2 model, read from and written to config.json."""

import dataclasses
import json
import math
import os

from .errors import ConfigError, brief
from .fileio import atomic_write_bytes

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters; the defaults are those of GPT-2 124M (`gpt2`).

    Names follow Hugging Face's `GPT2Config`, so a `config.json` maps onto it field by field.
    `n_inner=None` means an MLP width of 4 * n_embd.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not _is_size(value):
                raise ConfigError(f"config: {name} must be a positive integer below 2**63, found {brief(value)}")
        if self.n_inner is not None and not _is_size(self.n_inner):
            raise ConfigError(
                f"config: n_inner must be a positive integer below 2**63 or null, found {brief(self.n_inner)}"
            )
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"config: activation_function {brief(self.activation_function)} is not supported; "
                f"GPT-2 uses the tanh GELU, one of {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        eps = self.layer_norm_epsilon
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < math.inf):
            raise ConfigError(f"config: layer_norm_epsilon must be a positive finite number, found {brief(eps)}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config: {name} must be true or false, found {brief(getattr(self, name))}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_int(value, minimum=0):
                raise ConfigError(f"config: {name} must be a token id (an integer >= 0) or null, found {brief(value)}")

    @property
    def head_dim(self) -> int:
        """D, the width of one attention head: n_embd // n_head."""
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        """The MLP hidden width: n_inner, or 4 * n_embd when n_inner is None."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str) -> "GPT2Config":
        """The config of a published model: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2."""
        key = name.removeprefix("openai-community/").removeprefix("distilbert/")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[key])

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "GPT2Config":
        """Build from a Hugging Face config.json dict; unknown keys (dropout rates...) are ignored.

        `n_ctx` is accepted for `n_positions`, as in older files and OpenAI's hparams.json.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"{source}: model_type is {brief(model_type)}, expected 'gpt2'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        if "n_positions" not in kwargs and "n_ctx" in data:
            kwargs["n_positions"] = data["n_ctx"]
        for hf_name, name in (("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"),
                              ("num_attention_heads", "n_head")):
            if name not in kwargs and hf_name in data:
                kwargs[name] = data[hf_name]
        for optional_id in ("bos_token_id", "eos_token_id"):
            if kwargs.get(optional_id, 0) is None:
                del kwargs[optional_id]
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {str(exc).removeprefix('config: ')}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GPT2Config":
        """Read a Hugging Face `config.json` (or OpenAI `hparams.json`) file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested or a number too long to read
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "n_vocab" in data and "vocab_size" not in data:
            data = {**data, "vocab_size": data["n_vocab"]}
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict:
        """The config as Hugging Face writes it, so `transformers` can load it."""
        out = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            **dataclasses.asdict(self),
            "n_ctx": self.n_positions,
        }
        return out

    def save_json(self, path: str | os.PathLike) -> None:
        """Write config.json atomically."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(path, text.encode("utf-8"))


def _is_int(value, minimum: int) -> bool:
    """True for an int (not a bool, which JSON's true would give) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_size(value) -> bool:
    """True for a positive int that can size a NumPy array (below 2**63, its index type's limit)."""
    return _is_int(value, minimum=1) and value < 1 << 63


PRESETS = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
    "distilgpt2": dict(n_embd=768, n_layer=6, n_head=12),
}
