"""The tokenizer on real text and on generated strings, against tiktoken and transformers.

References: tiktoken's own "gpt2" encoding and Hugging Face's GPT2Tokenizer, both built from
../shared/data/gpt2-bpe (conftest: tiktoken_gpt2, hf_gpt2_tokenizer); the tests skip without them.

Real text: every line (newline kept) of the first 1 MB of the Python standard library's
sources, files in sorted order, and of Debian's fortune files (the bundled model's corpus) when
installed; a file that is not UTF-8 is left out whole. Generated text: hypothesis strings of
each kind the pre-tokenizer treats apart (letters with apostrophes in both cases, whitespace
runs, digits, emoji sequences, any Unicode), derandomized so every run tries the same strings.

Lone surrogates cannot be encoded as UTF-8. tiktoken replaces them, encoding
s.encode("utf-16", "surrogatepass").decode("utf-16", "replace"): a high and a low surrogate
in a row become the character they pair to, any other surrogate U+FFFD. Encoding does the same
(transformers refuses such a string with a TypeError, so tiktoken is the reference there).
"""

import pathlib
import sysconfig

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numpy_gpt2.tokenizer import Tokenizer

CORPUS_BYTES = 1_000_000
FORTUNES = pathlib.Path("/usr/share/games/fortunes")

# Fixed examples, derandomized search, and a bound on the examples and the time.
PROPERTY = settings(derandomize=True, max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _utf8_lines(paths, limit=None) -> list[str]:
    """Every line, newline kept, of the UTF-8 files among `paths` in order, until `limit` bytes."""
    lines, total = [], 0
    for path in paths:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        lines += text.splitlines(keepends=True)
        total += len(text.encode("utf-8"))
        if limit is not None and total >= limit:
            break
    return lines


def _stdlib_lines() -> list[str]:
    lines = _utf8_lines(sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")), CORPUS_BYTES)
    assert sum(len(line.encode("utf-8")) for line in lines) >= CORPUS_BYTES
    return lines


def _fortune_lines() -> list[str]:
    """The fortune files the bundled model's corpus.py reads (no suffix: not the .dat indexes)."""
    if not FORTUNES.is_dir():
        pytest.skip(f"needs Debian's fortune files in {FORTUNES} (package fortunes)")
    return _utf8_lines(sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix and not p.is_symlink()))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def _first_difference(lines, ours, theirs) -> str:
    for line, a, b in zip(lines, ours, theirs):
        if a != b:
            return f"{line!r}: ours {a}, reference {b}"
    return "none"


@pytest.mark.parametrize("corpus", [_stdlib_lines, _fortune_lines], ids=["python-stdlib", "fortunes"])
def test_every_line_of_a_corpus(tok, tiktoken_gpt2, hf_gpt2_tokenizer, corpus):
    lines = corpus()
    ours = [tok.encode(line) for line in lines]
    expected = tiktoken_gpt2.encode_batch(lines, allowed_special="all")
    assert ours == expected, _first_difference(lines, ours, expected)
    expected = hf_gpt2_tokenizer(lines)["input_ids"]
    assert ours == expected, _first_difference(lines, ours, expected)
    assert [tok.decode(ids) for ids in ours] == lines


_CONTRACTIONS = ["'", "s", "d", "m", "t", "ll", "ve", "re", "S", "D", "M", "T", "LL", "Ll", "lL", "VE", "Ve", "RE",
                 "rE", "O", "Reilly", "Dear", " ", "\u2019", "''"]
_EMOJI = ["😀", "🤗", "👍", "🏽", "\u200d", "👨", "👩", "🇫", "🇷", "❤", "\ufe0f", "🧑", "🍳",
          " ", "a"]


def _pieces(pieces, max_size=12):
    return st.lists(st.sampled_from(pieces), max_size=max_size).map("".join)


KINDS = {
    "apostrophes-and-letters": _pieces(_CONTRACTIONS),
    "whitespace-runs": st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003\u3000\u2028xY.", max_size=30),
    "digits": st.text(alphabet="0123456789 ,.-+e\u0663\u00bd\u2155x", max_size=30),
    "emoji": _pieces(_EMOJI),
    "any-unicode": st.text(max_size=40),
}


@pytest.mark.parametrize("kind", KINDS)
def test_generated_strings_match_tiktoken_and_transformers(tok, tiktoken_gpt2, hf_gpt2_tokenizer, kind):
    @PROPERTY
    @given(KINDS[kind])
    def check(text):
        ids = tok.encode(text)
        assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
        assert ids == hf_gpt2_tokenizer.encode(text)
        assert tok.decode(ids) == text

    check()


@pytest.mark.parametrize("text, pieces", [
    ("O'Reilly", ["O", "'", "Reilly"]),
    ("'Dear", ["'", "Dear"]),
    ("'S", ["'", "S"]),
    ("'LL", ["'", "LL"]),
    ("it's", ["it", "'s"]),
    ("we'll", ["we", "'ll"]),
])
def test_contractions_are_lower_case_only(tok, text, pieces):
    """GPT-2's pattern splits off 's 't 're 've 'm 'll 'd in lower case only: in upper case the
    apostrophe and the word are pieces of their own (OpenAI's encoder.py pattern); each piece
    here is one token of the vocabulary."""
    assert tok.pieces(tok.encode(text)) == pieces


def _tiktoken_text(text: str) -> str:
    """What tiktoken encodes for a string holding surrogates (its Encoding.encode)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@PROPERTY
@given(st.lists(st.one_of(st.characters(categories=["Cs"]), st.sampled_from(["a", " ", "'s", "😀", "é"])),
                min_size=1, max_size=12).map("".join))
def test_lone_surrogates_encode_as_tiktoken_does(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == _tiktoken_text(text)


def test_lone_surrogates_against_tiktoken(tok, tiktoken_gpt2):
    for text in ["\ud800", "a\udfffb", "\ud83d\ude00", "x\ud83d", "\ude00\ud83d", "it\udc80's"]:
        assert tok.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all"), repr(text)
        assert tok.decode(tok.encode(text)) == _tiktoken_text(text)
