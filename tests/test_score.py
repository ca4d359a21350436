"""numpy_gpt2.score against Hugging Face transformers.

References trusted here: transformers' GPT2LMHeadModel logits on the tiny reference checkpoints
(conftest.py) and on the bundled fortunes model, turned into log-probabilities by
torch.log_softmax and ranked by torch.topk; the windows of transformers' perplexity guide,
written out below from the guide's loop; bits per byte from its definition, by hand.

The guide's own code averages each window's loss and weights it by trg_len - 1 (an off-by-one of
its `num_loss_tokens`, which counts the window's first label although the shift drops it), so its
printed perplexity is not the exact per-token one. The reference here is the exact version of
that recipe: per-token log-probabilities from the logits over the same windows, summed.
"""

import json
import math
import pathlib

import numpy as np
import pytest

from numpy_gpt2 import GPT2, ops
from numpy_gpt2.errors import GPT2Error
from numpy_gpt2.kernels import token_logprobs
from numpy_gpt2.score import (ScoreOptions, partition_output, plan_partitions, score_ids, score_partition, score_text,
                              score_texts)
from numpy_gpt2.tokenizer import Tokenizer

torch = pytest.importorskip("torch")

P = 40  # the tiny references' n_positions
FORTUNES = pathlib.Path(__file__).resolve().parents[1] / "weights" / "fortunes"
# Tolerances, relative, on a text's NLL: float64 leaves ~1e-15 (measured 4e-15 per token);
# float32 logits differ from torch's by ~1e-6 per token, far less on a sum (measured 3e-8).
NLL_RTOL = {"float64": 1e-9, "float32": 1e-5}
# Per token, absolute: float64 measured 4e-15; float32 measured 1.8e-6 (the logits' own error).
TOKEN_ATOL = {"float64": 1e-12, "float32": 1e-5}


def guide_windows(n_tokens, max_length, stride):
    """(begin, end, trg_len) of each window, as transformers' perplexity guide loops:

        prev_end_loc = 0
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc   # the labels counted: the window's last trg_len
            ...
            prev_end_loc = end_loc
            if end_loc == seq_len: break
    """
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def reference_logprobs(torch_model, ids, stride, dtype, top_k=0):
    """log p of each token after the first (index i: token i + 1), from transformers' logits over
    the guide's windows, each token from the window that counts it; and torch.topk of those
    log-softmax rows. Every token after the first must be counted exactly once."""
    model = torch_model.to(getattr(torch, dtype))
    n = len(ids)
    logprobs = np.full(n - 1, np.nan)
    top_ids, top_logprobs = np.zeros((n - 1, top_k), np.int64), np.zeros((n - 1, top_k))
    try:
        for begin, end, trg_len in guide_windows(n, model.config.n_positions, stride):
            with torch.no_grad():
                logits = model(torch.as_tensor(ids[None, begin:end])).logits[0]
            log_softmax = torch.log_softmax(logits, dim=-1)
            for t in range(end - trg_len, end):  # the counted labels, the token at t
                if t == begin:
                    continue  # the shift drops a window's first label
                assert np.isnan(logprobs[t - 1]), "a token counted twice"
                logprobs[t - 1] = float(log_softmax[t - begin - 1, ids[t]])
                if top_k:
                    values, where = torch.topk(log_softmax[t - begin - 1], top_k)
                    top_ids[t - 1], top_logprobs[t - 1] = where.numpy(), values.double().numpy()
    finally:
        torch_model.float()
    assert not np.isnan(logprobs).any(), "a token never counted"
    return logprobs, top_ids, top_logprobs


@pytest.fixture(scope="module")
def models(tiny_ref):
    return {dtype: GPT2.from_pretrained(tiny_ref.hub_dir, dtype=dtype) for dtype in ("float32", "float64")}


# Shorter than, equal to, one longer than, and several windows longer than n_positions = 40;
# strides 15 and 17 divide neither the length nor the window.
CASES = [(17, 512), (40, 512), (41, 20), (137, 15), (137, 17), (200, 39)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_tokens, stride", CASES)
def test_score_ids_matches_transformers_sliding_window(models, tiny_ref, dtype, n_tokens, stride):
    ids = np.random.default_rng(n_tokens + stride).integers(0, 1000, n_tokens)
    reference, _, _ = reference_logprobs(tiny_ref.torch_model, ids, stride, dtype)
    score = score_ids(models[dtype], ids, stride=stride)
    assert score.tokens == n_tokens - 1
    np.testing.assert_array_equal(score.ids, ids)
    np.testing.assert_allclose(score.logprobs, reference, rtol=0, atol=TOKEN_ATOL[dtype])
    nll = -reference.sum()
    assert score.nll == pytest.approx(nll, rel=NLL_RTOL[dtype])
    assert score.perplexity == pytest.approx(math.exp(nll / (n_tokens - 1)), rel=NLL_RTOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_top_k_matches_torch_topk(models, tiny_ref, dtype):
    ids = np.random.default_rng(7).integers(0, 1000, 90)
    reference, top_ids, top_logprobs = reference_logprobs(tiny_ref.torch_model, ids, 25, dtype, top_k=5)
    score = score_ids(models[dtype], ids, stride=25, top_k=5)
    assert score.top_ids.shape == score.top_logprobs.shape == (89, 5)
    np.testing.assert_array_equal(score.top_ids, top_ids)
    np.testing.assert_allclose(score.top_logprobs, top_logprobs, rtol=0, atol=TOKEN_ATOL[dtype])
    np.testing.assert_allclose(score.logprobs, reference, rtol=0, atol=TOKEN_ATOL[dtype])
    assert score_ids(models[dtype], ids, stride=25).top_ids is None


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_token_logprobs_kernel_matches_torch_log_softmax(dtype):
    """The head's reduction alone, against float64 torch on the same logits, of a wide range (a
    float32 exp underflows for the smallest): float64 to 1e-12 (measured 3e-14); float32 to 1e-7
    (measured 2e-8: the float32 exp's 2e-7 relative error on each term, summed in float64)."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((300, 5003)) * rng.uniform(0.1, 30, (300, 1))).astype(dtype)
    targets = rng.integers(0, 5003, 300)
    log_softmax = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
    values, where = torch.topk(log_softmax, 4)
    top_ids, top_logprobs = np.empty((300, 4), np.int64), np.empty((300, 4))
    logprobs = token_logprobs(logits.copy(), targets, top_ids, top_logprobs)
    atol = 1e-12 if dtype == "float64" else 1e-7
    np.testing.assert_allclose(logprobs, log_softmax[np.arange(300), targets].numpy(), rtol=0, atol=atol)
    np.testing.assert_array_equal(top_ids, where.numpy())
    np.testing.assert_allclose(top_logprobs, values.numpy(), rtol=0, atol=atol)
    # ops.log_softmax, the reference the kernel is the twin of, is the same function.
    np.testing.assert_allclose(ops.log_softmax(logits.astype(np.float64)), log_softmax.numpy(), rtol=0, atol=1e-12)


def _words(tokenizer):
    """Space-led words that are one token each, below the tiny vocabulary's 1000: any sequence
    of them tokenizes to exactly their ids."""
    return [i for i in range(1000) if (p := tokenizer.decode([i])).startswith(" ") and p[1:].isalpha()
            and tokenizer.encode(p) == [i]]


def _texts(tokenizer, lengths, seed=0):
    words = _words(tokenizer)
    rng = np.random.default_rng(seed)
    return [tokenizer.decode(rng.choice(words, n)) for n in lengths]


# Batched against alone, per token: float32 measured up to 1.3e-6 (another number of rows in a
# product sums in another order, and may take another path), bound 5e-6; float64 measured 4e-15.
BATCH_ATOL = {"float64": 1e-12, "float32": 5e-6}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batched_equals_alone(models, dtype):
    """Texts of many lengths (empty, one token, exactly P, several windows) batched up to 400
    positions a batch (so the head runs in several chunks of rows) against each scored alone."""
    tokenizer = Tokenizer.default()
    lengths = [0, 1, 2, 5, 39, 40, 41, 7, 40, 90, 13, 200, 33, 1, 60, 25, 25, 25, 3, 38]
    texts = _texts(tokenizer, lengths)
    model = models[dtype]
    batched = score_texts(model, tokenizer, texts, stride=17, max_batch_tokens=400)
    assert len(batched) == len(texts)
    for text, n, got in zip(texts, lengths, batched):
        alone = score_text(model, tokenizer, text, stride=17)
        assert got.tokens == alone.tokens == max(n - 1, 0)
        np.testing.assert_array_equal(got.ids, alone.ids)
        np.testing.assert_allclose(got.logprobs, alone.logprobs, rtol=0, atol=BATCH_ATOL[dtype])
        assert got.n_bytes == alone.n_bytes == len(text.encode("utf-8"))


def test_batched_matches_transformers(models, tiny_ref):
    """The batched path on its own against the reference, float64, so a bug shared by the batched
    and the alone path cannot hide behind their agreement."""
    tokenizer = Tokenizer.default()
    lengths = [12, 40, 3, 77, 40, 21]
    texts = _texts(tokenizer, lengths, seed=1)
    for text, got in zip(texts, score_texts(models["float64"], tokenizer, texts, stride=30, max_batch_tokens=160)):
        reference, _, _ = reference_logprobs(tiny_ref.torch_model, np.array(tokenizer.encode(text)), 30, "float64")
        np.testing.assert_allclose(got.logprobs, reference, rtol=0, atol=1e-12)


def test_empty_and_one_token_texts_score_nothing(models):
    tokenizer = Tokenizer.default()
    for text in ("", " the"):
        score = score_text(models["float32"], tokenizer, text)
        assert score.tokens == 0 and score.nll == 0.0 and len(score.logprobs) == 0
        assert math.isnan(score.perplexity) and math.isnan(score.bits_per_byte)
        assert score.n_bytes == len(text)
    assert score_ids(models["float32"], []).tokens == 0


def test_bits_per_byte_with_the_bundled_model():
    """A non-ASCII text (its UTF-8 bytes more than its characters) through a full vocabulary of
    50257 (the head in chunks of many columns): NLL against transformers on the same weights,
    bits per byte = nll / ln 2 / UTF-8 bytes, by hand."""
    transformers = pytest.importorskip("transformers")
    if not (FORTUNES / "model.safetensors").exists():
        pytest.skip(f"needs the bundled model in {FORTUNES}")
    text = "Café au lait, naïve résumé: 10 € — « Ça va ? » said the fortune cookie, twice. " * 6
    tokenizer = Tokenizer.from_pretrained(FORTUNES)
    model = GPT2.from_pretrained(FORTUNES, dtype="float64")
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(FORTUNES).eval()
    ids = np.array(tokenizer.encode(text))
    assert len(ids) > model.config.n_positions // 2
    reference, _, _ = reference_logprobs(torch_model, ids, 100, "float64")
    score = score_text(model, tokenizer, text, stride=100)
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)
    assert score.n_bytes == n_bytes
    assert score.nll == pytest.approx(-reference.sum(), rel=1e-9)
    assert score.bits_per_byte == pytest.approx(-reference.sum() / math.log(2) / n_bytes, rel=1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda m: score_ids(m, np.arange(50), stride=0), "stride must be a positive integer"),
    (lambda m: score_ids(m, np.arange(50), stride=True), "stride must be a positive integer"),
    (lambda m: score_ids(m, np.arange(50), stride=40), "stride 40 must be less than the model's n_positions=40"),
    (lambda m: score_ids(m, np.arange(50), top_k=-1), "top_k must be an integer in 0..1000"),
    (lambda m: score_ids(m, np.arange(50), top_k=1001), "top_k must be an integer in 0..1000"),
    (lambda m: score_ids(m, np.zeros((2, 5), int)), "ids must be one text's token ids, shape (N,)"),
    (lambda m: score_ids(m, [3, 1000]), "input_ids contains 1000, outside the vocabulary 0..999"),
    (lambda m: score_ids(m, [0.5, 1.0]), "input_ids must be integers"),
    (lambda m: score_text(m, Tokenizer.default(), b"the"), "text must be a str, found bytes"),
    (lambda m: score_text(m, Tokenizer.default(), " the\ud800"), "text is not valid Unicode"),
    (lambda m: score_texts(m, Tokenizer.default(), [" the"], max_batch_tokens=0), "max_batch_tokens must be"),
])
def test_bad_arguments_raise_gpt2error(models, call, message):
    with pytest.raises(GPT2Error) as info:
        call(models["float32"])
    assert message in str(info.value)


def test_stride_none_is_512_or_half_the_context(models, tiny_ref):
    """None: the guide's 512 where it fits (GPT-2's 1024), else n_positions // 2 = 20 here."""
    ids = np.random.default_rng(11).integers(0, 1000, 95)
    reference, _, _ = reference_logprobs(tiny_ref.torch_model, ids, 20, "float64")
    np.testing.assert_allclose(score_ids(models["float64"], ids, stride=None).logprobs, reference, rtol=0, atol=1e-12)


def test_a_short_text_ignores_a_stride_it_does_not_need(models, tiny_ref):
    """stride 512 > n_positions is no error for a text that fits one window."""
    ids = np.random.default_rng(3).integers(0, 1000, 30)
    reference, _, _ = reference_logprobs(tiny_ref.torch_model, ids, 512, "float64")
    np.testing.assert_allclose(score_ids(models["float64"], ids).logprobs, reference, rtol=0, atol=1e-12)


# ---- corpora: partitions of JSON Lines documents ---------------------------------------------

def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_plan_partitions_cuts_each_file_in_runs_of_lines_in_input_order(tmp_path):
    b = _jsonl(tmp_path / "b.jsonl", [f'{{"text": "b{i}"}}' for i in range(7)])
    a = _jsonl(tmp_path / "a.jsonl", [f'{{"text": "a{i}"}}' for i in range(2)])
    (tmp_path / "c.jsonl").write_text('{"text": "no newline at the end"}')
    options = ScoreOptions(partition_size=3)
    parts = plan_partitions([b, tmp_path / "[ac].jsonl"], options)
    assert [(p.path, p.start_line, p.stop_line, p.name) for p in parts] == [
        (str(b), 1, 4, "part-00000-00000"), (str(b), 4, 7, "part-00000-00001"), (str(b), 7, 8, "part-00000-00002"),
        (str(a), 1, 3, "part-00001-00000"), (str(tmp_path / "c.jsonl"), 1, 2, "part-00002-00000")]
    # Each partition's byte offset starts it at its first line (the bytes counted by hand).
    line = len('{"text": "b0"}\n')
    assert [p.offset for p in parts[:3]] == [0, 3 * line, 6 * line]
    assert partition_output(parts[1], tmp_path / "out", options) == tmp_path / "out" / "part-00000-00001.jsonl"


@pytest.mark.parametrize("paths, message", [
    (["nothing-*.jsonl"], "no file matches 'nothing-*.jsonl'"),
    (["missing.jsonl"], "missing.jsonl: no such file"),
    (["."], ". is a directory"),
    ([], "no input files given"),
])
def test_plan_partitions_bad_paths_raise(tmp_path, monkeypatch, paths, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GPT2Error) as info:
        plan_partitions(paths, ScoreOptions())
    assert message in str(info.value)


@pytest.mark.parametrize("options, message", [
    (dict(on_error="ignore"), "on_error must be one of skip, fail, found 'ignore'"),
    (dict(out_format="csv"), "out_format must be one of jsonl, parquet, found 'csv'"),
    (dict(partition_size=0), "partition_size must be a positive integer, found 0"),
    (dict(dtype="float16"), "dtype must be one of float32, float64"),
    (dict(stride=-1), "stride must be a positive integer or None, found -1"),
])
def test_bad_score_options_raise(options, message):
    with pytest.raises(GPT2Error) as info:
        ScoreOptions(**options)
    assert message in str(info.value)


BAD_LINES = [
    ("not json", "not JSON: Expecting value at column 1"),
    ('["a list"]', "not a JSON object (found an array)"),
    ('{"id": 3, "txt": "the"}', "no field 'text'"),
    ('{"id": 4, "text": 17}', "field 'text' is a number, expected a string"),
    ('{"id": 5, "text": " the cat sat on the mat"}', "the text has token 3797, outside the model's vocabulary 0..999"),  # " cat"
]


def test_score_partition_rows_in_input_order_with_error_rows(models, tiny_ref, tmp_path):
    """Good documents against transformers (float64); each bad line an error row in its place."""
    tokenizer = Tokenizer.default()
    good = _texts(tokenizer, [12, 1, 50, 0], seed=5)
    lines = [json.dumps({"id": "g0", "text": good[0]}), BAD_LINES[0][0], json.dumps({"text": good[1]}), "",
             *[line for line, _ in BAD_LINES[1:]], json.dumps({"id": "g2", "text": good[2]}),
             json.dumps({"id": "g3", "text": good[3]})]
    path = _jsonl(tmp_path / "docs.jsonl", lines)
    options = ScoreOptions(stride=30, dtype="float64")
    [partition] = plan_partitions([path], options)
    out = score_partition(models["float64"], tokenizer, partition, tmp_path / "out", options)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["g0", f"{path}:2", f"{path}:3", f"{path}:5", 3, 4, 5, "g2", "g3"]
    for row, (_, message) in zip([rows[1], *rows[3:7]], BAD_LINES):
        assert row["error"].startswith(f"{path}:") and message in row["error"]
        assert row["tokens"] is row["nll"] is row["perplexity"] is row["bits_per_byte"] is None
    for row, text in zip([rows[0], rows[2], rows[7], rows[8]], good):
        assert row["error"] is None
        ids = np.array(tokenizer.encode(text))
        assert row["tokens"] == max(len(ids) - 1, 0)
        if len(ids) < 2:
            assert row["nll"] == 0 and row["perplexity"] is None and row["bits_per_byte"] is None
            continue
        nll = -reference_logprobs(tiny_ref.torch_model, ids, 30, "float64")[0].sum()
        assert row["nll"] == pytest.approx(nll, rel=1e-9)
        assert row["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-9)
        assert row["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-9)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [out.name]  # no temporary file left


def test_score_partition_on_error_fail_raises_at_the_first_bad_line(models, tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl", ['{"text": " the"}', '{"text": " a"}', "{oops", "also bad"])
    options = ScoreOptions(on_error="fail")
    with pytest.raises(GPT2Error) as info:
        score_partition(models["float32"], Tokenizer.default(), plan_partitions([path], options)[0], tmp_path / "o",
                        options)
    assert str(info.value).startswith(f"{path}:3: not JSON")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_score_partition_parquet_and_resume(models, tmp_path):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    tokenizer = Tokenizer.default()
    texts = _texts(tokenizer, [5, 9, 3, 30, 2], seed=2)
    path = _jsonl(tmp_path / "docs.jsonl", [json.dumps({"key": i, "body": t}) for i, t in enumerate(texts)]
                  + ['{"key": 9}'])
    jsonl, parquet = (ScoreOptions(id_field="key", text_field="body", partition_size=4, out_format=f)
                      for f in ("jsonl", "parquet"))
    model = models["float32"]
    for options in (jsonl, parquet):
        outs = [score_partition(model, tokenizer, p, tmp_path / "out", options) for p in plan_partitions([path], options)]
    from_jsonl = [json.loads(line) for out in (tmp_path / "out").glob("*.jsonl") for line in out.read_text().splitlines()]
    table = pyarrow_parquet.read_table(outs[0]).to_pylist() + pyarrow_parquet.read_table(outs[1]).to_pylist()
    assert [row["id"] for row in table] == ["0", "1", "2", "3", "4", "9"]  # ids as strings in Parquet
    assert [row["error"] for row in table] == [None] * 5 + [f"{path}:6: no field 'body'"]
    for got, expected in zip(table, sorted(from_jsonl, key=lambda row: row["id"])):
        assert {**got, "id": int(got["id"])} == expected
    # A partition whose file exists is complete: a rerun returns it untouched.
    outs[0].write_bytes(b"sentinel")
    again = score_partition(model, tokenizer, plan_partitions([path], parquet)[0], tmp_path / "out", parquet)
    assert again == outs[0] and outs[0].read_bytes() == b"sentinel"
