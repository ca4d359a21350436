"""`numpy-gpt2 score`, run as a user runs it: a subprocess of `python -m numpy_gpt2` (the
helpers of test_cli.py).

References trusted here: transformers' logits on the tiny reference checkpoint, through
torch.log_softmax and torch.topk over the perplexity guide's windows (test_score.py's
`reference_logprobs`), and pyarrow reading the Parquet files back.
"""

import json
import math

import numpy as np
import pytest

from numpy_gpt2.tokenizer import Tokenizer
from test_cli import _ok, _run, env  # noqa: F401 (env: the fixture, used by name)
from test_score import _texts, reference_logprobs

FLOAT32_RTOL = 1e-5  # the NLL's float32 agreement (test_score.py)


@pytest.fixture(scope="module")
def texts():
    """Texts of the words the tiny vocabulary has: 3, 60 (two windows at --stride 30) and 1 token."""
    return _texts(Tokenizer.default(), [3, 60, 1], seed=4)


def test_one_text_as_argument_file_and_stdin(tiny_ref, env, texts, tmp_path):
    text = texts[1]
    ids = np.array(Tokenizer.default().encode(text))
    reference, top_ids, _ = reference_logprobs(tiny_ref.torch_model, ids, 30, "float32", top_k=3)
    model = ("--model", tiny_ref.hub_dir, "--stride", 30)
    got = json.loads(_ok(_run(env, "score", text, *model, "--json", "--top-k", 3)))
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == len(text.encode())
    assert got["nll"] == pytest.approx(-reference.sum(), rel=FLOAT32_RTOL)
    assert got["perplexity"] == pytest.approx(math.exp(-reference.mean()), rel=FLOAT32_RTOL)
    assert got["bits_per_byte"] == pytest.approx(-reference.sum() / math.log(2) / len(text.encode()), rel=FLOAT32_RTOL)
    assert [row["position"] for row in got["per_token"]] == list(range(1, len(ids)))
    assert [row["id"] for row in got["per_token"]] == ids[1:].tolist()
    assert [[t["id"] for t in row["top"]] for row in got["per_token"]] == top_ids.tolist()
    (tmp_path / "text.txt").write_text(text)
    as_file = _ok(_run(env, "score", tmp_path / "text.txt", *model))
    assert as_file == _ok(_run(env, "score", "-", *model, input=text + "\n")) == _ok(_run(env, "score", text, *model))
    assert f"nll            {-reference.sum():.2f}" in as_file  # 2 decimals: within float32's agreement
    table = _ok(_run(env, "score", text, *model, "--per-token")).splitlines()
    assert table[0].split() == ["position", "id", "piece", "log-prob"]
    assert [float(line.split()[-1]) for line in table[1:len(ids)]] == pytest.approx(reference, abs=1e-4)


def test_one_token_text_scores_nothing(tiny_ref, env, texts):
    got = json.loads(_ok(_run(env, "score", texts[2], "--model", tiny_ref.hub_dir, "--json")))
    assert got == {"tokens": 0, "nll": 0.0, "perplexity": None, "bits_per_byte": None, "bytes": len(texts[2])}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    """Two JSON Lines files, a bad line in each, matched by one glob: (directory, lines in order)."""
    directory = tmp_path_factory.mktemp("corpus")
    a = [json.dumps({"id": "a0", "text": texts[0]}), "{not json", json.dumps({"id": "a2", "text": texts[1]})]
    b = [json.dumps({"text": texts[2]}), json.dumps({"id": "b1", "body": "no text"}),
         json.dumps({"id": "b2", "text": texts[1]})]
    (directory / "a.jsonl").write_text("\n".join(a) + "\n")
    (directory / "b.jsonl").write_text("\n".join(b))
    return directory


def _rows(out_dir):
    return [json.loads(line) for path in sorted(out_dir.glob("part-*.jsonl")) for line in path.read_text().splitlines()]


def test_documents_in_input_order_with_error_rows(tiny_ref, env, texts, corpus, tmp_path):
    out = tmp_path / "out"
    result = _run(env, "score", corpus / "*.jsonl", "--out", out, "--model", tiny_ref.hub_dir, "--stride", 30,
                  "--partition-size", 2, "--quiet")
    assert result.returncode == 0, result.stderr
    a, b = corpus / "a.jsonl", corpus / "b.jsonl"
    assert result.stderr.splitlines() == [f"numpy-gpt2: {a}:2: not JSON: Expecting property name enclosed in "
                                          "double quotes at column 2", f"numpy-gpt2: {b}:2: no field 'text'"]
    assert sorted(p.name for p in out.iterdir()) == [f"part-0000{f}-0000{i}.jsonl" for f in (0, 1) for i in (0, 1)]
    rows = _rows(out)
    assert [row["id"] for row in rows] == ["a0", f"{a}:2", "a2", f"{b}:1", "b1", "b2"]
    assert [row["error"] is None for row in rows] == [True, False, True, True, False, True]
    ids = np.array(Tokenizer.default().encode(texts[1]))
    nll = -reference_logprobs(tiny_ref.torch_model, ids, 30, "float32")[0].sum()
    for row in (rows[2], rows[5]):
        assert row["tokens"] == len(ids) - 1 and row["nll"] == pytest.approx(nll, rel=FLOAT32_RTOL)
    assert rows[3]["tokens"] == 0 and rows[3]["perplexity"] is None

    # Resuming: a partition file that is there is not written again, a missing one is.
    kept, removed = out / "part-00000-00000.jsonl", out / "part-00001-00000.jsonl"
    kept.write_text('{"id": "sentinel"}\n')
    removed.unlink()
    _ok_or_bad_lines = _run(env, "score", corpus / "*.jsonl", "--out", out, "--model", tiny_ref.hub_dir,
                            "--stride", 30, "--partition-size", 2, "--quiet")
    assert _ok_or_bad_lines.returncode == 0
    assert _ok_or_bad_lines.stderr.splitlines() == [f"numpy-gpt2: {b}:2: no field 'text'"]  # only the rerun partition
    again = _rows(out)
    assert again[0] == {"id": "sentinel"} and again[1:] == rows[2:]


def test_on_error_fail_stops_at_the_bad_line(tiny_ref, env, corpus, tmp_path):
    result = _run(env, "score", corpus / "a.jsonl", "--out", tmp_path / "out", "--model", tiny_ref.hub_dir,
                  "--on-error", "fail", "--quiet")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"numpy-gpt2: error: {corpus / 'a.jsonl'}:2: not JSON: Expecting property name " \
                            "enclosed in double quotes at column 2\n"


def test_parquet_output_read_back(tiny_ref, env, corpus, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    common = (corpus / "b.jsonl", corpus / "a.jsonl", "--model", tiny_ref.hub_dir, "--stride", 30, "--quiet")
    assert _run(env, "score", *common, "--out", tmp_path / "j").returncode == 0
    assert _run(env, "score", *common, "--out", tmp_path / "p", "--format", "parquet").returncode == 0
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["part-00000-00000.parquet", "part-00001-00000.parquet"]  # b.jsonl first, as given
    table = [row for name in names for row in pq.read_table(tmp_path / "p" / name).to_pylist()]
    assert table == _rows(tmp_path / "j")


@pytest.mark.parametrize("args, message", [
    (("a", "b"), "give one text (a FILE, - or the text itself), or JSON Lines files with --out DIR"),
    ((" the", "--format", "parquet"), "--format is for many documents: give --out DIR"),
    ((" the", "--dask", "local:2"), "--dask is for many documents: give --out DIR"),
    (("x.jsonl", "--out", "o", "--per-token"), "--per-token is for one text; with --out each document gets one row"),
    (("x.jsonl", "--out", "o", "--plot", "p.png"), "--plot is for one text; with --out each document gets one row"),
    ((" the", "--stride", 40), "--stride 40 must be less than the model's context, n_positions=40"),
    ((" the", "--top-k", 1001), "--top-k 1001 exceeds the model's vocabulary of 1000"),
    (("--out", "o"), "--out DIR needs the JSON Lines files to score"),
    (("nothing/*.jsonl", "--out", "o"), "no file matches 'nothing/*.jsonl'"),
    ((" the cat",), "the text has token 3797, outside the model's vocabulary 0..999"),
])
def test_bad_use_is_one_line_naming_the_flag(tiny_ref, env, args, message):
    result = _run(env, "score", *args, "--model", tiny_ref.hub_dir)
    assert result.returncode == 1
    assert result.stderr.startswith(f"numpy-gpt2: error: {message}") and result.stderr.count("\n") == 1


def test_a_jsonl_file_without_out_asks_for_it(tiny_ref, env, corpus):
    result = _run(env, "score", corpus / "a.jsonl", "--model", tiny_ref.hub_dir)
    assert result.returncode == 1
    assert result.stderr == f"numpy-gpt2: error: {corpus / 'a.jsonl'} is JSON Lines: give --out DIR to score its " \
                            "documents, one row each\n"
