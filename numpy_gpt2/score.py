"""Scoring text: the log-probability of each token given the ones before it, and a text's
negative log-likelihood, perplexity and bits per byte; corpora of JSON Lines documents scored
in partitions, each written as one file (the unit a single process and a Dask cluster share).

Shapes: N tokens of a text, P n_positions, W a window's tokens (at most P), M positions scored,
C n_embd, V vocab, k alternatives.

Texts longer than P are read through the sliding window of transformers' perplexity guide: the
windows start at 0, stride, 2 * stride, ... and hold up to P tokens; each counts only the
tokens the previous window did not reach, predicted from the context its window gives them. So
every token after the first is scored exactly once, with between P - stride and P - 1 tokens
of context once the text is past the first window.

Windows of many texts are run together, grouped by length and padded on the right: with a
causal model no real position sees a pad, so no mask is needed, and the pads are not scored.
The head (x @ wte.T) is applied only to the positions scored, a chunk of rows at a time into
one reused buffer that is reduced at once (`kernels.token_logprobs`): the [M, V] logits are
never held whole.

A corpus is cut into partitions of `partition_size` lines (`plan_partitions`); each partition's
rows are written at once, atomically, to its own file (`score_partition`), so a file that exists
is complete, and a run started again skips it.
"""

import dataclasses
import glob
import json
import math
import os
import pathlib

import numpy as np

from . import inputs, kernels
from .documents import FORMATS, line_offsets, read_records, write_rows
from .errors import GPT2Error

DEFAULT_STRIDE = 512  # the perplexity guide's, with GPT-2's window of 1024
# Rows of the head per chunk: 26 MB of float32 logits for GPT-2's vocabulary, enough rows for
# the BLAS's band-per-thread path and few enough to stay in the workspace's pool.
_HEAD_ROWS = 128


@dataclasses.dataclass
class Score:
    """How likely a text is under the model.

    ids: [N] int64, the text's tokens
    logprobs: [N - 1] float64, logprobs[i] = log p(ids[i + 1] | its window's tokens up to ids[i])
        (natural log; the first token is given, not predicted)
    top_ids, top_logprobs: [N - 1, k] the k most likely tokens at each scored position and
        their log-probabilities, most likely first; None unless asked for
    n_bytes: the UTF-8 bytes of the text (0 when only ids were scored)
    tokens: positions scored, N - 1 (0 for a text of 0 or 1 token)
    nll: the negative log-likelihood, -sum(logprobs), in nats (0 when no token is scored)
    perplexity: exp(nll / tokens); nan when no token is scored
    bits_per_byte: nll / ln 2 / n_bytes, the text's code length per byte of UTF-8, comparable
        across tokenizers; nan when no token is scored or n_bytes is 0
    """

    ids: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    n_bytes: int = 0
    tokens: int = dataclasses.field(init=False)
    nll: float = dataclasses.field(init=False)
    perplexity: float = dataclasses.field(init=False)
    bits_per_byte: float = dataclasses.field(init=False)

    def __post_init__(self):
        self.tokens = len(self.logprobs)
        self.nll = 0.0 - float(self.logprobs.sum())  # 0.0 - : no -0.0 for an empty sum
        mean = self.nll / max(self.tokens, 1)
        # exp overflows a float past a mean of 709 nats a token
        self.perplexity = math.nan if not self.tokens else math.exp(mean) if mean <= 709 else math.inf
        self.bits_per_byte = self.nll / math.log(2) / self.n_bytes if self.tokens and self.n_bytes else math.nan


def score_ids(model, ids, stride: int | None = DEFAULT_STRIDE, top_k: int = 0) -> Score:
    """Score a text given as token ids.

    ids: [N] integers in [0, V); stride: how far each window moves past the last when N > P,
        in 1..P - 1 (None: 512, or P // 2 if that is less); top_k: also return the k most
        likely tokens at each scored position (0: none)
    -> `Score` (n_bytes 0: the text's bytes are not known from its ids)
    """
    return _score_all(model, [_check_text_ids(model, ids)], stride, top_k, None)[0]


def score_text(model, tokenizer, text: str, stride: int | None = DEFAULT_STRIDE, top_k: int = 0) -> Score:
    """Score `text`: its tokens by `tokenizer`, then `score_ids`; n_bytes its UTF-8 length."""
    ids, n_bytes = _text_ids(model, tokenizer, text)
    return dataclasses.replace(score_ids(model, ids, stride, top_k), n_bytes=n_bytes)


def score_texts(model, tokenizer, texts, stride: int | None = DEFAULT_STRIDE,
                max_batch_tokens: int | None = None) -> list[Score]:
    """Score many texts together -> one `Score` per text, in order: each text's tokens by
    `tokenizer`, then `score_many`; n_bytes each text's UTF-8 length."""
    encoded = [_text_ids(model, tokenizer, text) for text in texts]
    scores = score_many(model, [ids for ids, _ in encoded], stride, max_batch_tokens)
    return [dataclasses.replace(score, n_bytes=n_bytes) for score, (_, n_bytes) in zip(scores, encoded)]


def score_many(model, texts_ids, stride: int | None = DEFAULT_STRIDE, max_batch_tokens: int | None = None) -> list[Score]:
    """Score many texts given as token ids ([N] integers each) together -> one `Score` each.

    The texts' windows are run in batches of windows of similar length, at most
    `max_batch_tokens` positions (padding included) a batch (None: P, as many as one
    full-context pass, for which the model's workspace is sized); a longer window runs alone.
    Each text gets what `score_ids` gives it alone, to rounding (the products' sums may be cut
    differently for another number of rows).
    """
    if max_batch_tokens is not None and (isinstance(max_batch_tokens, bool) or not isinstance(
            max_batch_tokens, (int, np.integer)) or max_batch_tokens < 1):
        raise GPT2Error(f"max_batch_tokens must be a positive integer or None, found {max_batch_tokens!r}")
    return _score_all(model, [_check_text_ids(model, ids) for ids in texts_ids], stride, 0, max_batch_tokens)


def _text_ids(model, tokenizer, text) -> tuple[np.ndarray, int]:
    """text -> its token ids, int64 [N], and its UTF-8 bytes, or GPT2Error for what is not a
    text or has a token outside the model's vocabulary."""
    if not isinstance(text, str):
        raise GPT2Error(f"text must be a str, found {type(text).__name__}")
    try:
        n_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise GPT2Error(f"text is not valid Unicode: {exc.reason} at character {exc.start}") from None
    ids = np.array(tokenizer.encode(text), np.int64)
    V = model.config.vocab_size
    if len(ids) and ids.max() >= V:
        raise GPT2Error(f"the text has token {ids.max()}, outside the model's vocabulary 0..{V - 1}")
    return ids, n_bytes


def _check_text_ids(model, ids) -> np.ndarray:
    """ids: [N] integers in [0, V), N >= 0 -> int64 [N]."""
    array = np.asarray(ids)
    if array.size == 0 and array.ndim == 1:
        return array.astype(np.int64)
    if array.ndim != 1:
        raise GPT2Error(f"ids must be one text's token ids, shape (N,), found shape {array.shape}")
    return inputs.check_ids(array, model.config.vocab_size)[0].astype(np.int64)


def window_stride(stride, n_positions: int) -> int:
    """stride as `score_ids` takes it -> the window's step: None gives 512, or P // 2 if less."""
    if stride is None:
        return min(DEFAULT_STRIDE, max(n_positions // 2, 1))
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise GPT2Error(f"stride must be a positive integer or None, found {stride!r}")
    return int(stride)


def windows(n_tokens: int, n_positions: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of a text of N tokens -> (begin, end, first) each: the window holds tokens
    begin..end - 1 and scores the tokens after its positions first..end - begin - 2, that is
    tokens begin + first + 1..end - 1 (none for N < 2).

    transformers' perplexity guide: windows begin at 0, stride, 2 * stride, ... and end P later
    or at the text's end; each scores the tokens past the previous window's end.
    """
    if n_tokens < 2:
        return []
    if n_tokens <= n_positions:
        return [(0, n_tokens, 0)]
    if stride >= n_positions:
        raise GPT2Error(f"stride {stride} must be less than the model's n_positions={n_positions} for a text of "
                        f"{n_tokens} tokens: each window keeps at least one token of the last as context; give "
                        f"at most {n_positions - 1} (None: {window_stride(None, n_positions)})")
    spans, scored_to = [], 1
    for begin in range(0, n_tokens, stride):
        end = min(begin + n_positions, n_tokens)
        spans.append((begin, end, scored_to - 1 - begin))
        scored_to = end
        if end == n_tokens:
            return spans


def _check_top_k(top_k, vocab_size: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= vocab_size:
        raise GPT2Error(f"top_k must be an integer in 0..{vocab_size} (the vocabulary), found {top_k!r}")
    return int(top_k)


def _score_all(model, texts: list[np.ndarray], stride, top_k, max_batch_tokens, progress=None) -> list[Score]:
    """Every text's windows through the model in batches of similar length -> a `Score` each;
    progress, when given, is called after each batch with the fraction of positions scored."""
    P = model.config.n_positions
    stride = window_stride(stride, P)
    k = _check_top_k(top_k, model.config.vocab_size)
    max_batch_tokens = P if max_batch_tokens is None else max_batch_tokens
    logprobs = [np.empty(max(len(ids) - 1, 0)) for ids in texts]
    tops = [(np.empty((len(lp), k), np.int64), np.empty((len(lp), k))) for lp in logprobs]
    spans = [(text, *span) for text, ids in enumerate(texts) for span in windows(len(ids), P, stride)]
    # Longest first, so each batch's padding is to its first window's length; the sort is stable.
    spans.sort(key=lambda span: span[2] - span[1], reverse=True)
    total, scored = sum(end - begin - 1 - first for _, begin, end, first in spans), 0
    start = 0
    while start < len(spans):
        T = spans[start][2] - spans[start][1]
        stop = start + max(1, min(len(spans) - start, max_batch_tokens // T))
        batch = spans[start:stop]
        start = stop
        ids = np.zeros((len(batch), T), np.int64)  # right padding: a valid id that nothing sees
        for row, (text, begin, end, _) in enumerate(batch):
            ids[row, :end - begin] = texts[text][begin:end]
        first = min(span[3] for span in batch)
        hidden = model.forward(ids, logits_to_keep=T - first, head=False)  # [B, T - first, C]
        rows = np.concatenate([hidden[row, f - first:end - begin - 1 - first]
                               for row, (_, begin, end, f) in enumerate(batch)])  # [M, C]
        targets = np.concatenate([ids[row, f + 1:end - begin] for row, (_, begin, end, f) in enumerate(batch)])
        batch_logprobs, (top_ids, top_logprobs) = _head_logprobs(model, rows, targets, k)
        offset = 0
        for text, begin, end, f in batch:
            n = end - begin - 1 - f
            logprobs[text][begin + f:end - 1] = batch_logprobs[offset:offset + n]
            tops[text][0][begin + f:end - 1] = top_ids[offset:offset + n]
            tops[text][1][begin + f:end - 1] = top_logprobs[offset:offset + n]
            offset += n
        scored += offset
        if progress is not None:
            progress(scored / total)
    return [Score(ids, lp, *(top if k else (None, None))) for ids, lp, top in zip(texts, logprobs, tops)]


def _head_logprobs(model, rows, targets, k: int):
    """rows: [M, C] final hidden states; targets: [M] -> the log-probabilities [M] of the targets
    under softmax(rows @ wte.T), and the top k (ids [M, k], log-probs [M, k]).

    The head's product is made _HEAD_ROWS rows at a time into one buffer from the model's
    workspace, and each chunk is reduced before the next is made.
    """
    M, V = len(rows), model.config.vocab_size
    logprobs = np.empty(M)
    top_ids, top_logprobs = np.empty((M, k), np.int64), np.empty((M, k))
    chunk = min(M, _HEAD_ROWS)
    logits = model.workspace.logits.empty((chunk, V), model.dtype)
    for start in range(0, M, chunk):
        stop = min(start + chunk, M)
        part = logits[:stop - start]
        model.head(rows[start:stop], part)
        logprobs[start:stop] = kernels.token_logprobs(part, targets[start:stop], top_ids[start:stop],
                                                      top_logprobs[start:stop])
    return logprobs, (top_ids, top_logprobs)



def report(score: Score, tokenizer, per_token: bool = False, as_json: bool = False) -> str:
    """A `Score` as the command line prints it: tokens, NLL, perplexity and bits per byte; with
    per_token a table of each scored token (its position in the text, id, piece, log-prob, and
    the top k when scored with them); as_json the same as one JSON object (nan as null)."""
    rows = []
    if per_token:
        pieces = tokenizer.pieces(score.ids)
        for i, logprob in enumerate(score.logprobs):
            row = {"position": i + 1, "id": int(score.ids[i + 1]), "piece": pieces[i + 1], "logprob": float(logprob)}
            if score.top_ids is not None:
                row["top"] = [{"id": int(t), "piece": p, "logprob": float(lp)} for t, p, lp in
                              zip(score.top_ids[i], tokenizer.pieces(score.top_ids[i]), score.top_logprobs[i])]
            rows.append(row)
    totals = {"tokens": score.tokens, "nll": score.nll, "perplexity": score.perplexity,
              "bits_per_byte": score.bits_per_byte, "bytes": score.n_bytes}
    if as_json:
        finite = {key: None if isinstance(v, float) and not math.isfinite(v) else v for key, v in totals.items()}
        return json.dumps({**finite, **({"per_token": rows} if per_token else {})}, ensure_ascii=False)
    lines = []
    if per_token:
        lines.append(f"{'position':>8}  {'id':>6}  {'piece':<16}  {'log-prob':>9}" + ("  top" if score.top_ids is not None
                                                                                      else ""))
        for row in rows:
            top = "  ".join(f"{t['piece']!r} {t['logprob']:.4f}" for t in row.get("top", []))
            lines.append(f"{row['position']:>8}  {row['id']:>6}  {row['piece']!r:<16}  {row['logprob']:>9.4f}"
                         + (f"  {top}" if top else ""))
    lines += [f"tokens         {score.tokens} scored ({len(score.ids)} in the text, the first given)",
              f"nll            {score.nll:.4f} nats",
              f"perplexity     {score.perplexity:.4f}",
              f"bits per byte  {score.bits_per_byte:.4f} ({score.n_bytes} bytes of UTF-8)"]
    return "\n".join(lines)

# ---- corpora: JSON Lines documents in partitions ----------------------------------------------

ON_ERROR = ("skip", "fail")
# The output's columns and their types: one row per document.
ROW_COLUMNS = {"id": str, "tokens": int, "nll": float, "perplexity": float, "bits_per_byte": float, "error": str}


@dataclasses.dataclass
class ScoreOptions:
    """How a corpus of JSON Lines documents is read, scored and written.

    id_field, text_field: the fields of each line's object holding its id and its text
    stride: the sliding window's step (see `score_ids`; None: 512, or n_positions // 2 if less)
    on_error: "skip" writes a bad line as a row with its error; "fail" raises GPT2Error at it
    out_format: "jsonl" or "parquet"
    partition_size: lines of input per partition, one output file each
    dtype: the compute dtype a worker loads the model in, "float32" or "float64"
    """

    id_field: str = "id"
    text_field: str = "text"
    stride: int | None = DEFAULT_STRIDE
    on_error: str = "skip"
    out_format: str = "jsonl"
    partition_size: int = 1000
    dtype: str = "float32"

    def __post_init__(self):
        for name, allowed in (("on_error", ON_ERROR), ("out_format", FORMATS), ("dtype", ("float32", "float64"))):
            if getattr(self, name) not in allowed:
                raise GPT2Error(f"{name} must be one of {', '.join(allowed)}, found {getattr(self, name)!r}")
        if isinstance(self.partition_size, bool) or not isinstance(self.partition_size, int) or self.partition_size < 1:
            raise GPT2Error(f"partition_size must be a positive integer, found {self.partition_size!r}")
        window_stride(self.stride, 2)  # the type and sign; against n_positions once a model is known


@dataclasses.dataclass(frozen=True)
class Partition:
    """A run of lines of one input file, scored into one output file.

    file_index: the file's place among the inputs; index: the partition's place in its file;
    path: the input file; start_line, stop_line: 1-based line numbers, half-open; name: of the
    output file, "part-FFFFF-IIIII"; offset: the byte offset of start_line in the file.
    """

    file_index: int
    index: int
    path: str
    start_line: int
    stop_line: int
    name: str
    offset: int = 0


def plan_partitions(paths, options: ScoreOptions) -> list[Partition]:
    """Input files (paths, or glob patterns expanded and sorted) -> their partitions, in input
    order: each file cut into runs of options.partition_size lines (a file of no line has
    none)."""
    partitions = []
    for file_index, path in enumerate(_input_files(paths)):
        n_lines, offsets = line_offsets(path, options.partition_size)
        for index, offset in enumerate(offsets):
            start = 1 + index * options.partition_size
            partitions.append(Partition(file_index, index, path, start, min(start + options.partition_size,
                                                                            n_lines + 1),
                                        f"part-{file_index:05d}-{index:05d}", offset))
    return partitions


def _input_files(paths) -> list[str]:
    """Paths and glob patterns -> the files, each pattern's matches sorted; GPT2Error for a
    pattern that matches nothing, a path that is no file, or no path at all."""
    files = []
    for path in map(os.fspath, paths):
        if any(c in path for c in "*?[") and not os.path.exists(path):
            found = sorted(p for p in glob.glob(path) if os.path.isfile(p))
            if not found:
                raise GPT2Error(f"no file matches {path!r}")
            files += found
        elif os.path.isdir(path):
            raise GPT2Error(f"{path} is a directory; give the JSON Lines files in it (say '{path}/*.jsonl')")
        elif not os.path.isfile(path):
            raise GPT2Error(f"{path}: no such file")
        else:
            files.append(path)
    if not files:
        raise GPT2Error("no input files given")
    return files


def partition_output(partition: Partition, out_dir, options: ScoreOptions) -> pathlib.Path:
    """The output file of `partition`: out_dir / (its name + ".jsonl" or ".parquet")."""
    return pathlib.Path(out_dir) / f"{partition.name}.{options.out_format}"


def score_partition(model, tokenizer, partition: Partition, out_dir, options: ScoreOptions,
                    progress=None, bad_line=None) -> pathlib.Path:
    """Score the documents of `partition` and write their rows, in input order, to its output
    file (atomically; out_dir made if missing) -> the file. An output file that exists is
    complete, and is returned as it is.

    Each non-blank line gives a row {"id", "tokens", "nll", "perplexity", "bits_per_byte",
    "error"}: the id is the line's id field ("FILE:LINE" when it has none); a line that is not
    a JSON object with a string in its text field, or whose text the model cannot read (a token
    outside its vocabulary), gives error "FILE:LINE: what is wrong" and null numbers, or with
    options.on_error "fail" raises GPT2Error with that message. A text of 0 or 1 token scores
    no token: perplexity and bits_per_byte null. progress: called with the fraction of the
    partition's tokens scored, after each batch; bad_line: called with each error row's error.
    """
    out = partition_output(partition, out_dir, options)
    if out.exists():
        return out
    rows, texts, scored_rows = [], [], []
    for record in read_records(partition.path, partition.start_line, partition.stop_line, partition.offset):
        row = dict.fromkeys(ROW_COLUMNS)
        row["id"], text, row["error"] = _document(record, options)
        if row["error"] is None:
            try:
                texts.append(_text_ids(model, tokenizer, text))
                scored_rows.append(row)
            except GPT2Error as exc:
                row["error"] = f"{record.where}: {exc}"
        if row["error"] is not None:
            if options.on_error == "fail":
                raise GPT2Error(row["error"])
            if bad_line is not None:
                bad_line(row["error"])
        rows.append(row)
    scores = _score_all(model, [ids for ids, _ in texts], options.stride, 0, None, progress)
    for row, score, (_, n_bytes) in zip(scored_rows, scores, texts):
        score = dataclasses.replace(score, n_bytes=n_bytes)
        row.update(tokens=score.tokens, nll=score.nll, perplexity=score.perplexity,
                   bits_per_byte=score.bits_per_byte)
    os.makedirs(out_dir, exist_ok=True)
    write_rows(rows, ROW_COLUMNS, out, options.out_format)
    return out


def _document(record, options: ScoreOptions):
    """A `documents.Record` -> (id, text, error): error "FILE:LINE: what is wrong" or None."""
    if record.error is not None:
        return record.where, None, record.error
    value = record.value
    if not isinstance(value, dict):
        return record.where, None, f"{record.where}: not a JSON object (found {_json_kind(value)})"
    doc_id = value.get(options.id_field, record.where)
    if options.text_field not in value:
        return doc_id, None, f"{record.where}: no field {options.text_field!r}"
    text = value[options.text_field]
    if not isinstance(text, str):
        return doc_id, None, f"{record.where}: field {options.text_field!r} is {_json_kind(text)}, expected a string"
    return doc_id, text, None


def _json_kind(value) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def score_files(model, tokenizer, paths, out_dir, options: ScoreOptions, progress: bool = True,
                bad_line=None) -> list[pathlib.Path]:
    """Score every document of the JSON Lines files `paths` (globs expanded) into out_dir, one
    file per partition (`score_partition`), in input order; partitions already complete are
    skipped, so an interrupted run continues where it stopped -> the output files, in order.
    progress: a bar on stderr (`data.Progress`); bad_line: called with each bad line's error."""
    from .data import Progress

    partitions = plan_partitions(paths, options)
    total = sum(p.stop_line - p.start_line for p in partitions)
    bar = Progress(total, enabled=progress)
    outputs, done = [], 0
    try:
        for partition in partitions:
            lines = partition.stop_line - partition.start_line

            def report(fraction, done=done, lines=lines):
                bar.update(done + round(fraction * lines), f"scoring: {done + round(fraction * lines):,}/{total:,} lines")

            outputs.append(score_partition(model, tokenizer, partition, out_dir, options, report, bad_line))
            report(1)
            done += lines
    finally:
        bar.close()
    return outputs
