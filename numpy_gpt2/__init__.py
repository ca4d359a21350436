"""numpy-gpt2: GPT-2 in plain NumPy, exact against Hugging Face transformers, forward and backward.

    import numpy_gpt2 as ng
    model = ng.GPT2.from_pretrained("gpt2")
    tok = ng.Tokenizer.from_pretrained("gpt2")
    ids = model.generate([tok.encode("Hello")], max_new_tokens=20)
    print(tok.decode(ids[0]))

Importing the package changes nothing outside it. On AMD Zen 4, `ng.choose_blas_kernels()` once
at the start switches NumPy's OpenBLAS to the kernels that are faster there, for the whole
process (the command line does this; see `threads.choose_blas_kernels`).
"""

from .config import GPT2Config
from .errors import CheckpointError, ConfigError, GPT2Error, ModelNotFoundError, TokenizerError
from .model import GPT2, KVCache
from .threads import choose_blas_kernels
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT2", "GPT2Config", "KVCache", "Tokenizer", "choose_blas_kernels",
    "GPT2Error", "ConfigError", "CheckpointError", "ModelNotFoundError", "TokenizerError",
]
