"""The GPT-2 byte-level BPE tokenizer: a `tiktoken.Encoding` built offline from local files.

GPT-2's vocabulary ships as two files: a JSON map from token string to id, and a list of BPE
merges in priority order. OpenAI's download names them `encoder.json` and `vocab.bpe`; a
Hugging Face model directory names the same files `vocab.json` and `merges.txt`. A copy of
OpenAI's pair is packaged in `numpy_gpt2/data/` and checked against tiktoken's published
hashes, so encoding never needs the network.

Both files spell bytes as printable characters (the "data gym" alphabet); `_data_gym_alphabet`
undoes that, as tiktoken's `data_gym_to_mergeable_bpe_ranks` does, but reading local files and
writing no cache.
"""

import codecs
import functools
import hashlib
import importlib.resources
import json
import operator
import os
import pathlib
from collections.abc import Iterable, Iterator

import tiktoken

from .errors import TokenizerError

# tiktoken_ext/openai_public.py: r50k_pat_str, the pre-tokenizer split of GPT-2.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
EOS_TOKEN_ID = 50256
N_VOCAB = 50257

# tiktoken's published sha256 of OpenAI's files, which are what numpy_gpt2/data/ holds.
PACKAGED_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# (vocab, merges) file names, in the order a model directory is searched.
_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))

# Entries of encoder.json that are not BPE tokens; tiktoken drops both.
_NON_BPE_ENTRIES = (ENDOFTEXT, "<|startoftext|>")


def _packaged_data_dir():
    """The Traversable holding the packaged encoder.json and vocab.bpe."""
    return importlib.resources.files("numpy_gpt2") / "data"


def packaged_files():
    """The packaged (encoder.json, vocab.bpe): OpenAI's files, which vocab.json/merges.txt equal."""
    data = _packaged_data_dir()
    return data / "encoder.json", data / "vocab.bpe"


@functools.lru_cache(maxsize=1)
def _data_gym_alphabet() -> dict[str, int]:
    """Map each character of the data gym alphabet to the byte it stands for.

    Printable bytes other than space stand for themselves; the other 68 bytes are shifted to
    chr(256), chr(257), ... in byte order, so every token is a printable, space-free string.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    alphabet = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in printable]
    alphabet.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return alphabet


def _rank_ordered_bytes() -> list[int]:
    """The 256 single bytes in the order of their ranks 0..255: the alphabet's order."""
    return list(_data_gym_alphabet().values())


@functools.lru_cache(maxsize=1)
def _data_gym_table() -> dict[int, int | None]:
    """A `str.translate` table: each character of the alphabet -> the character whose code is
    its byte; any other character below 256 -> deleted, so that a token holding one comes out
    short (one above 255 stays, and is not Latin-1)."""
    table = {code: None for code in range(256)}
    table.update({ord(c): b for c, b in _data_gym_alphabet().items()})
    return table


def _decode_data_gym(token: str, source, merge: int | None = None) -> bytes:
    """The bytes a data gym token string stands for; `source` names its file, `merge` its merge.

    Through str.translate and a Latin-1 encoding, both loops in C: loading GPT-2's tokenizer
    decodes 150,000 of these, too many for a Python loop over their characters.
    """
    try:
        data = token.translate(_data_gym_table()).encode("latin-1")
    except UnicodeEncodeError:  # a character above 255 that is not in the alphabet
        data = b""
    if len(data) == len(token):
        return data
    alphabet = _data_gym_alphabet()
    bad = next(c for c in token if c not in alphabet)
    raise TokenizerError(
        f"{source}{'' if merge is None else f': merge {merge}'}: token {token!r} has character {bad!r}, "
        f"which is not in the byte-level BPE alphabet"
    )


def _read(source) -> bytes:
    """The bytes of `source` (a path or an importlib Traversable); unreadable -> TokenizerError."""
    try:
        return source.read_bytes()
    except OSError as err:
        raise TokenizerError(f"{source}: cannot read tokenizer file: {err.strerror or err}") from err


def _check_sha256(data: bytes, source, expected: str) -> None:
    """Raise TokenizerError unless sha256(data) is `expected`."""
    found = hashlib.sha256(data).hexdigest()
    if found != expected:
        raise TokenizerError(
            f"{source}: sha256 mismatch, expected {expected}, found {found}; "
            f"the packaged tokenizer file is corrupt, reinstall numpy-gpt2"
        )


def _parse_merges(data: bytes, source) -> list[tuple[str, str]]:
    """The merge pairs of a vocab.bpe / merges.txt, in priority order."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    # The "#version: 0.2" header is optional here, so a merges file without it still loads.
    start = 1 if lines and lines[0].startswith("#version") else 0
    merges = []
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise TokenizerError(
                f"{source}: line {number} should hold two tokens separated by a space, found {line!r}"
            )
        merges.append((pair[0], pair[1]))
    return merges


def _parse_encoder(data: bytes, source) -> dict[str, int]:
    """The token -> id map of an encoder.json / vocab.json."""
    try:
        encoder = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{source}: malformed JSON ({err})") from None
    if not isinstance(encoder, dict):
        raise TokenizerError(f"{source}: expected a JSON object of token -> id, found {type(encoder).__name__}")
    for token, token_id in encoder.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise TokenizerError(f"{source}: token {token!r} has id {token_id!r}, expected an integer")
    return encoder


def _ranks_from_merges(merges: list[tuple[str, str]], source) -> dict[bytes, int]:
    """Single bytes take ranks 0..255, then each merge's product takes the next rank."""
    ranks = {bytes([b]): rank for rank, b in enumerate(_rank_ordered_bytes())}
    for number, (first, second) in enumerate(merges, start=1):
        ranks[_decode_data_gym(first, source, number) + _decode_data_gym(second, source, number)] = len(ranks)
    return ranks


def _check_encoder_agrees(ranks: dict[bytes, int], encoder: dict[str, int], encoder_source, merges_source) -> None:
    """Raise unless encoder.json gives every BPE token the rank the merges give it.

    tiktoken takes a token's id to be its merge priority, so an encoder.json that disagrees
    with its merges would encode to ids the model was never trained on.
    """
    special_id = encoder.get(ENDOFTEXT, EOS_TOKEN_ID)
    if special_id != EOS_TOKEN_ID:
        raise TokenizerError(f"{encoder_source}: {ENDOFTEXT} has id {special_id}, GPT-2 uses {EOS_TOKEN_ID}")
    ids = {
        _decode_data_gym(token, encoder_source): token_id
        for token, token_id in encoder.items()
        if token not in _NON_BPE_ENTRIES
    }
    if ids == ranks:
        return
    missing = [t for t in ranks if t not in ids]
    extra = [t for t in ids if t not in ranks]
    moved = [t for t in ranks if t in ids and ids[t] != ranks[t]]
    example = (
        f"token {moved[0]!r} has id {ids[moved[0]]} there but rank {ranks[moved[0]]} from the merges" if moved
        else f"token {missing[0]!r} is made by the merges but absent" if missing
        else f"token {extra[0]!r} is there but no merge makes it"
    )
    raise TokenizerError(
        f"{encoder_source} disagrees with {merges_source}: {len(missing)} tokens missing, "
        f"{len(extra)} extra, {len(moved)} with a different id; e.g. {example}"
    )


def _build_encoding(encoder_source, merges_source, expected_sha256: dict[str, str] | None = None) -> tiktoken.Encoding:
    """The GPT-2 tiktoken Encoding from an (encoder.json, vocab.bpe) pair.

    `expected_sha256`, if given, maps "encoder.json" / "vocab.bpe" to the hash each file must have.
    """
    encoder_data = _read(encoder_source)
    merges_data = _read(merges_source)
    if expected_sha256 is not None:
        _check_sha256(encoder_data, encoder_source, expected_sha256["encoder.json"])
        _check_sha256(merges_data, merges_source, expected_sha256["vocab.bpe"])
    ranks = _ranks_from_merges(_parse_merges(merges_data, merges_source), merges_source)
    _check_encoder_agrees(ranks, _parse_encoder(encoder_data, encoder_source), encoder_source, merges_source)
    if len(ranks) != EOS_TOKEN_ID:
        raise TokenizerError(
            f"{merges_source}: the merges make {len(ranks)} tokens, GPT-2 has {EOS_TOKEN_ID} "
            f"before {ENDOFTEXT}"
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOS_TOKEN_ID},
        explicit_n_vocab=N_VOCAB,
    )


def find_tokenizer_files(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path] | None:
    """The (vocab, merges) pair in `directory`, or None if it holds neither pair.

    Half a pair is an error rather than a silent fall back to the packaged files, which could
    tokenize a different vocabulary wrongly.
    """
    for vocab_name, merges_name in _FILE_PAIRS:
        vocab, merges = directory / vocab_name, directory / merges_name
        if vocab.is_file() and merges.is_file():
            return vocab, merges
        if vocab.is_file() or merges.is_file():
            present, absent = (vocab, merges) if vocab.is_file() else (merges, vocab)
            raise TokenizerError(f"{directory}: has {present.name} but not {absent.name}, which goes with it")
    return None


class Tokenizer:
    """GPT-2's byte-level BPE: text <-> token ids, with ids in [0, 50257) and 50256 = <|endoftext|>.

    Build one with `Tokenizer.default()`, `Tokenizer.from_pretrained(...)` or
    `Tokenizer.from_files(...)`; the work is done by the wrapped `tiktoken.Encoding`.
    """

    def __init__(self, encoding: tiktoken.Encoding):
        """Wrap a tiktoken Encoding of the GPT-2 vocabulary."""
        self._encoding = encoding

    @classmethod
    @functools.lru_cache(maxsize=1)
    def default(cls) -> "Tokenizer":
        """The tokenizer from the packaged files, hash-checked and built once per process."""
        return cls(_build_encoding(*packaged_files(), PACKAGED_SHA256))

    @classmethod
    def from_files(cls, encoder_json_path: str | os.PathLike, merges_path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer from an encoder.json (or vocab.json) and its vocab.bpe (or merges.txt)."""
        return cls(_build_encoding(pathlib.Path(encoder_json_path), pathlib.Path(merges_path)))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None) -> "Tokenizer":
        """The tokenizer for a model directory, a file inside one, or a model name.

        A directory (or the directory of a file such as model.safetensors) is searched for
        vocab.json + merges.txt, then encoder.json + vocab.bpe; if it has neither, or
        `name_or_path` is None or a model name ("gpt2", "gpt2-medium", "distilgpt2", ...),
        the packaged files are used, since every GPT-2 size shares one tokenizer.
        """
        if name_or_path is not None:
            path = pathlib.Path(name_or_path)
            directory = path if path.is_dir() else path.parent if path.is_file() else None
            found = find_tokenizer_files(directory) if directory is not None else None
            if found is not None:
                return cls.from_files(*found)
        return cls.default()

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken Encoding."""
        return self._encoding

    @property
    def eos_token_id(self) -> int:
        """The id of <|endoftext|>, which ends (and, in training, separates) documents: 50256."""
        return EOS_TOKEN_ID

    @property
    def n_vocab(self) -> int:
        """V, the number of token ids: 50257."""
        return self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a literal "<|endoftext|>" becomes 50256, as in Hugging Face's GPT-2."""
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (a list or 1-D int array); invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (a list or 1-D int array), which need not be valid UTF-8."""
        return self._encoding.decode_bytes(self._checked_ids(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token, which may be part of a UTF-8 character."""
        return self._encoding.decode_single_token_bytes(self._checked_id(token_id))

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Each token's text on its own, for display; a partial character shows as U+FFFD."""
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in ids]

    def stream_decoder(self) -> "StreamDecoder":
        """A fresh StreamDecoder for turning ids into text one at a time."""
        return StreamDecoder(self)

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the text of `ids` in non-empty pieces, each as soon as its characters are whole."""
        decoder = self.stream_decoder()
        for token_id in ids:
            piece = decoder.push(token_id)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def _checked_id(self, token_id) -> int:
        """`token_id` as an int, or TokenizerError if it is outside [0, n_vocab)."""
        # operator.index accepts numpy integers but refuses floats, which would truncate silently.
        token_id = operator.index(token_id)
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"token id {token_id} is out of range [0, {self.n_vocab})")
        return token_id

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        """`ids` as a list of ints, each checked to be in [0, n_vocab)."""
        return [self._checked_id(i) for i in ids]


class StreamDecoder:
    """Turn token ids into text one id at a time, never emitting half a character.

    A character can span several byte-level tokens (emoji, CJK), so the trailing bytes of an
    incomplete UTF-8 sequence are held back until the token that completes it arrives.
    """

    def __init__(self, tokenizer: Tokenizer):
        """Start with nothing held back."""
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes, possibly ""."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Return the text still held back, an incomplete character as U+FFFD; then start afresh."""
        return self._utf8.decode(b"", final=True)
