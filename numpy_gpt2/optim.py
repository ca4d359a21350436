"""AdamW, clipping by global norm, and the learning-rate schedule, as torch and nanoGPT have them.

Parameters and gradients are dicts of official names (`wte.weight`, `h.0.attn.c_attn.weight`,
...) -> arrays, as `GPT2.parameters()` and `GPT2.loss_and_grads` give them. Every update is
in place, element-wise, in the parameters' dtype: one Numba loop reading and writing each value
once (`_update`).
"""

import math

import numba
import numpy as np

from .errors import GPT2Error
from .threads import run_in_parts
from .weights.safetensors_file import SafetensorsFile, write_arrays

# Elements per piece of a parameter updated at once (whole rows, at least one): the unit of
# work the threads share, and of the copy of a gradient laid out unlike its parameter.
_PIECE = 1 << 16


def get_lr(step: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """The learning rate for 0-based `step`: linear warmup, then cosine decay (nanoGPT's get_lr).

        step < warmup:                 lr * (step + 1) / (warmup + 1)
        warmup <= step < decay_steps:  min_lr + (lr - min_lr) * (1 + cos(pi * r)) / 2,
                                       r = (step - warmup) / (decay_steps - warmup)
        step >= decay_steps:           min_lr
    """
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def decays(array: np.ndarray) -> bool:
    """Whether weight decay applies: to matrices and embeddings (2-D), not to biases and
    layernorm parameters (1-D), as nanoGPT's `configure_optimizers` groups them."""
    return array.ndim >= 2


def clip_grad_norm(grads: dict, max_norm: float | None) -> float:
    """Scale every gradient in place so that their global L2 norm is at most `max_norm`;
    -> the norm before clipping (torch.nn.utils.clip_grad_norm_).

        norm = sqrt(sum over tensors of sum(g ** 2))
        coef = max_norm / (norm + 1e-6);  g *= coef  when coef < 1
    `max_norm` None or 0 only measures the norm.
    """
    norm = math.sqrt(sum(_sum_of_squares(g) for g in grads.values()))
    if max_norm:
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for g in grads.values():
                g *= g.dtype.type(coef)
    return norm


def _sum_of_squares(a: np.ndarray) -> float:
    flat = _in_memory_order(a).reshape(-1)
    return float(np.dot(flat, flat))


def _in_memory_order(a: np.ndarray) -> np.ndarray:
    """`a`, or `a.T` when that is C-contiguous and `a` is not: the array as its memory runs."""
    return a.T if a.ndim > 1 and not a.flags.c_contiguous and a.flags.f_contiguous else a


class AdamW:
    """torch.optim.AdamW (not amsgrad, not foreach), with weight decay on 2-D parameters only.

    For each parameter p with gradient g, at step t = 1, 2, ... (torch's order of operations):

        p  = p * (1 - lr * weight_decay)              (2-D parameters only; see `decays`)
        m  = m + (1 - beta1) * (g - m)                (torch: exp_avg.lerp_(g, 1 - beta1))
        v  = beta2 * v + (1 - beta2) * g * g
        p  = p - lr / (1 - beta1 ** t) * m / (sqrt(v) / sqrt(1 - beta2 ** t) + eps)

    m and v start at zero, in each parameter's shape, dtype and memory layout (the model keeps
    its matrices transposed in memory, see `GPT2.parameters`). The update runs over pieces of
    `_PIECE` elements in the parameters' memory order, shared among the threads
    (`threads.run_in_parts`); a gradient laid out otherwise is copied piece by piece first.
    The defaults are torch's; nanoGPT trains GPT-2 with betas (0.9, 0.95) and weight_decay 0.1.
    """

    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        """params: name -> the array to update in place (writable; any memory layout)."""
        for name, p in params.items():
            if not p.flags.writeable:
                raise GPT2Error(f"parameter {name} is read-only; AdamW updates parameters in place")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise GPT2Error(f"parameters of several dtypes ({', '.join(sorted(map(str, dtypes)))}); AdamW needs one")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.exp_avg = {name: np.zeros_like(p) for name, p in params.items()}
        self.exp_avg_sq = {name: np.zeros_like(p) for name, p in params.items()}
        self.step_count = 0
        self._dtype = dtypes.pop() if dtypes else np.dtype(np.float64)
        # The parameters whose memory order is the transpose's (F-contiguous); each piece is
        # (name, rows of the array in memory order, its views of p, m and v, decays).
        self._transposed = {name for name, p in params.items() if _in_memory_order(p) is not p}
        self._pieces = []
        for name, p in params.items():
            p, m, v = (_in_memory_order(a) for a in (p, self.exp_avg[name], self.exp_avg_sq[name]))
            step = max(1, _PIECE * p.shape[0] // p.size)
            for begin in range(0, p.shape[0], step):
                rows = slice(begin, begin + step)
                self._pieces.append((name, rows, p[rows], m[rows], v[rows], decays(p)))
        self._largest = max((piece[2].size for piece in self._pieces), default=0)

    def step(self, grads: dict, lr: float | None = None) -> None:
        """One update of every parameter from `grads` (name -> array of its shape); `lr`
        overrides the learning rate for this step (the schedule's value)."""
        for name, p in self.params.items():
            if name not in grads:
                raise GPT2Error(f"no gradient for parameter {name}")
            if grads[name].shape != p.shape:
                raise GPT2Error(f"gradient {name} has shape {grads[name].shape}, expected {p.shape}")
        grads = {name: grads[name].T if name in self._transposed else grads[name] for name in self.params}
        self.step_count += 1
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        t = self.step_count
        c = self._dtype.type
        keep = c(1 - lr * self.weight_decay)
        constants = (c(1 - beta1), c(beta2), c(1 - beta2), c(math.sqrt(1 - beta2 ** t)), c(self.eps),
                     c(-lr / (1 - beta1 ** t)))

        def work(start, stop):
            copies = np.empty(self._largest, c)
            for name, rows, p, m, v, decay in self._pieces[start:stop]:
                g = grads[name][rows]
                if not g.flags.c_contiguous or g.dtype != c:
                    g = copies[:g.size].reshape(g.shape)
                    np.copyto(g, grads[name][rows])
                _update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), keep if decay else c(1),
                        *constants)

        run_in_parts(len(self._pieces), work)

    def state_arrays(self) -> dict:
        """The state as name -> array: exp_avg.NAME and exp_avg_sq.NAME for each parameter."""
        arrays = {f"exp_avg.{name}": m for name, m in self.exp_avg.items()}
        arrays.update({f"exp_avg_sq.{name}": v for name, v in self.exp_avg_sq.items()})
        return arrays

    def save(self, path) -> None:
        """Write m, v and the step count to a .safetensors file, atomically."""
        write_arrays(path, self.state_arrays(), metadata={"step": str(self.step_count)})

    def load(self, path) -> None:
        """Read what `save` wrote into this optimizer's m, v and step count (shapes must match)."""
        file = SafetensorsFile(path)
        arrays = self.state_arrays()
        for key, array in arrays.items():
            if key not in file.tensors:
                raise GPT2Error(f"{path}: no tensor {key}; the optimizer state is of another model")
            if file.tensors[key].shape != array.shape or file.tensors[key].dtype != array.dtype:
                raise GPT2Error(f"{path}: tensor {key} is {file.tensors[key].dtype} {file.tensors[key].shape}, "
                                f"expected {array.dtype} {array.shape}")
            array[...] = file.tensors[key]
        try:
            self.step_count = int(file.metadata["step"])
        except (KeyError, ValueError):
            raise GPT2Error(f"{path}: no step count in the metadata; not an optimizer state") from None


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _update(p, g, m, v, keep, one_minus_beta1, beta2, one_minus_beta2, sqrt_correction2, eps, minus_step_size):
    """The AdamW update of one contiguous piece of a parameter in place, all 1-D: `AdamW`'s
    equations in torch's order, one element at a time (each value read and written once).

    No fastmath: torch rounds each operation as written, and so must this to equal it.
    """
    for i in range(len(p)):
        p_i = p[i] * keep                                        # p = p * (1 - lr * wd), or keep = 1
        m_i = m[i] + one_minus_beta1 * (g[i] - m[i])             # m = m + (1 - beta1) * (g - m)
        v_i = beta2 * v[i] + one_minus_beta2 * (g[i] * g[i])     # v = beta2 * v + (1 - beta2) * g * g
        denom = math.sqrt(v_i) / sqrt_correction2 + eps          # sqrt(v) / sqrt(1 - beta2^t) + eps
        p[i] = p_i + minus_step_size * (m_i / denom)             # p = p - lr / (1 - beta1^t) * m / denom
        m[i] = m_i
        v[i] = v_i
