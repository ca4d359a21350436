"""Checks of what a caller passes in: token ids, attention masks, position ids, labels.

Each returns the input as the model uses it, or raises `GPT2Error` naming what is wrong and
what was expected.
"""

import numpy as np

from . import ops
from .errors import GPT2Error


def check_ids(input_ids, vocab_size: int) -> np.ndarray:
    """input_ids: (T,) or (B, T) integers in [0, vocab_size) -> ids [B, T]."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise GPT2Error(f"input_ids must have shape (T,) or (B, T) with T >= 1, found {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise GPT2Error(f"input_ids must be integers, found dtype {ids.dtype}")
    low, high = ids.min(), ids.max()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise GPT2Error(f"input_ids contains {bad}, outside the vocabulary 0..{vocab_size - 1}")
    return ids


def check_mask(attention_mask, B: int, S: int) -> np.ndarray:
    """attention_mask: (S,) or (B, S) of 0/1 -> bool [B, S]."""
    mask = np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != (B, S):
        raise GPT2Error(f"attention_mask must have shape (B, cached + new) = {(B, S)}, found {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise GPT2Error("attention_mask must hold only 0 and 1")
    return mask.astype(bool)


def check_positions(position_ids, B: int, T: int, n_positions: int) -> np.ndarray:
    """position_ids: (T,) or (B, T) integers in [0, n_positions) -> [B, T]."""
    positions = np.asarray(position_ids)
    if positions.ndim == 1:
        positions = positions[None]
    if positions.shape != (B, T) or not np.issubdtype(positions.dtype, np.integer):
        raise GPT2Error(f"position_ids must be integers of shape {(B, T)}, found {positions.dtype} {positions.shape}")
    if positions.min() < 0 or positions.max() >= n_positions:
        raise GPT2Error(f"position_ids must be in 0..{n_positions - 1}")
    return positions


def check_batch(input_ids, attention_mask, config):
    """A batch for a pass with no cache -> ids [B, T] and key_mask [B, T] bool (all True when
    attention_mask is None)."""
    ids = check_ids(input_ids, config.vocab_size)
    B, T = ids.shape
    if T > config.n_positions:
        raise GPT2Error(f"input_ids has {T} positions, more than n_positions={config.n_positions}")
    key_mask = np.ones((B, T), dtype=bool) if attention_mask is None else check_mask(attention_mask, B, T)
    return ids, key_mask


def training_batch(input_ids, labels, attention_mask, config):
    """A batch for the loss -> ids [B, T], key_mask [B, T] bool, and targets [B, T]: what each
    position predicts, with transformers' conventions.

    labels: like input_ids, or None for input_ids themselves with padding ignored; shifted
    here, so targets[:, t] = labels[:, t + 1]; -100 (`ops.IGNORE_INDEX`) counts in no loss, and
    neither does what a padding position would predict (it sees no key).
    """
    ids, key_mask = check_batch(input_ids, attention_mask, config)
    if labels is None:
        labels = np.where(key_mask, ids, ops.IGNORE_INDEX)
    else:
        labels = np.asarray(labels)
        labels = labels[None] if labels.ndim == 1 else labels
        if labels.shape != ids.shape or not np.issubdtype(labels.dtype, np.integer):
            raise GPT2Error(f"labels must be integers of the shape of input_ids {ids.shape}, found "
                            f"{labels.dtype} {labels.shape}")
        bad = (labels != ops.IGNORE_INDEX) & ((labels < 0) | (labels >= config.vocab_size))
        if bad.any():
            raise GPT2Error(f"labels contains {labels[bad][0]}, outside the vocabulary "
                            f"0..{config.vocab_size - 1} (and not -100, the ignored label)")
    targets = np.full(ids.shape, ops.IGNORE_INDEX, np.int64)
    targets[:, :-1] = labels[:, 1:]
    targets[~key_mask] = ops.IGNORE_INDEX
    return ids, key_mask, targets
