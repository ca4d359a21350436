"""The exceptions numpy-gpt2 raises for bad input.

Every message names the thing that is wrong: the file, the tensor, the argument, and what was
expected against what was found. The command line (`cli`) turns these (and `OSError`) into one
line on stderr.
"""

import reprlib

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 60, 60, 40


def brief(value) -> str:
    """repr(value), cut short: a value read from a hostile file can be megabytes long or nested
    hundreds deep, and a message must stay one readable line."""
    return _BRIEF.repr(value)


class GPT2Error(ValueError):
    """Base class: bad input to numpy-gpt2 (a file, a config, an argument)."""


class ConfigError(GPT2Error):
    """A config.json / hparams.json that is malformed or asks for something unsupported."""


class CheckpointError(GPT2Error):
    """A weight file that is missing a tensor, has a wrong shape or dtype, or is corrupt."""


class ModelNotFoundError(GPT2Error):
    """A model name or path that resolves to no checkpoint on disk."""


class TokenizerError(GPT2Error):
    """Tokenizer files that are missing, corrupt or inconsistent."""
