"""The bundled model's validation perplexity, beside a unigram model's on the same split.

    python evaluate.py MODEL_DIR DATA_DIR     (DATA_DIR from `numpy-gpt2 prepare`)

Both score every token of DATA_DIR/val.bin. The model reads it in consecutive windows of
n_positions tokens, each predicting all but its first token from the ones before it. The
unigram model predicts each token by its frequency in train.bin, with add-one smoothing over
the 50257 ids so that a token unseen in training costs a finite amount.
Prints one JSON object: tokens scored, mean loss (nats) and perplexity of each.
"""

import json
import math
import sys

import numpy as np

from numpy_gpt2 import GPT2


def model_loss(model, val: np.ndarray, batch: int = 8) -> tuple:
    """-> (total nats, tokens scored) over consecutive windows of n_positions tokens."""
    P = model.config.n_positions
    windows = val[: len(val) // P * P].reshape(-1, P)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        rows = windows[i:i + batch].astype(np.int64)
        scored = rows.shape[0] * (P - 1)
        total += model.loss(rows) * scored  # loss is the mean over the scored tokens
        count += scored
    return total, count


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> tuple:
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[val].sum()), len(val)


def main() -> None:
    model_dir, data_dir = sys.argv[1:3]
    model = GPT2.from_pretrained(model_dir)
    train = np.fromfile(f"{data_dir}/train.bin", dtype=np.uint16)
    val = np.fromfile(f"{data_dir}/val.bin", dtype=np.uint16)
    result = {}
    for name, (total, count) in (("model", model_loss(model, val)),
                                 ("unigram", unigram_loss(train, val, model.config.vocab_size))):
        result[name] = {"tokens": count, "loss": round(total / count, 4), "perplexity": round(math.exp(total / count), 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
