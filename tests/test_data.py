"""numpy_gpt2.data: `prepare` (and `numpy-gpt2 prepare`), reading the files back, batches.

References trusted here: tiktoken's own "gpt2" encoding (the `ref` fixture of test_tokenizer,
built from the shared BPE files) for the token ids; hashlib for the sha256 of each source;
NumPy's reading of raw uint16 files; and the text itself, for what each batch row must be.
"""

import hashlib
import io
import json
from unittest import mock

import numpy as np
import pytest

from numpy_gpt2 import cli, data, threads
from numpy_gpt2.data import Progress, load_tokens, prepare, sample_batch
from numpy_gpt2.errors import GPT2Error

from test_tokenizer import TEXTS, ref  # noqa: F401 (the tiktoken fixture)

EOT = 50256
# Whitespace runs across line ends, CRLF, blank lines, trailing spaces, a literal
# <|endoftext|>, text with no newline at all: where a careless cut between pieces changes ids.
TRICKY = ("Line one.\n\n\nLine   two  \n \nthree\r\n\r\n  four\tfive\n" * 40 + "block\n" + "\n" * 37 + "  indented\n"
          + "<|endoftext|> after\n" + "".join(TEXTS.values()) + "no newline at the end")


def reference_stream(ref, texts):
    ids = []
    for i, text in enumerate(texts):
        ids += ([EOT] if i else []) + ref.encode(text, allowed_special="all")
    return ids


def read_ids(path):
    return np.fromfile(path, dtype="<u2").tolist()


@pytest.mark.parametrize("chunk", [16, 100, 1 << 20])
def test_prepare_ids_are_tiktokens_with_eot_between_files(tmp_path, ref, monkeypatch, chunk):  # noqa: F811
    # Small chunks make the tokenizer see the text in many pieces; the ids must not change.
    monkeypatch.setattr(data, "_CHUNK_CHARS", chunk)
    texts = [TRICKY, "Second file: café 😀\n", "x"]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_bytes(text.encode("utf-8"))
    meta = prepare(files, tmp_path / "out", val_fraction=0.1, progress=False)
    expected = reference_stream(ref, texts)
    train, val = read_ids(tmp_path / "out" / "train.bin"), read_ids(tmp_path / "out" / "val.bin")
    assert train + val == expected
    assert len(val) == round(0.1 * len(expected))
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2" and meta["val_fraction"] == 0.1
    for source, path, text in zip(meta["sources"], files, texts):
        assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert source["tokens"] == len(ref.encode(text, allowed_special="all"))


def test_prepare_again_replaces_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("one two three four five six seven eight nine ten\n" * 20)
    prepare([tmp_path / "a.txt"], tmp_path / "out", progress=False)
    (tmp_path / "a.txt").write_text("short text\n" * 5)
    meta = prepare([tmp_path / "a.txt"], tmp_path / "out", val_fraction=0.5, progress=False)
    train, val, read_meta = load_tokens(tmp_path / "out")
    assert (train.size, val.size) == (meta["train_tokens"], meta["val_tokens"]) and read_meta == meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("case, message", [
    ("missing", r"missing.txt: no such file"),
    ("empty", r"empty.txt: is empty"),
    ("directory", r"is not a file"),
    ("not-utf8", r"latin1.txt: not UTF-8 text \(invalid continuation byte: byte 0xe9\)"),
    ("fraction-0", r"--val-fraction \(val_fraction\) must be in \(0, 1\), found 0"),
    ("fraction-1", r"--val-fraction \(val_fraction\) must be in \(0, 1\), found 1"),
    ("out-is-file", r"--out .*out.txt: is a file, expected a directory"),
    ("out-holds-other", r"--out .*: holds other files \(notes.md\)"),
    ("too-few", r"the input has 1 tokens, too few to split"),
])
def test_prepare_errors(tmp_path, case, message):
    good = tmp_path / "good.txt"
    good.write_text("some text to tokenize\n")
    files, out, fraction = [good], tmp_path / "out", 0.05
    if case == "missing":
        files = [tmp_path / "missing.txt"]
    elif case == "empty":
        (tmp_path / "empty.txt").write_bytes(b"")
        files = [good, tmp_path / "empty.txt"]
    elif case == "directory":
        files = [tmp_path]
    elif case == "not-utf8":
        (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
        files = [tmp_path / "latin1.txt"]
    elif case.startswith("fraction"):
        fraction = int(case[-1])
    elif case == "out-is-file":
        out = tmp_path / "out.txt"
        out.write_text("")
    elif case == "out-holds-other":
        out.mkdir()
        (out / "notes.md").write_text("mine")
    elif case == "too-few":
        (tmp_path / "one.txt").write_text("x")
        files = [tmp_path / "one.txt"]
    with pytest.raises(GPT2Error, match=message):
        prepare(files, out, val_fraction=fraction, progress=False)
    assert not (tmp_path / "out" / "train.bin").exists()
    assert not [p for p in tmp_path.rglob(".*.tmp")], "a temporary file was left behind"


def test_cli_prepare(tmp_path, capsys, ref):  # noqa: F811
    (tmp_path / "a.txt").write_text("Hello world\n" * 50)
    (tmp_path / "b.txt").write_text("Goodbye\n")
    assert cli.main(["prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(tmp_path / "d"),
                     "--val-fraction", "0.2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "train.bin" in printed and "val.bin" in printed
    ids = read_ids(tmp_path / "d" / "train.bin") + read_ids(tmp_path / "d" / "val.bin")
    assert ids == reference_stream(ref, ["Hello world\n" * 50, "Goodbye\n"])


@pytest.mark.parametrize("args, message", [
    (["missing.txt", "--out", "d"], "numpy-gpt2: error: missing.txt: no such file"),
    (["a.txt", "--out", "d", "--val-fraction", "1.5"], "argument --val-fraction: must be in (0, 1), found 1.5"),
    (["a.txt", "--out", "a.txt"], "--out a.txt: is a file, expected a directory"),
])
def test_cli_prepare_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text\n")
    status = run_cli("prepare", *args)
    err = capsys.readouterr().err
    assert status != 0 and message in err and err.count("\n") == 1, err


def run_cli(*args):
    """cli.main in this process -> its exit status (argparse's errors exit by SystemExit).

    cli.main chooses the BLAS's kernels for the process it runs in (`choose_blas_kernels`);
    here that is pytest's, whose other tests expect the BLAS as it was, so the choice is skipped.
    """
    with mock.patch.object(threads, "choose_blas_kernels", lambda: None):
        try:
            return cli.main([str(a) for a in args])
        except SystemExit as exc:
            return exc.code


def test_load_tokens_errors(tmp_path):
    with pytest.raises(GPT2Error, match=r"--data .*nowhere: no such directory"):
        load_tokens(tmp_path / "nowhere")
    (tmp_path / "train.bin").write_bytes(np.arange(10, dtype="<u2").tobytes())
    with pytest.raises(GPT2Error, match=r"no val.bin; make it with `numpy-gpt2 prepare"):
        load_tokens(tmp_path)
    (tmp_path / "val.bin").write_bytes(np.arange(3, dtype="<u2").tobytes())
    train, val, meta = load_tokens(tmp_path)  # nanoGPT's own prepare.py writes no meta.json
    assert train.tolist() == list(range(10)) and val.tolist() == [0, 1, 2] and meta is None
    (tmp_path / "meta.json").write_text(json.dumps({"train_tokens": 10, "val_tokens": 4}))
    with pytest.raises(GPT2Error, match=r"meta.json counts 10 \+ 4 tokens, the files hold 10 \+ 3"):
        load_tokens(tmp_path)


def test_sample_batch_rows_are_slices_at_seeded_offsets():
    tokens = np.arange(20, dtype="<u2")  # each row's first token is its offset
    batch = sample_batch(tokens, 500, 5, np.random.default_rng(3))
    assert batch.shape == (500, 5) and batch.dtype == np.int64
    assert (batch == batch[:, :1] + np.arange(5)).all()
    # Every offset 0..len - T is reached, and none past it.
    assert set(batch[:, 0]) == set(range(16))
    again = sample_batch(tokens, 500, 5, np.random.default_rng(3))
    np.testing.assert_array_equal(batch, again)


def test_progress_line():
    stream = io.StringIO()
    bar = Progress(10, stream=stream, delay=0)
    bar.update(2, "step 2/10")
    bar.update(5, "step 5/10")  # within 10 s of the last line: not drawn on a non-terminal
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step 2/10 |  20%") and lines[-1].startswith("step 5/10 |  50%")
    quiet = io.StringIO()
    bar = Progress(10, enabled=False, stream=quiet, delay=0)
    bar.update(5, "x")
    bar.close()
    assert quiet.getvalue() == ""
