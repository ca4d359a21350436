"""The small model installed with the package (weights/fortunes/, numpy_gpt2/bundled/ once installed).

Its files are checked against transformers and tiktoken-independent references: transformers'
GPT2LMHeadModel loads the directory and its logits agree with the engine's; transformers'
tokenizer reads its vocab.json + merges.txt and agrees with ours. The command line falls back to
it when no --model is given and GPT-2's weights are not found, and says so in one line.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import tolerance
from numpy_gpt2 import GPT2, Tokenizer
from numpy_gpt2.weights import resolve

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 120
TEXT = "Once upon a time, a fortune said: you will write tests."


@pytest.fixture(scope="module")
def bundled():
    return pathlib.Path(resolve.bundled_model())


def _run(args, cwd, hub, pythonpath=None):
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    # cwd is not the checkout, so `-m numpy_gpt2` runs the package as installed (or as PYTHONPATH has it).
    return subprocess.run([sys.executable, "-m", "numpy_gpt2", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, encoding="utf-8", stdin=subprocess.DEVNULL, timeout=TIMEOUT)


def test_it_is_small_and_in_hugging_face_layout(bundled):
    files = {p.name for p in bundled.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= files
    total = sum((bundled / name).stat().st_size for name in ("config.json", "model.safetensors", "vocab.json",
                                                              "merges.txt"))
    assert total <= 25 * 10**6, total
    config = json.loads((bundled / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"]) == ("gpt2", 50257)


def test_transformers_loads_it_and_the_logits_agree(bundled):
    import torch
    import transformers

    reference = transformers.GPT2LMHeadModel.from_pretrained(bundled, torch_dtype=torch.float32).eval()
    ids = np.array([Tokenizer.from_pretrained(str(bundled)).encode(TEXT)])
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    model = GPT2.from_pretrained(bundled, dtype="float32")
    got = model.forward(ids)
    # float16 weights, float32 arithmetic in both: the two round alike (see conftest.tolerance).
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance(expected, "float32", model.config))


def test_its_tokenizer_files_are_gpt2s(bundled):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(bundled)
    text = TEXT + " Ünïcode, numbers 12345 and <|endoftext|> too.\n\n  spaces"
    assert Tokenizer.from_pretrained(str(bundled)).encode(text) == reference(text)["input_ids"]


def _no_gpt2_here():
    try:
        resolve.resolve_model("gpt2")
    except resolve.ModelNotFoundError:
        return True
    return False


def test_no_model_and_no_gpt2_runs_the_bundled_one_and_says_so(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    if resolve._CHECKOUT_WEIGHTS and (resolve._CHECKOUT_WEIGHTS / "gpt2" / "model.safetensors").is_file():
        pytest.skip("this checkout has weights/gpt2/, which the default rightly prefers")
    result = _run(["generate", "Once upon a time", "--max-new-tokens", "8", "--seed", "0"], tmp_path, hub)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once upon a time") and len(result.stdout) > len("Once upon a time\n")
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "bundled model 'fortunes'" in lines[0] and "not GPT-2" in lines[0]
    assert "pip install huggingface_hub && numpy-gpt2 download gpt2" in lines[0]


def test_no_model_prefers_gpt2_where_it_is_found(tiny_ref, tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    shutil.copytree(tiny_ref.hub_dir, tmp_path / "weights" / "gpt2")
    result = _run(["info"], tmp_path, hub)
    assert (result.returncode, result.stderr) == (0, "")
    assert f"file                 {pathlib.Path('weights') / 'gpt2' / 'model.safetensors'}" in result.stdout


def test_the_name_fortunes_is_the_bundled_model(bundled, tmp_path):
    result = _run(["info", "--model", "fortunes"], tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(bundled / "model.safetensors") in result.stdout


@pytest.fixture
def installed_elsewhere(bundled, tmp_path):
    """The package laid out as a non-editable install lays it out: no checkout around it."""
    site = tmp_path / "site-packages"
    package = pathlib.Path(resolve.__file__).resolve().parents[1]
    shutil.copytree(package, site / "numpy_gpt2", ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    shutil.copytree(bundled, site / "numpy_gpt2" / "bundled", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def test_installed_the_advice_names_no_checkout(installed_elsewhere, tmp_path):
    """Installed, nothing is looked for in a site-packages/weights/ that no one could fill."""
    work = tmp_path / "work"
    work.mkdir()
    result = _run(["info", "--model", "gpt2"], work, tmp_path / "hub", pythonpath=installed_elsewhere)
    assert result.returncode == 1
    assert "looked in: weights/gpt2; " in result.stderr
    assert str(installed_elsewhere) not in result.stderr
    assert result.stderr.rstrip().endswith("numpy-gpt2 download gpt2")
    result = _run(["generate", "Once upon a time", "--max-new-tokens", "4"], work, tmp_path / "hub",
                  pythonpath=installed_elsewhere)
    assert result.returncode == 0, result.stderr
    assert "bundled model 'fortunes'" in result.stderr
