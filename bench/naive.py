"""The naive baseline: the reference GPT-2 of `numpy_gpt2.ops`, run the way picoGPT runs its own.

No KV cache: every generated token runs the whole sequence through `ops.gpt2` again, so the
cost of a step grows with the length of the text. It is here so that the benchmark shows what
numpy-gpt2's cache and kernels buy over the obvious NumPy program. One sequence at a time,
float32 throughout, reading the same official-name weights as numpy-gpt2.
"""

import numpy as np

from numpy_gpt2 import ops
from numpy_gpt2.weights import load_checkpoint


class NaiveGPT2:
    """The baseline as an object: float32 params from a checkpoint path, `logits(ids)`."""

    def __init__(self, path):
        checkpoint = load_checkpoint(path)
        self.config = checkpoint.config
        tensors = {name: checkpoint.array(name, np.float32) for name in checkpoint.tensors}
        self.params = ops.params_from_tensors(tensors, self.config.n_layer)

    def logits(self, ids, logits_to_keep=0):
        """ids: [T] ints -> logits [T or logits_to_keep, V] float32."""
        logits = ops.gpt2(self.params, np.asarray(ids)[None], self.config)["logits"][0]
        return logits[-logits_to_keep:] if logits_to_keep else logits

    def generate(self, ids, n_new):
        """Greedy continuation of `ids`, the whole sequence again for every token: the `n_new` new ids."""
        ids = list(ids)
        for _ in range(n_new):
            ids.append(int(np.argmax(self.logits(ids, logits_to_keep=1)[-1])))
        return ids[len(ids) - n_new:]
