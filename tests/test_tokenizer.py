"""Tests of numpy_gpt2.tokenizer against independent references.

References trusted here:
- tiktoken's own "gpt2" encoding, built by tiktoken from OpenAI's files (it checks their hashes);
- Hugging Face's GPT2Tokenizer, built from the same files as a model directory;
- Python's UTF-8 codec, for what a byte string decodes to.
Both references read the files in ../shared/data/gpt2-bpe; without them those tests skip.
"""

import hashlib
import json
import re
import pathlib
import shutil

import numpy as np
import pytest

from numpy_gpt2 import tokenizer as tokenizer_module
from numpy_gpt2.errors import TokenizerError
from numpy_gpt2.tokenizer import Tokenizer

SHARED_BPE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2-bpe"

# (vocab, merges) names: a Hugging Face model directory, then OpenAI's download.
FILE_NAMINGS = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]

TEXTS = {
    "ascii-prose": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "accents": "Café naïve résumé Ångström Zürich façade jalapeño",
    "cjk": "日本語のテキストと中文文本，한국어 텍스트",
    "emoji": "Emoji 😀 and 🤗, hearts ❤️ and stars ⭐!",
    "emoji-zwj": "family 👨\u200d👩\u200d👧\u200d👦 and cook 🧑\u200d🍳",
    "flags-skin-tones": "🇫🇷🇯🇵🇺🇸 thumbs 👍🏽👍🏿",
    "whitespace-runs": "multiple   spaces\tand\t\ttabs\n\nnewlines\r\n  trailing   ",
    "leading-and-only-space": "   \n\t  ",
    "endoftext-middle": "first document<|endoftext|>second document",
    "endoftext-spaced": "a <|endoftext|> b\n<|endoftext|><|endoftext|>",
    "empty": "",
    "digits-punctuation": "3.14159 2024-01-01 $1,000,000 (50%) #tag @user!? 12345678901234567890",
    "contractions": "I'm, you'll, they've, she's, we'd, it's, I'M, YOU'LL",
    "symbols": "ﬁ ligature, Ω ≈ ∑ € ¥ \u00a0nbsp, zero\u200bwidth, combining e\u0301",
    "code": "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\n",
}

# Texts whose characters span several byte-level tokens.
MULTIBYTE_TEXTS = ["cjk", "emoji", "emoji-zwj", "flags-skin-tones"]


def shared_file(name: str) -> pathlib.Path:
    """A file of the shared GPT-2 BPE data, or skip the test naming the file it wanted."""
    path = SHARED_BPE / name
    if not path.is_file():
        pytest.skip(f"reference tokenizer file {path} is absent")
    return path


def make_model_dir(directory: pathlib.Path, vocab_name: str, merges_name: str) -> pathlib.Path:
    """Copy the shared files into `directory` under the given names."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared_file("encoder.json"), directory / vocab_name)
    shutil.copyfile(shared_file("vocab.bpe"), directory / merges_name)
    return directory


@pytest.fixture(scope="session")
def ref(tiktoken_gpt2):
    """tiktoken's own gpt2 Encoding (see conftest)."""
    return tiktoken_gpt2


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """A model directory holding the shared files as vocab.json + merges.txt."""
    return make_model_dir(tmp_path_factory.mktemp("hf-gpt2"), "vocab.json", "merges.txt")


@pytest.fixture(scope="session")
def hf(hf_gpt2_tokenizer):
    """Hugging Face's GPT2Tokenizer from the shared files (see conftest)."""
    return hf_gpt2_tokenizer


@pytest.fixture
def tok():
    """The tokenizer under test, from the packaged files."""
    return Tokenizer.default()


@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_tiktoken(tok, ref, name):
    text = TEXTS[name]
    assert tok.encode(text) == ref.encode(text, allowed_special="all")


@pytest.mark.parametrize("name", TEXTS)
def test_encode_matches_transformers(tok, hf, name):
    text = TEXTS[name]
    assert tok.encode(text) == hf.encode(text)


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip(tok, hf, name):
    text = TEXTS[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text
    assert hf.decode(ids) == text


def test_every_token_has_tiktokens_bytes(tok, ref):
    assert tok.n_vocab == ref.n_vocab == 50257
    assert tok.eos_token_id == ref.eot_token == 50256
    assert [tok.token_bytes(i) for i in range(tok.n_vocab)] == [
        ref.decode_single_token_bytes(i) for i in range(ref.n_vocab)
    ]


def test_pieces_and_decode_bytes(tok, ref):
    ids = ref.encode(TEXTS["emoji-zwj"] + TEXTS["accents"])
    assert tok.pieces(ids) == [ref.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids]
    assert tok.decode_bytes(ids) == ref.decode_bytes(ids)


def test_invalid_utf8_is_replaced(tok, ref):
    # Reference: Python's UTF-8 codec on the bytes tiktoken gives for these ids.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, size=2000)
    assert tok.decode(ids) == ref.decode_bytes(ids.tolist()).decode("utf-8", errors="replace")


@pytest.mark.parametrize("vocab_name, merges_name", FILE_NAMINGS)
@pytest.mark.parametrize("point_at", ["directory", "file inside"])
def test_from_pretrained_model_dir(tmp_path, ref, vocab_name, merges_name, point_at):
    model_dir = make_model_dir(tmp_path / "model", vocab_name, merges_name)
    target = model_dir
    if point_at == "file inside":
        target = model_dir / "model.safetensors"
        target.write_bytes(b"not read by the tokenizer")
    text = " ".join(TEXTS.values())
    assert Tokenizer.from_pretrained(target).encode(text) == ref.encode(text, allowed_special="all")


def test_from_files(ref, hf_model_dir):
    tokenizer = Tokenizer.from_files(hf_model_dir / "vocab.json", hf_model_dir / "merges.txt")
    text = " ".join(TEXTS.values())
    assert tokenizer.encode(text) == ref.encode(text, allowed_special="all")


@pytest.mark.parametrize("name_or_path", [None, "gpt2", "gpt2-medium", "distilgpt2", "empty dir"])
def test_from_pretrained_falls_back_to_packaged(tmp_path, name_or_path):
    if name_or_path == "empty dir":
        name_or_path = tmp_path
    assert Tokenizer.from_pretrained(name_or_path) is Tokenizer.default()


@pytest.mark.parametrize("name", MULTIBYTE_TEXTS)
def test_stream_decoder_never_splits_a_character(tok, ref, name):
    text = TEXTS[name]
    ids = ref.encode(text)
    partial = [i for i in ids if not _is_utf8(ref.decode_single_token_bytes(i))]
    assert partial, "the text should need tokens holding part of a character"

    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    tail = decoder.flush()
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + tail == text
    assert tail == ""
    assert list(tok.decode_stream(ids)) == [piece for piece in pieces if piece]


def test_stream_decoder_matches_utf8_codec_on_random_ids(tok, ref):
    # Reference: Python's UTF-8 codec decoding the whole byte string at once.
    ids = np.random.default_rng(1).integers(0, 50257, size=2000).tolist()
    expected = ref.decode_bytes(ids).decode("utf-8", errors="replace")
    assert "".join(tok.decode_stream(ids)) == expected


def test_stream_decoder_flushes_an_incomplete_character(tok, ref):
    ids = ref.encode("🤗")
    decoder = tok.stream_decoder()
    assert decoder.push(ids[0]) == ""
    assert decoder.flush() == "\ufffd"
    assert list(tok.decode_stream(ids[:1])) == ["\ufffd"]


def _is_utf8(data: bytes) -> bool:
    """Whether `data` alone is valid UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("vocab_name, merges_name", FILE_NAMINGS)
def test_corrupt_encoder_json(tmp_path, vocab_name, merges_name):
    model_dir = make_model_dir(tmp_path, vocab_name, merges_name)
    (model_dir / vocab_name).write_text('{"!": 0, "\\"": 1,')
    with pytest.raises(TokenizerError, match=rf"{vocab_name}: malformed JSON"):
        Tokenizer.from_pretrained(model_dir)


def _swap_two_ids(encoder: dict, merges: list[str]) -> tuple[dict, list[str]]:
    """encoder.json with the ids of "Ġthe" and "Ġa" exchanged."""
    encoder["Ġthe"], encoder["Ġa"] = encoder["Ġa"], encoder["Ġthe"]
    return encoder, merges


def _drop_last_merge(encoder: dict, merges: list[str]) -> tuple[dict, list[str]]:
    """vocab.bpe without its last merge, so encoder.json has a token no merge makes."""
    return encoder, merges[:-2] + [""]


@pytest.mark.parametrize("corrupt", [_swap_two_ids, _drop_last_merge])
def test_encoder_inconsistent_with_merges(tmp_path, corrupt):
    encoder = json.loads(shared_file("encoder.json").read_text(encoding="utf-8"))
    merges = shared_file("vocab.bpe").read_text(encoding="utf-8").split("\n")
    encoder, merges = corrupt(encoder, merges)
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("\n".join(merges), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"encoder\.json disagrees with .*vocab\.bpe"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", ["\u4e00", "\x7f", " "], ids=["above 255", "DEL", "space"])
@pytest.mark.parametrize("where", ["vocab.bpe", "encoder.json"])
def test_a_token_outside_the_byte_alphabet_is_named(tmp_path, where, bad):
    """A token holding a character that stands for no byte (one above 255 the alphabet does not
    use, or one below 256 it shifts away, such as DEL or space) is refused, naming the file, the
    merge, the token and the character."""
    encoder = json.loads(shared_file("encoder.json").read_text(encoding="utf-8"))
    merges = shared_file("vocab.bpe").read_text(encoding="utf-8").split("\n")
    if where == "vocab.bpe":
        last = max(i for i, line in enumerate(merges) if line.strip())
        first, second = merges[last].split()
        merges[last] = f"{first} {second}{bad}" if bad != " " else f"{first} {second} x"
        token, place = (f"{second}{bad}", "merge 50000") if bad != " " else (None, None)
    else:
        encoder[f"Ġthe{bad}"] = encoder.pop("Ġthe")
        token, place = f"Ġthe{bad}", None
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("\n".join(merges), encoding="utf-8")
    if token is None:  # a space splits a merge line in three
        expected = r"vocab\.bpe: line 50001 should hold two tokens"
    else:
        expected = (re.escape(f"{where}: {place + ': ' if place else ''}token {token!r} has character {bad!r}, ")
                    + "which is not in the byte-level BPE alphabet")
    with pytest.raises(TokenizerError, match=expected):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("modified", ["encoder.json", "vocab.bpe"])
def test_packaged_file_hash_mismatch(tmp_path, monkeypatch, modified):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(shared_file(name), tmp_path / name)
    # A trailing newline still parses, so only the hash check can catch it.
    with open(tmp_path / modified, "ab") as f:
        f.write(b"\n")
    expected = tokenizer_module.PACKAGED_SHA256[modified]
    found = hashlib.sha256((tmp_path / modified).read_bytes()).hexdigest()
    monkeypatch.setattr(tokenizer_module, "_packaged_data_dir", lambda: tmp_path)
    Tokenizer.default.cache_clear()
    try:
        with pytest.raises(TokenizerError, match=rf"{modified}: sha256 mismatch, expected {expected}, found {found}"):
            Tokenizer.default()
    finally:
        Tokenizer.default.cache_clear()


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"encoder\.json: cannot read"):
        Tokenizer.from_files(tmp_path / "encoder.json", shared_file("vocab.bpe"))


def test_half_a_pair(tmp_path):
    shutil.copyfile(shared_file("encoder.json"), tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match=r"has vocab\.json but not merges\.txt"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad_id", [50257, -1])
def test_out_of_range_id(tok, bad_id):
    message = rf"token id {bad_id} is out of range \[0, 50257\)"
    with pytest.raises(TokenizerError, match=message):
        tok.decode([15496, bad_id])
    with pytest.raises(TokenizerError, match=message):
        tok.decode(np.array([bad_id]))
    with pytest.raises(TokenizerError, match=message):
        tok.stream_decoder().push(bad_id)
