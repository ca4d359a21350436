"""GPT2: the parameters, the forward pass and the KV cache, the loss and its gradients.

A little over 400 lines: the forward's plumbing (cache, workspace, the fast and the decoding
paths) and the training entry points stay with the parameters they use; the maths is in `ops`,
the fast loops in `kernels` and `gradients`, the checks of inputs in `inputs`.

Shapes: B batch, T new positions, S positions in the cache (past + new), C n_embd, H heads,
D head size, F MLP width, V vocab, L layers, P n_positions.

Parameters keep the checkpoint's names (`wte`, `wpe`, `h[i].ln_1`, `h[i].attn.c_attn`, ...),
so a tensor in the file can be followed to its use here.
"""

import dataclasses
import math
import os

import numpy as np

from . import gradients, inputs, kernels, ops
from .config import GPT2Config
from .errors import GPT2Error
from .kernels import narrow
from .memory import BLOCK_TENSORS, ReusableMemory, Workspace, blocks_in_one_array, in_own_memory
from .weights import Checkpoint, expected_shapes, load_checkpoint, release_pages
from .weights.resolve import resolve_model

DTYPES = ("float32", "float64")
WEIGHTS = narrow.WEIGHTS


@dataclasses.dataclass
class Linear:
    """GPT-2's 'Conv1D': weight [in, out], bias [out]; y = x @ weight + bias.

    The model keeps `weight` as the transposed view of an [out, in] array (see
    `memory.blocks_in_one_array`): the same matrix, laid out for the products. With narrow
    weights it is a `kernels.narrow.NarrowMatrix` of those [out, in] rows.
    """

    weight: np.ndarray
    bias: np.ndarray


@dataclasses.dataclass
class LayerNorm:
    """gamma = `weight` [C] and beta = `bias` [C] (the checkpoint's names): the per-channel scale
    and shift applied after normalising."""

    weight: np.ndarray
    bias: np.ndarray


@dataclasses.dataclass
class Attention:
    c_attn: Linear  # [C, 3C]: x -> q, k, v side by side
    c_proj: Linear  # [C, C]: concatenated heads -> residual stream


@dataclasses.dataclass
class MLP:
    c_fc: Linear    # [C, F]
    c_proj: Linear  # [F, C]


@dataclasses.dataclass
class Block:
    ln_1: LayerNorm
    attn: Attention
    ln_2: LayerNorm
    mlp: MLP


class _Converted:
    """The tensors of a checkpoint in `dtype`, each converted when it is asked for.

    A conversion (float64, or from bfloat16) is a copy; made one at a time, each one is freed
    as soon as the model has made its own layout from it, instead of all being held at once.
    float16 weights from a float16 file skip it (`stored_float16`).
    """

    def __init__(self, checkpoint: Checkpoint, dtype):
        self.checkpoint, self.dtype = checkpoint, dtype

    def __getitem__(self, name: str) -> np.ndarray:
        array = self.checkpoint.array(name, self.dtype)
        stored = self.checkpoint.tensors.get(name)
        if stored is not None and array is not stored:
            release_pages(stored)  # a converted copy: done with the file's pages
        return array

    def stored_int8(self, name: str) -> narrow.NarrowMatrix | None:
        """Matrix `name` as an int8 file stores it (copied out of the file, not requantized),
        or None when the file does not store it in int8."""
        if name not in self.checkpoint.quantized:
            return None
        q, scales = self.checkpoint.quantized[name]
        matrix = narrow.NarrowMatrix("int8", (np.array(q), np.array(scales)))
        release_pages(q)
        return matrix

    def stored_float16(self, name: str) -> np.ndarray | None:
        """Tensor `name` as a float16 file stores it (a view of the file, no float32 copy made),
        or None when the file does not store it in float16."""
        return self.checkpoint.tensors[name] if self.checkpoint.file_dtypes.get(name) == "F16" else None


def default_weights(checkpoint: Checkpoint) -> str:
    """The weights a checkpoint keeps by default: "int8" for a numpy-gpt2 int8 file, "bfloat16"
    or "float16" when every matrix is stored in that dtype (no rounding then), else "float32"."""
    if checkpoint.quantized:
        return "int8"
    matrices = [name for name, shape in expected_shapes(checkpoint.config).items() if len(shape) == 2]
    for weights, file_dtype in (("bfloat16", "BF16"), ("float16", "F16")):
        if all(checkpoint.file_dtypes[name] == file_dtype for name in matrices):
            return weights
    return "float32"


def _narrow(tensors, name: str, weights: str) -> narrow.NarrowMatrix:
    """Matrix `name` of `tensors` (a dict, or a checkpoint's `_Converted`) as a NarrowMatrix of
    `weights` over its [out, in] rows (wte: its own [V, C] rows)."""
    converted = isinstance(tensors, _Converted)
    if weights == "int8" and converted and (stored := tensors.stored_int8(name)) is not None:
        return stored
    array = tensors.stored_float16(name) if weights == "float16" and converted else None
    array = tensors[name] if array is None else array
    # A view of the file (float32, or float16 kept as float16): each band's pages are handed back
    # once it is converted (wte's bands are contiguous in the file; the blocks' matrices,
    # transposed, go whole after).
    label = f"{tensors.checkpoint.path}: tensor {name}" if converted else f"tensor {name}"  # for its errors
    matrix = narrow.narrow_matrix(array if name == "wte.weight" else array.T, weights, done=release_pages, name=label)
    release_pages(array)
    return matrix


class KVCache:
    """Keys and values of every layer for positions already seen, allocated once.

    k, v: [L, B, H, capacity, D]; key_mask: [B, capacity], False where a position is padding;
    `length` positions are filled. A forward pass with the cache appends its T positions.
    """

    def __init__(self, config: GPT2Config, batch_size: int, capacity: int, dtype,
                 memory: ReusableMemory | None = None):
        """memory: take k and v, uninitialised, from this `ReusableMemory` instead of fresh zeros
        (for a forward pass that writes every position before it reads it)."""
        shape = (config.n_layer, batch_size, config.n_head, capacity, config.head_dim)
        allocate = np.zeros if memory is None else memory.empty
        self.k = allocate(shape, dtype=dtype)
        self.v = allocate(shape, dtype=dtype)
        self.key_mask = np.ones((batch_size, capacity), dtype=bool)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def first_rows(self, n: int) -> "KVCache":
        """A cache of this one's first n rows, sharing its memory (k, v, key_mask are views); a
        pass through it writes here, and leaves this cache's `length` for the caller to set."""
        view = object.__new__(KVCache)
        view.k, view.v, view.key_mask, view.length = self.k[:, :n], self.v[:, :n], self.key_mask[:n], self.length
        return view


@dataclasses.dataclass
class Trace:
    """What happens inside one forward pass, as `GPT2.trace` returns it.

    logits: [B, T, V]
    hidden_states: n_layer + 1 arrays [B, T, C]: the embeddings, then each block's output, the
        last one after the final layernorm (as Hugging Face's output_hidden_states)
    attentions: n_layer arrays [B, H, T, T]: each layer's attention weights (each row sums to
        1 over the positions that query may see)
    """

    logits: np.ndarray
    hidden_states: list
    attentions: list


class GPT2:
    """A GPT-2 language model in NumPy.

    Build it with `GPT2.from_pretrained(name_or_path)`; call it on token ids to get logits.
    `dtype` is "float32" (the default, what the checkpoints hold) or "float64" (reference
    precision: every activation and weight in double). `weights` is how the matrices (the
    blocks' and the tied head) are kept: "float32", or narrow, "bfloat16", "float16" or "int8"
    (see `kernels.narrow`), with float32 arithmetic.
    """

    def __init__(self, config: GPT2Config, tensors, dtype="float32", path: str | None = None, weights="float32"):
        """`tensors` maps official names (see `weights`) to arrays already in `dtype`.

        wpe and ln_f are used as given (memory-mapped when loaded from a float32 file); wte is
        copied into the process's own memory (`memory.in_own_memory`) and the blocks' tensors
        into one array, the matrices in their own layout (`memory.blocks_in_one_array`). Narrow
        `weights`: the matrices and wte become `kernels.narrow.NarrowMatrix`es, one at a time.
        """
        if weights not in WEIGHTS:
            raise GPT2Error(f"weights must be one of {', '.join(WEIGHTS)}, found {weights!r}")
        if weights != "float32" and np.dtype(dtype) != np.float32:
            raise GPT2Error(f"weights={weights!r} computes in float32; dtype={str(dtype)!r} needs weights='float32'")
        self.config = config
        self.dtype = np.dtype(dtype)
        self.path = path
        self.weights = weights
        # A prompt's products: `kernels`' with float weights, their twins for narrow ones.
        self._products = kernels if weights == "float32" else narrow
        t = tensors

        if weights == "float32":
            self.wte = in_own_memory(t["wte.weight"])  # [V, C], also the output head (tied)
            b = blocks_in_one_array(config, t, self.dtype)
        else:
            self.wte = _narrow(t, "wte.weight", weights)
            shapes = expected_shapes(config)
            b = {name: _narrow(t, name, weights) if len(shapes[name]) == 2 else np.array(t[name])
                 for name in (f"h.{i}.{part}" for i in range(config.n_layer) for part in BLOCK_TENSORS)}
        self.wpe = t["wpe.weight"]  # [P, C]

        def linear(name: str) -> Linear:
            return Linear(b[name + ".weight"], b[name + ".bias"])

        self.h = [
            Block(
                ln_1=LayerNorm(b[f"h.{i}.ln_1.weight"], b[f"h.{i}.ln_1.bias"]),
                attn=Attention(c_attn=linear(f"h.{i}.attn.c_attn"), c_proj=linear(f"h.{i}.attn.c_proj")),
                ln_2=LayerNorm(b[f"h.{i}.ln_2.weight"], b[f"h.{i}.ln_2.bias"]),
                mlp=MLP(c_fc=linear(f"h.{i}.mlp.c_fc"), c_proj=linear(f"h.{i}.mlp.c_proj")),
            )
            for i in range(config.n_layer)
        ]
        self.ln_f = LayerNorm(t["ln_f.weight"], t["ln_f.bias"])
        self.attn_scales = ops.attention_scales(config)  # the factor on q.k in each layer
        # The memory the forward passes reuse: the logits, the keys and values of passes without
        # a cache, a prompt's intermediates (see `memory.Workspace`).
        # Sized as for float32 weights: narrow ones are widened there for a prompt.
        self.workspace = Workspace(self.dtype.itemsize * (self.config.vocab_size * self.config.n_embd + sum(
            math.prod(lin.weight.shape) for b in self.h for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))))
        self._training_buffers = None  # `loss_and_grads`' activations, for the last batch shape

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype="float32", n_head: int | None = None,
                        weights: str | None = None):
        """Load a checkpoint: a directory, a .safetensors file, or a name such as "gpt2".

        Names are looked up in ./weights/NAME/ and the Hugging Face cache (see
        `weights.resolve`). From a float32 file wpe and ln_f are memory-mapped, not copied; wte
        and the blocks' tensors are copied once, the latter into one array with the matrices in
        their own layout (see `memory.in_own_memory`, `memory.blocks_in_one_array`), and the file
        pages they came from handed back. `n_head` is needed only for a bare .safetensors file of a size that
        matches no preset. `weights`: how the matrices are kept, "float32", "bfloat16",
        "float16" or "int8" (see `kernels.narrow`); None keeps a bfloat16, float16 or int8
        file's own precision and anything else in float32 (float64 compute: float32 always).
        """
        return cls.from_checkpoint(load_checkpoint(resolve_model(name_or_path), n_head=n_head), dtype, weights)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype="float32", weights: str | None = None):
        """Build from a validated `weights.Checkpoint`, converting to `dtype` and `weights` (see
        `from_pretrained`) only when needed."""
        if str(dtype) not in DTYPES:
            raise GPT2Error(f"dtype must be one of {', '.join(DTYPES)}, found {dtype!r}")
        if weights is None:
            weights = default_weights(checkpoint) if str(dtype) == "float32" else "float32"
        return cls(checkpoint.config, _Converted(checkpoint, dtype), dtype, checkpoint.path, weights)

    def num_parameters(self) -> int:
        """The number of parameters (the tied head counted once)."""
        arrays = [self.wte, self.wpe, self.ln_f.weight, self.ln_f.bias]
        for block in self.h:
            arrays += [block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias]
            for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                arrays += [lin.weight, lin.bias]
        return sum(a.size for a in arrays)

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows and up to `capacity` (default P) positions."""
        capacity = self.config.n_positions if capacity is None else capacity
        if not 1 <= capacity <= self.config.n_positions:
            raise GPT2Error(f"cache capacity must be in 1..{self.config.n_positions}, found {capacity}")
        return KVCache(self.config, batch_size, capacity, self.dtype)

    # ---- the forward pass ---------------------------------------------------------------

    def __call__(self, input_ids, **kwargs):
        """Same as `forward`."""
        return self.forward(input_ids, **kwargs)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                logits_to_keep: int = 0, head: bool = True):
        """Token ids -> next-token logits.

        input_ids: (T,) or (B, T) integers in [0, V)
        attention_mask: (B, S) of 0/1 over the cached and new positions (S = cache.length + T),
            0 for padding; None means no padding
        position_ids: (B, T); by default counted from the mask (padding does not advance it)
        cache: a `KVCache` to read past positions from and append these T to; None runs
            without one
        logits_to_keep: return logits for the last this-many positions only; 0 keeps all
        head: False returns the final hidden states (after ln_f) instead of the logits, for a
            caller that applies the head (`head`) to some of them itself (`score`, in chunks of rows)
        -> logits (B, T or logits_to_keep, V), or hidden states (B, T or logits_to_keep, C), in
        the model's dtype
        """
        ids = self.check_ids(input_ids)
        B, T = ids.shape
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise GPT2Error(f"logits_to_keep must be an integer >= 0 (0 keeps all), found {logits_to_keep!r}")
        if cache is None:
            if T > self.config.n_positions:
                raise GPT2Error(f"input_ids has {T} positions, more than n_positions={self.config.n_positions}")
            # Keys and values for this pass only, every position written before it is read; in
            # memory kept from the last such pass, which costs no page faults.
            cache = KVCache(self.config, B, T, self.dtype, memory=self.workspace.keys_values)
        elif cache.batch_size != B:
            raise GPT2Error(f"cache holds batch size {cache.batch_size}, input_ids has {B}")
        start = cache.length
        if start + T > cache.capacity:
            raise GPT2Error(
                f"input of {T} positions after {start} cached ones exceeds the cache capacity "
                f"{cache.capacity} (n_positions={self.config.n_positions})"
            )
        if attention_mask is None:
            cache.key_mask[:, start:start + T] = True
        else:
            cache.key_mask[:, :start + T] = inputs.check_mask(attention_mask, B, start + T)
        positions = (ops.position_ids_from_mask(cache.key_mask[:, :start + T])[:, start:] if position_ids is None
                     else inputs.check_positions(position_ids, B, T, self.config.n_positions))
        return self._forward(ids, positions, cache, logits_to_keep, head)

    def decode_step(self, tokens, positions, cache: KVCache):
        """One new token per row after what `cache` holds, as a decoding loop (`generate`) calls
        it: tokens [B] ids in [0, V), positions [B] their position ids -> logits [B, V] in the
        model's dtype; the cache grows by one position, not padding.

        `forward` without its checks of the arguments and its counting of positions from the
        mask: the caller made the tokens (a sampler's) and counts the positions itself, and a
        step, which reads every weight, leaves the CPU's caches cold for that Python work.
        """
        cache.key_mask[:, cache.length] = True
        return self._forward(tokens[:, None], positions[:, None], cache, 0)[:, -1]

    def _forward(self, ids, positions, cache: KVCache, logits_to_keep: int, head: bool = True):
        """The pass itself, arguments checked: ids, positions [B, T]; cache with room for T more,
        its key_mask set for them -> logits, or the hidden states when not head (see `forward`). `ops.gpt2`, each block `ops.block`,
        through the kernels; a prompt's intermediates come from `self.workspace`."""
        B, T = ids.shape
        start = cache.length
        x = self._embed(ids, positions)                                             # [B, T, C]
        if B * T <= kernels.FEW_ROWS:
            # A decoding step or a short prompt: each block in one Numba call, the same maths
            # (`ops.block`).
            for layer, block in enumerate(self.h):
                kernels.decode_block(x, block, cache.k[layer], cache.v[layer], cache.key_mask,
                                     start, self.attn_scales[layer], self.config.layer_norm_epsilon)
        else:
            for layer, block in enumerate(self.h):
                # The last block is needed only at the positions whose logits are kept (its keys
                # and values still go into the cache for all T).
                keep = min(logits_to_keep or T, T) if layer == len(self.h) - 1 else T
                h = self._layer_norm(x, block.ln_1)                                 # ln_1(x)
                x = x[:, T - keep:]                                                 # [B, keep, C]
                self._self_attention(layer, block.attn, h, cache, keep, residual=x)  # x = x + self_attention(h)
                h = self._layer_norm(x, block.ln_2)                                 # ln_2(x)
                self._mlp(block.mlp, h, residual=x)                                 # x = x + mlp(h)
        x = self._layer_norm(x, self.ln_f)                                          # ln_f(x)
        cache.length = start + T
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self._head(x) if head else x                                         # [B, T, V]

    def _head(self, x):
        """x: [B, T, C] -> logits [B, T, V] = x @ wte.T: the output head is the embedding, tied."""
        B, T, _ = x.shape
        return self.head(x, self.workspace.logits.empty((B, T, self.config.vocab_size), self.dtype))

    def head(self, x, out):
        """x: [..., C] final hidden states (after ln_f) -> out: [..., V] = x @ wte.T, the logits
        (the tied head, by the products for how wte is kept); for a caller that applies the head
        to rows of its own choosing (`forward(head=False)`, `score`)."""
        if self.weights == "float32":
            return kernels.matmul_transposed(x, self.wte, out)
        return narrow.matmul_transposed(x, self.wte, out, self.workspace)

    def _embed(self, ids, positions):
        """ids, positions: [B, T] -> x: [B, T, C] = wte[ids] + wpe[positions] (`ops.embedding`)."""
        x = self.workspace.empty(ids.shape + (self.config.n_embd,), self.dtype)
        position_rows = self.workspace.empty(x.shape, self.dtype)
        # mode="clip" (the ids and positions are checked already): with "raise" NumPy gathers
        # into a buffer of its own first.
        if isinstance(self.wte, narrow.NarrowMatrix):
            self.wte.take(ids, x)  # the rows taken, widened
        else:
            np.take(self.wte, ids, axis=0, out=x, mode="clip")
        np.take(self.wpe, positions, axis=0, out=position_rows, mode="clip")
        x += position_rows
        return x

    def _layer_norm(self, x, ln: LayerNorm):
        """x: [B, T, C] -> `ops.layer_norm(x, gamma, beta, eps)` with ln's parameters."""
        return kernels.layer_norm(x, ln.weight, ln.bias, self.config.layer_norm_epsilon, self.workspace)

    def _self_attention(self, layer: int, attn: Attention, x, cache: KVCache, keep: int, residual):
        """residual: [B, keep, C] += causal self-attention of x: [B, T, C] at its last `keep`
        positions (`ops.self_attention`), the keys/values of all T appended to cache."""
        B, T, C = x.shape
        H, D = self.config.n_head, self.config.head_dim
        qkv = self._products.linear(x, attn.c_attn.weight, attn.c_attn.bias, self.workspace).reshape(B, T, 3, H, D)
        end = cache.length + T
        # The T new keys and values go into the cache (k, v: [B, H, S, D]) as the attention starts.
        heads = kernels.causal_attention(qkv[:, T - keep:, 0], cache.k[layer], cache.v[layer], cache.key_mask,
                                         end - keep, self.attn_scales[layer], self.workspace,
                                         new_k=qkv[:, :, 1], new_v=qkv[:, :, 2])     # [B, keep, C]
        # x = x + self_attention(ln_1(x))  (ops.block), the sum made by the BLAS
        self._products.linear(heads, attn.c_proj.weight, attn.c_proj.bias, self.workspace, add_to=residual)

    def _mlp(self, mlp: MLP, x, residual):
        """residual: [B, T, C] += the MLP of x: [B, T, C] (`ops.mlp`): widen to F, tanh-GELU,
        project back."""
        h = self._products.linear_gelu(x, mlp.c_fc.weight, mlp.c_fc.bias, self.workspace)  # [B, T, F]
        # x = x + mlp(ln_2(x))  (ops.block), the sum made by the BLAS
        self._products.linear(h, mlp.c_proj.weight, mlp.c_proj.bias, self.workspace, add_to=residual)

    def trace(self, input_ids, attention_mask=None) -> Trace:
        """The forward pass of the reference GPT-2 (`ops.gpt2`), keeping every layer's output.

        input_ids: (T,) or (B, T); attention_mask: (B, T) of 0/1, 0 for padding.
        The same maths as `forward`, in plain NumPy with no cache: for reading and for looking
        inside, not for speed.
        """
        ids, key_mask = inputs.check_batch(input_ids, attention_mask, self.config)
        out = ops.gpt2(self.params(), ids, self.config, key_mask)
        return Trace(out["logits"], out["hidden_states"], out["attentions"])

    # ---- training ------------------------------------------------------------------------

    def params(self) -> dict:
        """The parameters nested as `ops.gpt2` takes them (`ops.params_from_tensors`), the arrays
        the model computes with; narrow weights as float32 copies of the values they hold."""
        if self.weights == "float32":
            return ops.params_from_tensors(self.parameters(), self.config.n_layer)
        named = self._named()
        for name, array in named.items():
            if isinstance(array, narrow.NarrowMatrix):
                named[name] = array.widen() if name == "wte.weight" else array.widen().T
        return ops.params_from_tensors(named, self.config.n_layer)

    def parameters(self) -> dict:
        """Official name (`wte.weight`, `h.0.attn.c_attn.weight` [in, out], ...) -> the array the
        model computes with, of the file's shape. Writing into one changes the model; arrays still
        mapped read-only from the checkpoint file are copied into memory first, once.
        Needs float32 weights (training, say): narrow ones are a GPT2Error."""
        if self.weights != "float32":
            raise GPT2Error(f"this model keeps weights={self.weights!r}; parameters and their gradients need "
                            "float32 weights: load it with weights='float32'")
        for owner, name in ((self, "wpe"), (self.ln_f, "weight"), (self.ln_f, "bias")):
            if not getattr(owner, name).flags.writeable:
                setattr(owner, name, np.array(getattr(owner, name)))
        return self._named()

    def _named(self) -> dict:
        """Official name -> what the model holds for it (see `parameters`)."""
        named = {"wte.weight": self.wte, "wpe.weight": self.wpe,
                 "ln_f.weight": self.ln_f.weight, "ln_f.bias": self.ln_f.bias}
        for i, block in enumerate(self.h):
            for part, module in (("ln_1", block.ln_1), ("ln_2", block.ln_2), ("attn.c_attn", block.attn.c_attn),
                                 ("attn.c_proj", block.attn.c_proj), ("mlp.c_fc", block.mlp.c_fc),
                                 ("mlp.c_proj", block.mlp.c_proj)):
                named[f"h.{i}.{part}.weight"], named[f"h.{i}.{part}.bias"] = module.weight, module.bias
        return named

    def loss(self, input_ids, labels=None, attention_mask=None) -> float:
        """Mean cross-entropy of each next token, with transformers' conventions.

        input_ids: (T,) or (B, T); labels: the same shape, or None for the inputs themselves
        (positions the attention_mask marks as padding then count in no loss); shifted inside,
        so labels[:, t + 1] is what position t predicts; -100 counts in no loss, and neither
        does what a padding position would predict (it sees no key).
        attention_mask: (B, T) of 0/1, 0 for padding.
        -> the mean over the counted positions (nan if none counts), in the model's dtype
        """
        ids, key_mask, targets = inputs.training_batch(input_ids, labels, attention_mask, self.config)
        logits = self.forward(ids, attention_mask=key_mask)
        return float(ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.ravel()))

    def loss_and_grads(self, input_ids, labels=None, attention_mask=None, grads=None) -> tuple:
        """`loss` and its gradient with respect to every parameter, by hand (no autograd).

        grads: None for new arrays, or the dict a previous call returned, to be overwritten
            (a training loop reuses its memory instead of allocating the model's size each step)
        -> (loss, grads): grads maps each name of `parameters()` to an array of its shape, in
        the model's dtype; the head is tied, so `wte.weight` holds the head's gradient added to
        the embedding's, as torch's autograd gives it.

        The fast twin of `ops.gpt2` + `ops.cross_entropy` + `ops.gpt2_backward` (`gradients`).
        """
        ids, key_mask, targets = inputs.training_batch(input_ids, labels, attention_mask, self.config)
        if self._training_buffers is None or self._training_buffers.shape != ids.shape:
            self._training_buffers = None  # the old batch shape's memory goes before the new is made
            self._training_buffers = gradients.TrainingBuffers(self.config, *ids.shape, self.dtype)
        parameters = self.parameters()
        if grads is None:
            grads = gradients.new_grads(parameters)
        else:
            for name, p in parameters.items():
                if name not in grads or grads[name].shape != p.shape or grads[name].dtype != p.dtype:
                    found = "missing" if name not in grads else f"{grads[name].dtype} {grads[name].shape}"
                    raise GPT2Error(f"grads[{name!r}] must be a {p.dtype} array of shape {p.shape}, found {found}; "
                                    "pass the dict a previous loss_and_grads returned, or None")
        return gradients.loss_and_grads(self, ids, key_mask, targets, grads, self._training_buffers), grads

    # ---- generation ----------------------------------------------------------------------

    def generate(self, input_ids, max_new_tokens: int = 50, **kwargs) -> np.ndarray:
        """Generate after each prompt -> (B, T + new) int64; see `numpy_gpt2.generate.generate`.

        Keywords: do_sample, temperature, top_k, top_p, seed, eos_token_id, attention_mask,
        stop_strings, tokenizer, pad_token_id, as in Hugging Face's `generate`.
        """
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids, max_new_tokens: int = 50, **kwargs):
        """Yield each step's new tokens, [B] int64, as `generate` produces them."""
        from .generate import stream

        return stream(self, input_ids, max_new_tokens, **kwargs)

    # ---- input checks and plumbing -----------------------------------------------------

    def check_ids(self, input_ids) -> np.ndarray:
        """input_ids: (T,) or (B, T) integers -> ids [B, T], or GPT2Error naming what is wrong
        (see `inputs.check_ids`)."""
        return inputs.check_ids(input_ids, self.config.vocab_size)
