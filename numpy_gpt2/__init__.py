"""numpy-gpt2: GPT-2 inference in plain NumPy, exact against Hugging Face transformers.

    import numpy_gpt2 as ng
    model = ng.GPT2.from_pretrained("gpt2")
    tok = ng.Tokenizer.from_pretrained("gpt2")
    ids = model.generate([tok.encode("Hello")], max_new_tokens=20)
    print(tok.decode(ids[0]))
"""

from .config import GPT2Config
from .errors import CheckpointError, ConfigError, GPT2Error, ModelNotFoundError, TokenizerError
from .model import GPT2, KVCache
from .threads import choose_blas_kernels
from .tokenizer import Tokenizer

choose_blas_kernels()  # the BLAS kernels that fit this CPU (Haswell's on AMD Zen 4); see there

__version__ = "0.1.0"

__all__ = [
    "GPT2", "GPT2Config", "KVCache", "Tokenizer",
    "GPT2Error", "ConfigError", "CheckpointError", "ModelNotFoundError", "TokenizerError",
]
