"""Training data: text files -> GPT-2 token ids on disk, and random batches drawn from them.

`prepare` writes nanoGPT's format into one directory:

    train.bin   the token ids as raw little-endian uint16, one after another
    val.bin     the same, for validation
    meta.json   tokenizer, vocab_size, token counts, each source's sha256, val_fraction, split

The files' texts are joined with <|endoftext|> (50256) between them, into one stream; val.bin
is the last `val_fraction` of that stream's tokens and train.bin the rest (as nanoGPT's
shakespeare prepare.py splits its text), so validation is text the model never trains on,
and one file is split in two at most.
"""

import hashlib
import json
import os
import pathlib
import sys
import time

import numpy as np

from .errors import GPT2Error
from .fileio import atomic_path, atomic_write_bytes
from .tokenizer import EOS_TOKEN_ID, Tokenizer

FILES = ("train.bin", "val.bin", "meta.json")
TOKEN_DTYPE = np.dtype("<u2")
SPLIT = "val.bin is the last val_fraction of the token stream (the files in order, <|endoftext|> between them)"
# Text handed to the tokenizer at once: large enough that tiktoken's own cost per call vanishes,
# small enough that its token list (28 bytes a token) stays small.
_CHUNK_CHARS = 1 << 20


def prepare(files, out, val_fraction: float = 0.05, progress: bool = True) -> dict:
    """Tokenize text files (UTF-8) into out/train.bin, out/val.bin and out/meta.json.

    files: paths, in order; out: a directory, new, empty, or written by `prepare` before.
    Every file is written atomically; meta.json last. -> the contents of meta.json.
    """
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
        raise GPT2Error(f"--val-fraction (val_fraction) must be in (0, 1), found {val_fraction!r}")
    paths = [pathlib.Path(f) for f in files]
    if not paths:
        raise GPT2Error("no input files: give one or more text files to prepare")
    for path in paths:
        if not path.exists():
            raise GPT2Error(f"{path}: no such file")
        if not path.is_file():
            raise GPT2Error(f"{path}: is not a file, expected a text file")
        if path.stat().st_size == 0:
            raise GPT2Error(f"{path}: is empty")
    out = pathlib.Path(out)
    _check_output_directory(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer.default()
    bar = Progress(sum(p.stat().st_size for p in paths), enabled=progress)
    sources = []
    with atomic_path(out / "train.bin") as tmp:
        with open(tmp, "wb") as f:
            done = 0
            for index, path in enumerate(paths):
                if index:
                    f.write(np.array([EOS_TOKEN_ID], TOKEN_DTYPE).tobytes())
                tokens, digest = 0, hashlib.sha256()
                for text, raw in _pieces(path):
                    ids = np.array(tokenizer.encode(text), TOKEN_DTYPE)
                    f.write(ids.tobytes())
                    tokens += ids.size
                    digest.update(raw)
                    done += len(raw)
                    bar.update(done, f"tokenizing {path.name}: {done / 2**20:,.1f} MiB")
                sources.append({"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest(),
                                 "tokens": tokens})
            total = f.tell() // TOKEN_DTYPE.itemsize
        bar.close()
        n_val = max(1, round(total * val_fraction))
        n_train = total - n_val
        if n_train < 1:
            raise GPT2Error(f"the input has {total} tokens, too few to split into train.bin and val.bin")
        stream = np.memmap(tmp, dtype=TOKEN_DTYPE, mode="r")
        with atomic_path(out / "val.bin") as val_tmp:
            with open(val_tmp, "wb") as f:
                f.write(stream[n_train:].tobytes())
                f.flush()
                os.fsync(f.fileno())
        del stream
        with open(tmp, "r+b") as f:
            f.truncate(n_train * TOKEN_DTYPE.itemsize)
            os.fsync(f.fileno())
    meta = {
        "tokenizer": "gpt2", "vocab_size": tokenizer.n_vocab, "eot_token_id": EOS_TOKEN_ID,
        "dtype": "uint16", "train_tokens": n_train, "val_tokens": n_val, "val_fraction": val_fraction,
        "split": SPLIT, "sources": sources,
    }
    atomic_write_bytes(out / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta


def _check_output_directory(out: pathlib.Path) -> None:
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"--out {out}: is a file, expected a directory")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise GPT2Error(f"--out {out}: holds other files ({shown}); prepare writes train.bin, val.bin "
                            "and meta.json into a new or empty directory, or one it wrote before")


def _pieces(path: pathlib.Path):
    """Yield (text, its UTF-8 bytes) of the file in pieces of about _CHUNK_CHARS, cut only where
    GPT-2's pre-tokenizer cuts anyway, so the ids are those of the whole text encoded at once.

    The cut is made between a non-space character and a following newline: no piece of the
    pre-tokenizer's pattern spans that, and each piece after it is matched the same whether
    the text before it is there or not. Newlines are kept as they are ("\\r\\n" too).
    """
    lines, size, limit = [], 0, _CHUNK_CHARS
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for line in f:
                lines.append(line)
                size += len(line)
                if size < limit:
                    continue
                text = "".join(lines)
                cut = _last_safe_cut(text)
                if cut > 0:
                    yield text[:cut], text[:cut].encode("utf-8")
                    text = text[cut:]
                # With no place to cut (a long run of blank lines), wait for twice as much text.
                lines, size, limit = [text], len(text), max(_CHUNK_CHARS, 2 * len(text))
    except UnicodeDecodeError as exc:
        raise GPT2Error(f"{path}: not UTF-8 text ({exc.reason}: byte 0x{exc.object[exc.start]:02x})") from None
    text = "".join(lines)
    if text:
        yield text, text.encode("utf-8")


def _last_safe_cut(text: str) -> int:
    """The last index i with text[i] == "\\n" and text[i - 1] not whitespace, or -1."""
    cut = text.rfind("\n")
    while cut > 0 and text[cut - 1].isspace():
        cut = text.rfind("\n", 0, cut)
    return cut


def load_tokens(directory) -> tuple:
    """-> (train, val, meta) of a directory `prepare` wrote: train and val as read-only
    uint16 memory maps, meta the dict of meta.json (None for a directory nanoGPT's own
    prepare.py wrote, which has none). Token counts are checked against meta.json."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise GPT2Error(f"--data {directory}: no such directory; make it with `numpy-gpt2 prepare FILE... --out DIR`")
    arrays = []
    for name in ("train.bin", "val.bin"):
        path = directory / name
        if not path.is_file():
            raise GPT2Error(f"--data {directory}: no {name}; make it with `numpy-gpt2 prepare FILE... --out {directory}`")
        if path.stat().st_size % TOKEN_DTYPE.itemsize or path.stat().st_size == 0:
            raise GPT2Error(f"{path}: {path.stat().st_size} bytes, expected a non-empty whole number of uint16 ids")
        arrays.append(np.memmap(path, dtype=TOKEN_DTYPE, mode="r"))
    meta = None
    if (directory / "meta.json").is_file():
        try:
            meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
            counts = (meta["train_tokens"], meta["val_tokens"])
        except (ValueError, KeyError, TypeError):
            raise GPT2Error(f"{directory / 'meta.json'}: not the meta.json `numpy-gpt2 prepare` writes") from None
        if counts != (arrays[0].size, arrays[1].size):
            raise GPT2Error(f"--data {directory}: meta.json counts {counts[0]} + {counts[1]} tokens, the files hold "
                            f"{arrays[0].size} + {arrays[1].size} (an interrupted prepare?); run prepare again")
    return arrays[0], arrays[1], meta


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """B rows of T consecutive tokens from random offsets (nanoGPT's get_batch) -> ids [B, T] int64.

    The offsets are drawn uniformly from 0..len(tokens) - T with `rng`, one call per batch,
    so the same generator state gives the same batch.
    """
    offsets = rng.integers(0, tokens.size - seq_len + 1, size=batch_size)
    return np.stack([tokens[i:i + seq_len] for i in offsets]).astype(np.int64)


class Progress:
    """A one-line progress report on stderr: the caller's text, then done/total, % and time left.

    On a terminal the line is redrawn in place at most every 0.2 s; elsewhere (a log file) a
    line is written at most every 10 s. Nothing is drawn in the first `delay` seconds, so short
    work stays quiet. The rate is measured from the first `update`'s position (a resumed run).
    """

    def __init__(self, total: int, enabled: bool = True, stream=None, delay: float = 1.0):
        self.total, self.enabled, self.delay = total, enabled, delay
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._start = time.monotonic()
        self._first = None
        self._drawn = 0.0
        self._line = None

    def update(self, done: int, text: str = "") -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (done, now)
        if not self.enabled or now - self._start < self.delay or now - self._drawn < (0.2 if self.tty else 10.0):
            self._line = (done, text)
            return
        self._draw(done, text, now)

    def close(self) -> None:
        """Draw the last state (if anything was drawn) and end the line."""
        if self._drawn and self._line is not None:
            self._draw(*self._line, time.monotonic())
        if self._drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, done, text, now):
        self._drawn, self._line = now, (done, text)
        first_done, first_time = self._first
        left = ""
        if done > first_done and done < self.total:
            seconds = (now - first_time) / (done - first_done) * (self.total - done)
            left = f" | {int(seconds) // 60}:{int(seconds) % 60:02d} left"
        line = f"{text} | {100 * done / max(self.total, 1):3.0f}%{left}"
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()
