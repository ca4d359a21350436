"""numpy-gpt2: GPT-2 in plain NumPy, exact against Hugging Face transformers, forward and backward.

    import numpy_gpt2 as ng
    model = ng.GPT2.from_pretrained("gpt2")
    tok = ng.Tokenizer.from_pretrained("gpt2")
    ids = model.generate([tok.encode("Hello")], max_new_tokens=20)
    print(tok.decode(ids[0]))

Importing the package changes nothing outside it. On AMD Zen 4, `ng.choose_blas_kernels()` once
at the start switches NumPy's OpenBLAS to the kernels that are faster there, for the whole
process (the command line does this; see `threads.choose_blas_kernels`).

The names below are imported on first use (PEP 562), so `import numpy_gpt2` loads neither NumPy
nor Numba: the command line's entry point can then catch a Ctrl-C pressed while they load.
"""

import importlib

__version__ = "0.1.0"

# Each public name and the module that defines it.
_EXPORTS = {
    "GPT2": "model", "KVCache": "model", "GPT2Config": "config", "Tokenizer": "tokenizer",
    "choose_blas_kernels": "threads",
    "GPT2Error": "errors", "ConfigError": "errors", "CheckpointError": "errors",
    "ModelNotFoundError": "errors", "TokenizerError": "errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'numpy_gpt2' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
