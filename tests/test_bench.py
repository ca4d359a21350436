"""The benchmark harness in bench/: its naive baseline is right, and the command runs end to end.

References trusted here: Hugging Face transformers (logits and greedy `generate` on the tiny
reference weights) for the naive NumPy baseline, and numpy_gpt2's forward, itself tested
against transformers in test_model.py; for the measured bounds (bench/bound.py), torch's own
FLOP counter on transformers' forward and the sizes of transformers' weight tensors. Nothing
here checks a timing: timings are noisy and belong in bench/results, not in asserts.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import tolerance
from numpy_gpt2 import GPT2

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load_naive():
    """bench/naive.py as a module; bench/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location("bench_naive", BENCH / "naive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


naive = _load_naive()


@pytest.fixture(scope="module")
def naive_model(tiny_ref):
    return naive.NaiveGPT2(tiny_ref.hub_dir)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(7).integers(0, 1000, size=17)


def test_naive_logits_match_transformers(tiny_ref, naive_model, ids):
    expected = tiny_ref.logits(ids[None])[0]
    got = naive_model.logits(ids)
    assert got.dtype == np.float32  # the float64 slip picoGPT is known for would show here
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance(expected, "float32", tiny_ref.config))


def test_naive_logits_match_numpy_gpt2(tiny_ref, naive_model, ids):
    expected = GPT2.from_pretrained(tiny_ref.hub_dir)(ids)[0]
    np.testing.assert_allclose(naive_model.logits(ids), expected, rtol=0,
                               atol=tolerance(expected, "float32", tiny_ref.config))
    np.testing.assert_allclose(naive_model.logits(ids, logits_to_keep=1), expected[-1:], rtol=0,
                               atol=tolerance(expected, "float32", tiny_ref.config))


def test_naive_greedy_generation_matches_transformers(tiny_ref, naive_model, ids):
    torch = pytest.importorskip("torch")
    prompt = torch.tensor(ids[None])
    with torch.no_grad():
        out = tiny_ref.torch_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                            max_new_tokens=10, pad_token_id=0)
    assert naive_model.generate(ids, 10) == out[0, len(ids):].tolist()


def test_quick_run_writes_results(tiny_ref, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--engines", "numpy,naive",
         "--model", str(tiny_ref.hub_dir), "--out", str(out), "--threads", "1", "--bounds"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    latest = json.loads((out / "latest.json").read_text())
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == latest
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    assert set(latest["engines"]) == {"numpy", "naive"}
    keys = [case["key"] for case in latest["cases"]]
    assert keys == ["prefill_16_last", "prefill_16_all", "prefill_32_last", "prefill_32_all",
                    "decode_b1_p8", "decode_b1_p24", "decode_b8_p8"]
    for case in latest["cases"]:
        assert case["engines"]["numpy"]["median"] > 0
        assert len(case["engines"]["numpy"]["seconds"]) == latest["settings"]["repeats"]
    assert "naive" in latest["cases"][0]["engines"] and "naive" not in latest["cases"][-1]["engines"]
    process = latest["process"]
    assert process["cold_start"]["median"] > 0
    assert process["first_compile"]["numba_cache_files_written"] > 0  # NUMBA_CACHE_DIR was honoured
    assert process["peak_rss"]["numpy"]["median"] > 0
    for key in ("cpu", "cores", "blas", "versions", "threads", "numba_threading_layer"):
        assert key in latest["machine"]
    assert set(latest["bounds"]) == set(keys)  # --bounds: every case, not only the misses
    table = (out / "latest.md").read_text()
    assert "| measurement | numpy-gpt2 | naive NumPy |" in table
    assert "What bounds these rows" in table
    for case in latest["cases"]:
        assert f"- {case['label']}." in table
    assert table.strip() in done.stdout


def test_train_quick_run_writes_results(tmp_path):
    # Reference: transformers' GPT2LMHeadModel trained by torch on the same checkpoint and batch;
    # its first-step loss must be numpy-gpt2's (float32, 1e-4 relative), or the two engines
    # were not timed on the same work.
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, str(BENCH / "train.py"), "--quick", "--out", str(tmp_path),
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    latest = json.loads((tmp_path / "train-latest.json").read_text())
    assert set(latest["engines"]) == {"numpy", "torch"}
    assert latest["cases"]
    for case in latest["cases"]:
        for engine in ("numpy", "torch"):
            entry = case["engines"][engine]
            assert len(entry["seconds"]) == latest["settings"]["repeats"] and entry["median"] > 0
        agreement = case["loss_agreement"]
        assert agreement["agree"] and agreement["relative_difference"] <= 1e-4, agreement
        assert "status" not in case  # a quick run is not judged
    assert latest["cases"][0]["bound"]["ratio_bound"] > 0
    assert all(latest["rss"]["engines"][engine]["bytes"] > 0 for engine in ("numpy", "torch"))
    for key in ("cpu", "cores", "blas", "versions", "threads", "numba_threading_layer"):
        assert key in latest["machine"]
    table = (tmp_path / "train-latest.md").read_text()
    assert "| row | numpy-gpt2 | torch | ratio | target | PASS/MISS |" in table
    assert "What bounds" in table and "agree" in table
    assert table.strip() in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-latest.json", "train-latest.md"]


def test_score_quick_run_writes_results(tiny_ref, tmp_path):
    # Reference: transformers' GPT2LMHeadModel on the same documents, its per-document loss (as
    # `labels` computes it) must be numpy-gpt2's NLL (float32, 1e-4 relative), or the two
    # engines were not timed on the same work; the batches are the ones numpy-gpt2 forms.
    pytest.importorskip("torch")
    done = subprocess.run([sys.executable, str(BENCH / "score.py"), "--quick", "--model", str(tiny_ref.hub_dir),
                           "--out", str(tmp_path), "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    latest = json.loads((tmp_path / "score-latest.json").read_text())
    assert set(latest["engines"]) == {"numpy", "torch"}
    docs = latest["documents"]
    assert docs["count"] == len(docs["lengths"]) == sum(docs["batch_sizes"]) == 8
    assert all(5 <= n <= 40 for n in docs["lengths"])  # within the tiny model's context
    for engine in ("numpy", "torch"):
        entry = latest["engines"][engine]
        assert len(entry["batch_seconds"]) == docs["batches"] and entry["tokens_per_s"] > 0
        assert len(entry["nll"]) == 8
    agreement = latest["nll_agreement"]
    assert agreement["agree"] and agreement["max_relative_difference"] <= 1e-4, agreement
    assert "status" not in latest  # a quick run is not judged
    assert latest["bound"]["ratio_bound"] > 0 and latest["bound"]["dense_products"] > 0
    table = (tmp_path / "score-latest.md").read_text()
    assert "| row | numpy-gpt2 | torch | ratio | target | PASS/MISS |" in table
    assert "What bounds" in table and "the same work" in table
    assert table.strip() in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["score-latest.json", "score-latest.md"]


def _bench_module(name: str):
    """bench/NAME.py as a module, with bench/ importable for its own imports (`measure`, `run`)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bound():
    """bench/bound.py as a module."""
    return _bench_module("bound")


def _torch_flops_by_op(torch_model, ids):
    """{aten op name: FLOPs} of one transformers forward, counted by torch's own FlopCounterMode."""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        torch_model(torch.as_tensor(ids[None]))
    return {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}


def test_prefill_bound_times_every_dense_product(bound, tiny_ref, ids):
    # The dense products the bound times must be exactly the forward's non-attention products:
    # their FLOPs equal torch's count of transformers' Conv1D (addmm) and head (mm) products.
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    result = bound.prefill_bound(model, ids[None], keep_last=False, torch_seconds=1.0, repeats=2)

    by_op = _torch_flops_by_op(tiny_ref.torch_model, ids)
    assert set(by_op) >= {"addmm", "mm"}, by_op
    assert result["dense_product_flops"] == by_op["addmm"] + by_op["mm"]
    assert result["dense_products"] == 4 * model.config.n_layer + 1

    profile = result["profile_seconds"]
    assert set(profile) == {"block products", "head", "attention", "layernorms", "rest", "total"}
    assert all(profile[part] > 0 for part in ("block products", "head", "attention", "layernorms"))
    assert sum(seconds for part, seconds in profile.items() if part != "total") == pytest.approx(profile["total"])
    assert result["ratio_ceiling"] == pytest.approx(1.0 / result["dense_products_alone_seconds"])
    by_part = result["dense_products_alone_seconds_by_part"]
    assert set(by_part) == {"block products", "head"}
    assert sum(by_part.values()) == pytest.approx(result["dense_products_alone_seconds"])


def test_prefill_bound_leaves_the_kernels_as_they_were(bound, tiny_ref, ids):
    from numpy_gpt2 import kernels

    before = {name: getattr(kernels, name) for name in bound._PARTS}
    bound.prefill_bound(GPT2.from_pretrained(tiny_ref.hub_dir), ids[None], keep_last=True,
                        torch_seconds=None, repeats=1)
    assert {name: getattr(kernels, name) for name in before} == before


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_bound_reads_every_weight_matrix_once(bound, tiny_ref, batch):
    # Reference: the sizes of transformers' own c_attn, c_proj, c_fc, mlp.c_proj and wte tensors.
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    ids = np.random.default_rng(3).integers(0, 1000, size=(batch, 5))
    result = bound.decode_bound(model, ids, torch_tokens_per_s=10.0, repeats=2, steps=3)

    expected = sum(p.numel() * 4 for name, p in tiny_ref.torch_model.named_parameters()
                   if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "wte.weight")))
    assert result["weight_bytes_per_step"] == expected
    seconds = result["products_alone_seconds_per_step"]
    assert result["tokens_per_s_ceiling"] == pytest.approx(batch / seconds)
    assert result["ratio_ceiling"] == pytest.approx(batch / seconds / 10.0)
    assert result["step_seconds"] > 0


def test_a_miss_is_never_printed_as_its_target():
    """A ratio just under its target is shown with the digit that makes the miss visible."""
    sys.path.insert(0, str(BENCH))
    try:
        import run
    finally:
        sys.path.remove(str(BENCH))
    assert run._ratio(1.2986, 1.3) == "1.299x"
    assert run._ratio(1.3, 1.3) == "1.30x" and run._ratio(1.2949, 1.3) == "1.29x"
    assert run._ratio(2.55, None) == "2.55x"


def test_serve_quick_run_writes_results(tmp_path):
    # Reference: numpy-gpt2's greedy `generate` alone (held to transformers in test_generate.py):
    # each streamed completion the bench counts has the tokens generate makes for its prompt
    # (up to end-of-text), so the rates divide the right counts.
    from numpy_gpt2.tokenizer import Tokenizer
    from numpy_gpt2.weights.resolve import resolve_model

    done = subprocess.run([sys.executable, str(BENCH / "serve.py"), "--model", "fortunes", "--clients", "2",
                           "--tokens", "6", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    latest = json.loads((tmp_path / "serve-latest.json").read_text())
    model, tokenizer = GPT2.from_pretrained(resolve_model("fortunes")), Tokenizer.default()
    prompt = np.array(tokenizer.encode("The history of the city begins"))  # bench/serve.py's PROMPTS[0]
    new = model.generate(prompt, max_new_tokens=6)[0, len(prompt):]
    eos = np.flatnonzero(new == model.config.eos_token_id)
    assert [r["tokens"] for r in latest["alone"]] == [eos[0] + 1 if len(eos) else 6]
    assert len(latest["together"]) == 1 and latest["together"][0]["tokens_per_s"] > 0
    for key in ("in_process_decode_tokens_per_s", "one_client_decode_tokens_per_s", "aggregate_tokens_per_s",
                "ttft_median_s", "ttft_max_s"):
        assert latest[key] > 0, key
    table = (tmp_path / "serve-latest.md").read_text()
    assert ">= 0.90x" in table and ">= 2.5x" in table and "time to first token" in table
    assert table.strip() in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serve-latest.json", "serve-latest.md"]


@pytest.fixture(scope="module")
def narrow_bench():
    """bench/narrow.py as a module."""
    return _bench_module("narrow")


class _Engine:
    """What bench/narrow.py needs of an engine: the model, and a decode to warm it up."""

    def __init__(self, model):
        self.model = model

    def decode(self, ids, n_new):
        return 0.0, self.model.generate(ids, max_new_tokens=n_new, do_sample=False, eos_token_id=None)


def test_narrow_formats_decoding_in_turn_make_each_one_s_own_tokens(narrow_bench, tiny_ref, monkeypatch):
    # Reference: each format's greedy `generate` alone (the formats' models are held to
    # transformers in test_narrow.py). Four models decoding in slices of 3 steps, taking turns,
    # must not disturb one another; and the step's matrices counted are every matrix once.
    monkeypatch.setattr(narrow_bench, "SLICE", 3)
    models = {w: GPT2.from_pretrained(tiny_ref.hub_dir, weights=w) for w in narrow_bench.WEIGHTS}
    ids = np.array([[5, 17, 3, 99]])
    measured, bounds = narrow_bench.interleaved_decode({w: _Engine(m) for w, m in models.items()}, ids, 10, 2)
    for w, model in models.items():
        alone = model.generate(ids, max_new_tokens=11, do_sample=False, eos_token_id=None)[:, 4:]
        assert measured[w]["tokens"] == alone.tolist(), w
        matrices = [b.attn.c_attn.weight for b in model.h] + [b.attn.c_proj.weight for b in model.h] + \
            [b.mlp.c_fc.weight for b in model.h] + [b.mlp.c_proj.weight for b in model.h] + [model.wte]
        assert bounds[w]["bytes_per_step"] == sum(m.nbytes for m in matrices), w
        assert bounds[w]["macs_per_step"] == sum(int(np.prod(m.shape)) for m in matrices), w
    assert set(measured["ratios"]) == set(narrow_bench.NARROW)


def test_narrow_bounds_explain_exactly_the_decode_rows_that_miss(narrow_bench):
    bounds = {w: {"bytes_per_step": b, "seconds": s, "bytes_per_s": b / s, "rest_seconds": 0.001,
                  "macs_per_step": 124e6, "compute": {"macs_per_s": 40e9}}
              for w, b, s in [("float32", 494e6, 0.012), ("bfloat16", 247e6, 0.008), ("float16", 247e6, 0.006),
                              ("int8", 139e6, 0.004)]}
    results = {"bounds": bounds, "cases": [{"kind": "decode", "ratios": {"bfloat16": 1.44, "float16": 1.86, "int8": 2.6},
                                            "targets": narrow_bench.DECODE_TARGETS}]}
    lines = narrow_bench.decode_bounds(results)
    assert len(lines) == 2 and lines[1].startswith("- bfloat16 decodes at 1.44x, short of 1.7x")
    # 247 MB in 8 ms against float32's 494 MB in 12 ms: 0.75 of its rate; at float32's rate
    # the step would be 6 + 1 ms against float32's 13: 1.86x.
    assert "stream at 0.75 of float32's rate" in lines[1] and "7.0 ms, 1.86x" in lines[1]
    results["cases"][0]["ratios"]["bfloat16"] = 1.7
    assert narrow_bench.decode_bounds(results) == []
