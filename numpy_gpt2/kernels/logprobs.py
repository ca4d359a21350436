"""The log-probabilities of chosen tokens, row by row, from the logits: the head's reduction
when text is scored, with no [rows, V] log-softmax array made.

Twin of `ops.log_softmax(logits)` read at each row's target (and at its k largest), row by row
in Numba's threads; tests/test_score.py holds it to torch's log_softmax and topk within 1e-12
in float64 and 1e-7 in float32 (see there).
"""

import math

import numba
import numpy as np

from .common import JIT, PARALLEL
from .float32math import exp_shifted_, row_max


@numba.njit(**PARALLEL)
def _logprobs_rows_(logits, targets, logprobs, top_ids, top_logprobs):
    """logits: [R, V], overwritten; targets: [R] ids -> logprobs: [R] float64 = log_softmax(row)
    at the target; top_ids, top_logprobs: [R, k] the k largest of log_softmax(row), largest
    first (k = 0: nothing). exp summed in float64."""
    R, V = logits.shape
    k = top_ids.shape[1]
    for r in numba.prange(R):
        row = logits[r]
        if k:
            _top_k(row, top_ids[r], top_logprobs[r])
        top = row_max(row)
        target = row[targets[r]]
        exp_shifted_(row, top)
        total = 0.0
        for v in range(V):
            total += row[v]
        # log_softmax(row)[t] = row[t] - top - log(sum(exp(row - top))), in float64
        log_sum = np.float64(top) + math.log(total)
        logprobs[r] = np.float64(target) - log_sum
        for j in range(k):
            top_logprobs[r, j] -= log_sum


@numba.njit(**JIT)
def _top_k(row, ids, values):
    """ids, values: [k] <- the k largest entries of row: [V] and where they are, largest first
    (of equal values the first one's index first); an insertion into a sorted list of k, which
    most entries, smaller than its last, pass by at one comparison."""
    k = len(ids)
    values[:] = -np.inf
    ids[:] = -1
    for v in range(len(row)):
        x = row[v]
        if x > values[k - 1]:
            j = k - 1
            while j > 0 and x > values[j - 1]:
                values[j] = values[j - 1]
                ids[j] = ids[j - 1]
                j -= 1
            values[j] = x
            ids[j] = v


def token_logprobs(logits, targets, top_ids=None, top_logprobs=None):
    """logits: [R, V] (C-contiguous, overwritten: they are scratch); targets: [R] ints in [0, V)
    -> [R] float64: log_softmax(logits)[r, targets[r]] (natural log).

    top_ids: [R, k] int64, top_logprobs: [R, k] float64, when given, are filled with the k most
    likely tokens of each row and their log-probabilities, most likely first.
    """
    R = len(logits)
    if top_ids is None:
        top_ids, top_logprobs = np.empty((R, 0), np.int64), np.empty((R, 0), np.float64)
    logprobs = np.empty(R, np.float64)
    _logprobs_rows_(logits, np.asarray(targets, np.int64), logprobs, top_ids, top_logprobs)
    return logprobs
