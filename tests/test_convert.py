"""Conversion: Hugging Face directories, llm.c .bin files, PyTorch state dicts, the `convert` command.

References trusted here: Hugging Face transformers (`GPT2LMHeadModel.from_pretrained` on what
we write, and its logits), torch's own bfloat16 rounding, safetensors' own reader, the
TensorFlow fixture's `expected_logits.npz` (computed by transformers), llm.c's layout as its
`train_gpt2.py` `write_model` / `write_tensors` write it (re-implemented below from that code,
not from ours), and nanoGPT's `model.py` names and `ckpt.pt` layout. Python's import system
blocks torch in the child process that checks the message without it.
"""

import copy
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import TF_TINY, TINY, build_reference, shared_file, tolerance
from numpy_gpt2 import GPT2
from numpy_gpt2.convert import convert
from numpy_gpt2.errors import CheckpointError, ConfigError, GPT2Error
from numpy_gpt2.tokenizer import _packaged_data_dir
from numpy_gpt2.weights import llmc, load_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[1]
LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@pytest.fixture(scope="module")
def ref_eps5(tmp_path_factory):
    """The tiny reference with layernorm eps 1e-5, which llm.c and nanoGPT hard-code."""
    return build_reference({**TINY, "layer_norm_epsilon": 1e-5}, tmp_path_factory.mktemp("eps5"), seed=5)


def _ids(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, 13))


def _hf_load(directory):
    """transformers' model from `directory` in float32; fails on any missing or unexpected key."""
    model, info = transformers.GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.float().eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _assert_close(got, want):
    """got and want: logits of a model of conftest's TINY shape."""
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want, "float32", TINY))


def _hf_state(ref) -> dict:
    """The reference's parameters under the official names, [in, out], as float32 arrays."""
    return {k: v.detach().numpy().copy() for k, v in ref.torch_model.transformer.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_hf_directory_loads_in_transformers(tiny_ref, tmp_path, dtype):
    dst = convert(tiny_ref.hub_dir, tmp_path / "out", dtype=dtype)
    assert dst == tmp_path / "out"
    hf = _hf_load(dst)
    ids = _ids(TINY["vocab_size"])
    expected = _hf_logits(hf, ids)
    _assert_close(GPT2.from_pretrained(dst)(ids), expected)
    if dtype == "float32":  # the same weights, bit for bit, so the same logits as the source model
        _assert_close(expected, tiny_ref.logits(ids))
    # The stored values are torch's own rounding of the source weights.
    stored = load_file(str(dst / "model.safetensors")) if dtype != "bfloat16" else None
    for name, source in _hf_state(tiny_ref).items():
        want = torch.from_numpy(source).to(getattr(torch, dtype)).float()
        got = hf.transformer.state_dict()[name].float()
        assert torch.equal(got, want), name
        if stored is not None:
            assert stored[name].dtype == np.dtype(dtype)


def test_hf_directory_has_the_packaged_tokenizer(tiny_ref, tmp_path):
    dst = convert(tiny_ref.pretrained_dir, tmp_path / "out")
    data = _packaged_data_dir()
    assert (dst / "vocab.json").read_bytes() == (data / "encoder.json").read_bytes()
    assert (dst / "merges.txt").read_bytes() == (data / "vocab.bpe").read_bytes()
    assert json.loads((dst / "config.json").read_text())["n_layer"] == TINY["n_layer"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]


def test_float16_halves_the_file(tiny_ref, tmp_path):
    sizes = {dtype: os.path.getsize(convert(tiny_ref.hub_dir, tmp_path / dtype, dtype=dtype) / "model.safetensors")
             for dtype in ("float32", "float16", "bfloat16")}
    for half in ("float16", "bfloat16"):  # the JSON header, a few kB, is all that is not halved
        assert abs(sizes[half] / sizes["float32"] - 0.5) < 0.01


def test_tf_fixture_converts(tmp_path):
    fixture = shared_file("fixtures", "openai-tf-tiny")
    expected = np.load(shared_file("fixtures", "openai-tf-tiny", "expected_logits.npz"))
    dst = convert(fixture, tmp_path / "out")
    # SRC's own BPE files are copied under the Hugging Face names.
    assert (dst / "vocab.json").read_bytes() == (fixture / "encoder.json").read_bytes()
    assert (dst / "merges.txt").read_bytes() == (fixture / "vocab.bpe").read_bytes()
    # And to llm.c, whose padded vocabulary for GPT-2's 50257 tokens is 50304 (its train_gpt2.py).
    bin_path = convert(fixture, tmp_path / "model.bin")
    assert np.fromfile(bin_path, dtype="<i4", count=8).tolist() == [20240326, 3, 64, 50257, 2, 4, 32, 50304]
    ids = expected["input_ids"]
    for logits in (_hf_logits(_hf_load(dst), ids), GPT2.from_pretrained(bin_path)(ids)):
        for got, want in ((logits[:, :, :512], expected["logits_head"]), (logits[:, -1, :], expected["logits_last"])):
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want, "float32", TF_TINY))


def test_destination_with_a_model_needs_force(tiny_ref, tmp_path):
    dst = convert(tiny_ref.hub_dir, tmp_path / "out")
    with pytest.raises(GPT2Error, match="already holds a model .*--force"):
        convert(tiny_ref.hub_dir, dst, dtype="float16")
    before = (dst / "model.safetensors").read_bytes()
    assert convert(tiny_ref.hub_dir, dst, dtype="float16", force=True) == dst
    assert os.path.getsize(dst / "model.safetensors") < len(before)
    with pytest.raises(GPT2Error, match="is the source itself"):
        convert(dst, dst, force=True)
    with pytest.raises(GPT2Error, match="is the source itself"):
        convert(dst / "model.safetensors", dst, force=True)


# ---------------------------------------------------------------------------------------------
# llm.c


def _write_llmc_as_llmc_does(model, path, dtype="float32"):
    """llm.c train_gpt2.py `write_model`, applied to a transformers GPT2LMHeadModel.

    llm.c's model holds nn.Linear weights: its `from_pretrained` copies Hugging Face's Conv1D
    weights transposed (`sd[k].copy_(sd_hf[k].t())`), so they are written [out, in] here too.
    `write_tensors` writes all L layers of one tensor before the next; `pad_vocab` pads wte
    with zero rows to a multiple of 128; the header is 256 int32.
    """
    sd = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith(".attn.bias")}
    sd = {k: v.t() if k.endswith(LINEAR) else v for k, v in sd.items()}
    cfg = model.config
    V, C, L = cfg.vocab_size, cfg.n_embd, cfg.n_layer
    Vp = ((V + 128 - 1) // 128) * 128
    sd["transformer.wte.weight"] = torch.nn.functional.pad(sd["transformer.wte.weight"], (0, 0, 0, Vp - V))
    header = torch.zeros(256, dtype=torch.int32)
    version = {"float32": 3, "bfloat16": 5}[dtype]
    header[:8] = torch.tensor([20240326, version, cfg.n_positions, V, L, cfg.n_head, C, Vp])

    def write(t, f):
        if dtype == "float32":
            f.write(t.to(torch.float32).contiguous().numpy().tobytes())
        else:
            f.write(t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())

    with open(path, "wb") as f:
        f.write(header.numpy().tobytes())
        write(sd["transformer.wte.weight"], f)
        write(sd["transformer.wpe.weight"], f)
        for suffix in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                       "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                       "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
            for i in range(L):
                write(sd[f"transformer.h.{i}.{suffix}"], f)
        write(sd["transformer.ln_f.weight"], f)
        write(sd["transformer.ln_f.bias"], f)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llmc_file_written_as_llmc_does(ref_eps5, tmp_path, dtype):
    theirs = _write_llmc_as_llmc_does(ref_eps5.torch_model, tmp_path / "theirs.bin", dtype)
    ids = _ids(TINY["vocab_size"])
    reference = copy.deepcopy(ref_eps5.torch_model)
    if dtype == "bfloat16":  # the model the file holds: every weight rounded to bfloat16
        reference = reference.to(torch.bfloat16).float()
    _assert_close(GPT2.from_pretrained(theirs)(ids), _hf_logits(reference, ids))
    # Our writer makes the same bytes from the Hugging Face file.
    ours = convert(ref_eps5.hub_dir, tmp_path / "ours.bin", dtype=dtype)
    assert ours.read_bytes() == theirs.read_bytes()


def test_llmc_round_trip_is_exact(ref_eps5, tmp_path):
    back = convert(convert(ref_eps5.hub_dir, tmp_path / "model.bin"), tmp_path / "back")
    original = {k: v for k, v in load_file(str(ref_eps5.hub_dir / "model.safetensors")).items()
                if not k.endswith(".attn.bias")}
    written = load_file(str(back / "model.safetensors"))
    assert written.keys() == original.keys()
    for name in original:
        assert np.array_equal(written[name], original[name]), name
    assert load_checkpoint(back).config == load_checkpoint(ref_eps5.hub_dir).config


def test_llmc_refuses_what_llmc_would_run_differently(tiny_ref, tmp_path):
    with pytest.raises(ConfigError, match="layer_norm_epsilon=0.001"):
        convert(tiny_ref.hub_dir, tmp_path / "model.bin")
    with pytest.raises(GPT2Error, match="llm.c stores float32 or bfloat16, not float16"):
        convert(tiny_ref.hub_dir, tmp_path / "model.bin", dtype="float16")
    assert not (tmp_path / "model.bin").exists()


def _corrupt(path, tmp_path, edit):
    data = bytearray(path.read_bytes())
    data = edit(data)
    out = tmp_path / "corrupt.bin"
    out.write_bytes(bytes(data))
    return out


def _set_int(index, value):
    def edit(data):
        data[4 * index:4 * index + 4] = int(value).to_bytes(4, "little", signed=True)
        return data
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda d: d[:-100], r"has \d+ bytes, expected \d+ .*\(truncated file\)"),
    (lambda d: d[:500], r"shorter than the 1024-byte llm.c header"),
    (lambda d: d + b"\0" * 8, r"has \d+ bytes, expected \d+ for the llm.c header"),
    (_set_int(1, 4), r"version is 4, expected one of 3 \(float32\), 5 \(bfloat16\)"),
    (_set_int(6, 97), r"n_embd=97 is not divisible by n_head=3"),
    (_set_int(7, 500), r"padded vocab 500, smaller than the vocab 1000"),
], ids=["truncated", "header-cut", "trailing-bytes", "bad-version", "bad-shape", "bad-vp"])
def test_llmc_bad_file(ref_eps5, tmp_path, edit, message):
    good = convert(ref_eps5.hub_dir, tmp_path / "good.bin")
    bad = _corrupt(good, tmp_path, edit)
    with pytest.raises(CheckpointError, match="^" + str(bad) + ": .*" + message):
        load_checkpoint(bad)


def test_llmc_bad_magic(ref_eps5, tmp_path):
    bad = _corrupt(convert(ref_eps5.hub_dir, tmp_path / "good.bin"), tmp_path, _set_int(0, 20240327))
    with pytest.raises(CheckpointError, match=r"llm.c magic is 20240327, expected 20240326"):
        llmc.load_llmc(bad)
    # Without the magic, a .bin is taken for a PyTorch state dict, which it is not either.
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(bad)


# ---------------------------------------------------------------------------------------------
# PyTorch state dicts


def _nanogpt_state(ref, prefix=""):
    """`ref` under nanoGPT model.py's names: nn.Linear [out, in], lm_head.weight, mask buffers."""
    P = ref.config["n_positions"]
    sd = {}
    for name, tensor in ref.torch_model.state_dict().items():
        sd[prefix + name] = tensor.t().contiguous() if name.endswith(LINEAR) else tensor.clone()
    for i in range(ref.config["n_layer"]):
        sd[f"{prefix}transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
    return sd


def _nanogpt_ckpt(ref, bias=True):
    """nanoGPT train.py's ckpt.pt: model, optimizer, model_args, iter_num, best_val_loss, config."""
    c = ref.config
    model_args = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["n_positions"],
                      bias=bias, vocab_size=c["vocab_size"], dropout=0.0)
    return {"model": _nanogpt_state(ref, prefix="_orig_mod."), "optimizer": {"state": {}, "param_groups": []},
            "model_args": model_args, "iter_num": 100, "best_val_loss": torch.tensor(2.5),
            "config": {"learning_rate": 6e-4, "dataset": "openwebtext"}}


@pytest.mark.parametrize("layout", ["hf-pytorch_model.bin", "hf-bare-pt", "nanogpt-ckpt", "nanogpt-state-dict"])
def test_torch_state_dict_converts(ref_eps5, tmp_path, layout):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "config.json").write_text((ref_eps5.hub_dir / "config.json").read_text())
    if layout == "hf-pytorch_model.bin":
        torch.save(ref_eps5.torch_model.state_dict(), src_dir / "pytorch_model.bin")
        src = src_dir
    elif layout == "hf-bare-pt":
        src = src_dir / "weights.pt"
        torch.save(ref_eps5.torch_model.transformer.state_dict(), src)
    elif layout == "nanogpt-ckpt":
        src = tmp_path / "ckpt.pt"  # no config.json beside: model_args is the config
        torch.save(_nanogpt_ckpt(ref_eps5), src)
    else:
        src = src_dir / "model.pth"
        torch.save(_nanogpt_state(ref_eps5), src)
    dst = convert(src, tmp_path / "out")
    ids = _ids(TINY["vocab_size"])
    _assert_close(_hf_logits(_hf_load(dst), ids), ref_eps5.logits(ids))
    _assert_close(GPT2.from_pretrained(src)(ids), ref_eps5.logits(ids))


def test_nanogpt_without_biases_is_refused(ref_eps5, tmp_path):
    ckpt = _nanogpt_ckpt(ref_eps5, bias=False)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.endswith(".bias")}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="bias=False; GPT-2 needs the linear and layernorm biases"):
        convert(tmp_path / "ckpt.pt", tmp_path / "out")


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle is run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"wte.weight": torch.zeros(2, 2)}, "payload": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt: refused to unpickle (io|builtins)\.open"):
        convert(tmp_path / "evil.pt", tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # The control: an unrestricted unpickle of the same file does run it.
    torch.load(tmp_path / "evil.pt", weights_only=False)["payload"].close()
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# The command line

CLI = (sys.executable, "-m", "numpy_gpt2")
NO_TORCH = r"""
import importlib.abc, runpy, sys

class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, _Blocker())
sys.argv = ["numpy-gpt2", *sys.argv[1:]]
runpy.run_module("numpy_gpt2", run_name="__main__")
"""


def _run(*args, command=CLI):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*command, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def _one_line_error(result, message):
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("numpy-gpt2: error: ") and message in result.stderr, result.stderr


def test_cli_converts(tiny_ref, tmp_path):
    result = _run("convert", tiny_ref.hub_dir, tmp_path / "out", "--dtype", "float16")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.strip() == str(tmp_path / "out")
    assert load_checkpoint(tmp_path / "out").file_dtypes["wte.weight"] == "F16"


def test_cli_errors(tiny_ref, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    _one_line_error(_run("convert", tiny_ref.hub_dir, tiny_ref.hub_dir), "is the source itself")
    _one_line_error(_run("convert", tmp_path / "nothing", tmp_path / "out"), "no such file or directory")
    _one_line_error(_run("convert", tiny_ref.hub_dir, taken), "already holds a model (config.json)")
    _one_line_error(_run("convert", tiny_ref.hub_dir, tmp_path / "x.bin", "--dtype", "float16"),
                    "llm.c stores float32 or bfloat16, not float16")


def test_cli_without_torch_says_so(ref_eps5, tmp_path):
    torch.save(ref_eps5.torch_model.state_dict(), tmp_path / "model.pt")
    result = _run("convert", tmp_path / "model.pt", tmp_path / "out", command=(sys.executable, "-c", NO_TORCH))
    _one_line_error(result, "reading a PyTorch .bin/.pt needs torch: pip install torch, "
                            "or convert it where torch is installed")
    assert not (tmp_path / "out").exists()
