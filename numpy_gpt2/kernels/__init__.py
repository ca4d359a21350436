"""The fast twins of `ops`: Numba loops and BLAS calls with the reference's signatures and, within
rounding, its results.

Each public function names the `ops` function it is the twin of and the tolerance its test
(tests/test_kernels.py, tests/test_model.py) holds it to; the optional `workspace` of a twin is
where its result comes from (see `memory.Workspace`). By concern:

- `elementwise`: layernorm and the bias plus tanh-GELU loops;
- `products`: `linear`, `linear_gelu`, the tied head `matmul_transposed`: a few rows streamed
  through a Numba loop, many rows cut into bands, one ?gemm call each from Numba's threads;
- `logprobs`: the log-softmax of each row read at its target (and top k), for scoring text;
- `attention`: causal, masked attention over the cache, a prompt's in blocks of queries;
- `decode`: a decoding step, the few-rows product, attention of one query, a whole block in one
  call (`decode_block`), the product by how a matrix is stored (`rows_matmul`);
- `narrow`: bfloat16, float16 and int8 matrices (`NarrowMatrix`), their widening, and
  `linear`, `linear_gelu`, `matmul_transposed` for them;
- `stored`: how the decoding product reads one weight from each way a matrix is stored;
- `blas`: the BLAS's ?gemm called by address, and which NumPy builds have it;
- `float32math`: float32 tanh, exp and maximum written so that the loops vectorise;
- `common`: the Numba options and the row counts (FEW_ROWS, THIN_ROWS) that choose a path.
"""

from .attention import causal_attention
from .common import FEW_ROWS, THIN_ROWS, transposed_contiguous
from .decode import decode_block, few_rows_matmul
from .elementwise import layer_norm
from .logprobs import token_logprobs
from .products import linear, linear_gelu, matmul_transposed, product, recorded_products

__all__ = [
    "FEW_ROWS", "THIN_ROWS", "causal_attention", "decode_block", "few_rows_matmul", "layer_norm", "linear",
    "linear_gelu", "matmul_transposed", "product", "recorded_products", "token_logprobs", "transposed_contiguous",
]
