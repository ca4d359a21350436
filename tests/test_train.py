"""numpy_gpt2.train and `numpy-gpt2 train`: initialisation, the loop end to end, checkpoints,
resume, Ctrl-C, and the one-line errors.

References trusted here: transformers (its GPT-2 initialisation, and its loading of the
checkpoint the trainer writes: same logits as the engine's, at the tolerance of conftest);
the same run uninterrupted, for what a resumed run must end with, bit for bit; and the
entropy of the training text, for what the loss must fall to. `test_optim` checks the
optimizer and the schedule against torch, `test_data` the data files against tiktoken.
"""

import json
import math
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from numpy_gpt2 import GPT2, threads
from numpy_gpt2.config import GPT2Config
from numpy_gpt2.data import prepare
from numpy_gpt2.errors import GPT2Error
from numpy_gpt2.runs import STATE_FILE
from numpy_gpt2.train import TrainingInterrupted, init_parameters, train
from numpy_gpt2.weights import expected_shapes
from numpy_gpt2.weights.safetensors_file import SafetensorsFile

from conftest import tolerance
from test_data import run_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=2)
# Short runs: the batches are small, so each step is a few milliseconds of the model; one
# thread, since threads only wait on each other over matrices this small.
QUICK = dict(batch_size=4, seq_len=16, eval_batches=2, seed=5, threads=1, progress=False, plot=False)
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    """train(threads=1) sets the process's thread counts; put them back for the other tests."""
    saved_env = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    saved_parts, saved_blas, saved_numba = threads._parts, threads.get_threads(), numba.get_num_threads()
    yield
    if saved_blas is not None:
        threads.set_threads(saved_blas)
    numba.set_num_threads(saved_numba)
    threads._parts = saved_parts
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def sentences(n, seed=0):
    """Lines of five words, each a single GPT-2 token below 1000 (so TINY's vocabulary holds
    them), drawn uniformly: after a line's first word, each next token has at most 10 choices
    (the '.' and newline none), so a model that learns the pattern gets well under ln(10) ~ 2.3
    nats, against ln(1000) ~ 6.9 for a model that knows nothing."""
    rng = random.Random(seed)
    subjects, verbs = "he we they you who".split(), "said will can has had was are were have".split()
    objects, places = "the this that all more one their your his".split(), "in on at for with from by about to of".split()
    return "".join(f" {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(places)} "
                   f"{rng.choice(objects)}.\n" for _ in range(n))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    (root / "text.txt").write_text(sentences(2500))
    meta = prepare([root / "text.txt"], root / "data", val_fraction=0.1, progress=False)
    assert meta["train_tokens"] > 10_000
    return root / "data"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def tensors_of(path):
    return {name: np.array(a) for name, a in SafetensorsFile(path).tensors.items()}


def test_init_parameters_are_gpt2s_initialisation():
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=3000, n_positions=256, n_embd=128, n_layer=4, n_head=4)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config, bos_token_id=None, eos_token_id=None))
    theirs = {k: v.detach().numpy() for k, v in hf.transformer.state_dict().items()}
    ours = init_parameters(GPT2Config(**config), seed=0)
    assert {k: v.shape for k, v in ours.items()} == expected_shapes(GPT2Config(**config))
    for name, array in ours.items():
        expected = theirs[name]
        assert array.dtype == np.float32
        if expected.std() == 0:  # biases 0, layernorm weights 1
            np.testing.assert_array_equal(array, expected, err_msg=name)
        else:  # N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 n_layer)): the spread, to 5%
            assert array.std() == pytest.approx(expected.std(), rel=0.05), name
            assert abs(array.mean()) < 4 * expected.std() / math.sqrt(array.size), name
    np.testing.assert_array_equal(init_parameters(GPT2Config(**config), seed=0)["wte.weight"], ours["wte.weight"])
    assert not np.array_equal(init_parameters(GPT2Config(**config), seed=1)["wte.weight"], ours["wte.weight"])


def test_cli_train_200_steps_lowers_validation_loss_and_transformers_loads_it(data_dir, tiny_config, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    status = run_cli("train", "--data", data_dir, "--out", out, "--config", tiny_config, "--steps", 200,
                     "--batch-size", 4, "--seq-len", 32, "--lr", 3e-3, "--warmup", 10, "--eval-every", 50,
                     "--eval-batches", 4, "--seed", 0, "--threads", 1, "--quiet")
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert printed.out.startswith("step 200: train loss ")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(201))
    assert set(log[1]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    val = {r["step"]: r["val_loss"] for r in log if "val_loss" in r}
    assert sorted(val) == [0, 50, 100, 150, 200]
    # From knowing nothing (ln 1000 = 6.9) to well under the text's ln(10) ~ 2.3 per token.
    assert val[0] == pytest.approx(math.log(1000), abs=0.2)
    assert val[200] < 2.5 and val[200] < val[0] - 4, val

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = np.fromfile(data_dir / "val.bin", dtype="<u2")[:64].astype(np.int64).reshape(2, 32)
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids)).logits.numpy()
    logits = GPT2.from_pretrained(out)(ids)
    # A trained model's logits carry more float32 rounding than the random-weight ones
    # conftest.tolerance was measured on (0.27-0.44 of its scale there): up to 1.04 of it
    # measured on this run's trained weights, which vary with the run's BLAS; twice the scale.
    assert np.abs(logits - expected).max() <= 2 * tolerance(expected, "float32", TINY)
    # The engine's own loading of the run directory by name, as --model does.
    assert run_cli("info", "--model", out) == 0
    assert "parameters" in capsys.readouterr().out


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(data_dir, tiny_config, tmp_path):
    settings = dict(data=data_dir, config=tiny_config, steps=9, eval_every=4, lr=1e-2, warmup=2, **QUICK)
    straight = train(out=tmp_path / "straight", **settings)

    def stop_after_5(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 5; saved to .*, resume with --resume") as info:
        train(out=tmp_path / "resumed", callback=stop_after_5, **settings)
    assert info.value.step == 5
    assert json.loads((tmp_path / "resumed" / STATE_FILE).read_text())["step"] == 5
    resumed = train(out=tmp_path / "resumed", resume=True, threads=1, progress=False, plot=False)

    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = tensors_of(tmp_path / "straight" / name), tensors_of(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    same = lambda history: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history]  # noqa: E731
    assert same(resumed) == same(straight)
    assert not any(p.name.startswith(".") for p in (tmp_path / "resumed").iterdir())


def test_a_save_that_stopped_half_way_is_completed_or_dropped(data_dir, tiny_config, tmp_path):
    settings = dict(data=data_dir, config=tiny_config, eval_every=3, **QUICK)
    train(out=tmp_path / "run", steps=6, **settings)
    at_6 = tensors_of(tmp_path / "run" / "model.safetensors")
    train(out=tmp_path / "run", steps=9, resume=True, progress=False, plot=False)
    at_9 = tensors_of(tmp_path / "run" / "model.safetensors")
    run = tmp_path / "run"
    # Step 9's files staged and marked complete, but only the first moved in before a crash
    # (with step 6's files in place otherwise): the next start moves the rest in.
    staging = run / ".checkpoint.tmp"
    staging.mkdir()
    for name in ("optimizer.safetensors", "config.json", STATE_FILE):
        os.replace(run / name, staging / name)
    (staging / "COMPLETE").write_bytes(b"")
    history = train(out=run, resume=True, progress=False, plot=False)
    assert history[-1]["step"] == 9 and not staging.exists()
    assert json.loads((run / STATE_FILE).read_text())["step"] == 9
    # A staging directory never marked complete is dropped; the checkpoint in place stays.
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    train(out=run, resume=True, progress=False, plot=False)
    assert not staging.exists()
    for key, array in tensors_of(run / "model.safetensors").items():
        np.testing.assert_array_equal(array, at_9[key])
    assert any(not np.array_equal(at_6[key], at_9[key]) for key in at_6)


def test_ctrl_c_saves_and_exits_130_then_resumes(data_dir, tiny_config, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, "-m", "numpy_gpt2", "train", "--data", str(data_dir), "--out", str(out),
               "--config", str(tiny_config), "--steps", "100000", "--batch-size", "4", "--seq-len", "16",
               "--eval-every", "100000", "--eval-batches", "2", "--threads", "1", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            log = out / "log.jsonl"
            if log.is_file() and log.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    step = json.loads((out / STATE_FILE).read_text())["step"]
    assert lines[-1] == f"numpy-gpt2: interrupted at step {step}; saved to {out}, resume with --resume"
    assert step >= 2 and not (out / ".checkpoint.tmp").exists()
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == step
    assert run_cli("train", "--out", out, "--resume", "--steps", step + 2, "--threads", 1, "--quiet") == 0
    assert json.loads((out / STATE_FILE).read_text())["step"] == step + 2


def test_fine_tune_a_checkpoint(data_dir, tiny_ref, tmp_path):
    history = train(data=data_dir, out=tmp_path / "ft", init=tiny_ref.hub_dir, steps=3, eval_every=3, lr=1e-3,
                    **{**QUICK, "seq_len": 40})
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert {k: config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")} == {
        k: tiny_ref.config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}


def test_loss_png_is_drawn_at_each_evaluation(data_dir, tiny_config, tmp_path):
    pytest.importorskip("matplotlib")
    train(data=data_dir, out=tmp_path / "run", config=tiny_config, steps=2, eval_every=1, **{**QUICK, "plot": True})
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_no_loss_png(data_dir, tiny_config, tmp_path, monkeypatch, capfd):
    """plot=None: the run goes on, saying why there is no loss.png; plot=True: refused up front."""
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now raises ImportError
    with pytest.raises(GPT2Error, match=r"plot=True needs matplotlib: pip install matplotlib"):
        train(data=data_dir, out=tmp_path / "refused", config=tiny_config, steps=1, **{**QUICK, "plot": True})
    train(data=data_dir, out=tmp_path / "run", config=tiny_config, steps=1, eval_every=1, **{**QUICK, "plot": None})
    assert "matplotlib is not installed, so no loss.png (pip install matplotlib)" in capfd.readouterr().err
    assert (tmp_path / "run" / "log.jsonl").is_file() and not (tmp_path / "run" / "loss.png").exists()


@pytest.mark.parametrize("case, message", [
    ("no-data", r"--data .*nowhere: no such directory"),
    ("vocab", r"--data: train.bin holds token id \d+, outside the model's vocabulary of 100 \(ids 0..99\)"),
    ("seq-len", r"--seq-len 65 exceeds the model's n_positions=64"),
    ("neither", r"give one of --init MODEL .* and --config PRESET_OR_JSON"),
    ("bad-config", r"--config nonsense: neither a preset \(gpt2, .*\) nor a config.json file"),
    ("another-run", r"--out .*: holds a training run \(step 1 of 1\); add --resume to continue it"),
    ("not-empty", r"--out .*: is not empty \(notes.md\)"),
    ("nothing-to-resume", r"--resume: .* holds no training run to resume"),
    ("resume-other-lr", r"--resume: --lr 0.5 differs from the run's 0.0006"),
])
def test_bad_input_is_one_line(data_dir, tiny_config, tmp_path, capsys, case, message):
    out = tmp_path / "run"
    args = ["train", "--data", data_dir, "--out", out, "--config", tiny_config, "--steps", 1, "--batch-size", 2,
            "--seq-len", 8, "--eval-batches", 1, "--threads", 1, "--quiet"]
    if case == "no-data":
        args[2] = tmp_path / "nowhere"
    elif case == "vocab":
        small = tmp_path / "small.json"
        small.write_text(json.dumps({**TINY, "vocab_size": 100}))
        args[6] = small
    elif case == "seq-len":
        args[12] = 65
    elif case == "neither":
        del args[5:7]
    elif case == "bad-config":
        args[6] = "nonsense"
    elif case in ("another-run", "resume-other-lr"):
        assert run_cli(*args) == 0
        if case == "resume-other-lr":
            args += ["--resume", "--lr", "0.5"]
    elif case == "not-empty":
        out.mkdir()
        (out / "notes.md").write_text("mine")
    elif case == "nothing-to-resume":
        args.append("--resume")
    capsys.readouterr()
    assert run_cli(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("numpy-gpt2: error: "), err
    assert re.search(message, err), err


@pytest.mark.slow
def test_fine_tune_the_124m_shape(data_dir, gpt2_ref, tmp_path):
    history = train(data=data_dir, out=tmp_path / "ft", init=gpt2_ref.hub_dir, steps=2, eval_every=2, lr=1e-4,
                    **{**QUICK, "batch_size": 2, "seq_len": 32, "eval_batches": 1, "threads": None})
    assert [r["step"] for r in history] == [0, 1, 2]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert GPT2.from_pretrained(tmp_path / "ft").num_parameters() == 124_439_808


def test_a_diverging_run_stops_with_one_line(data_dir, tiny_config, tmp_path):
    with np.errstate(all="ignore"), pytest.raises(GPT2Error, match=r"step \d: the loss is nan .*: training diverged"):
        train(data=data_dir, out=tmp_path / "run", config=tiny_config, steps=5, lr=1e30, grad_clip=0, **QUICK)
