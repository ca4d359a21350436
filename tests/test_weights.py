"""Checkpoint loading: layouts, dtypes, memory mapping, errors, name resolution, config.

References trusted here: Hugging Face transformers (`GPT2LMHeadModel` logits on the same
weights, `GPT2Config`), safetensors' own writer (`safetensors.numpy` / `safetensors.torch`) for
every file the loader reads, torch's float16/bfloat16 rounding, huggingface_hub's cache layout
(`try_to_load_from_cache`), and the published sizes of the GPT-2 models written out below.
"""

import copy
import dataclasses
import json
import mmap
import operator
import os
import pathlib
import re
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import PUBLISHED, TINY, build_reference, tolerance
from numpy_gpt2 import GPT2, GPT2Config
from numpy_gpt2.config import PRESETS
from numpy_gpt2.errors import CheckpointError, ConfigError, ModelNotFoundError
from numpy_gpt2.weights import infer_config, load_checkpoint, release_pages, resolve
from numpy_gpt2.weights.resolve import resolve_model



def _ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def _assert_logits_match(model, ref, seed=0, dtype="float32"):
    ids = _ids(ref.config["vocab_size"], (2, 17), seed)
    expected = ref.logits(ids, dtype)
    np.testing.assert_allclose(model(ids), expected, rtol=0, atol=tolerance(expected, dtype, ref.config))


def _hub_tensors(ref) -> dict:
    """The hub-layout file of `ref`, read by safetensors itself."""
    return load_file(str(ref.hub_dir / "model.safetensors"))


def _write_checkpoint(directory: pathlib.Path, tensors: dict, ref=None, config: dict | None = None) -> pathlib.Path:
    """`directory/model.safetensors` written by safetensors, with `ref`'s config.json (or `config`)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    elif ref is not None:
        shutil.copyfile(ref.hub_dir / "config.json", directory / "config.json")
    return directory / "model.safetensors"


def _copy_hub(ref, directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(ref.hub_dir / name, directory / name)
    return directory


def _at(path) -> str:
    """The start of a message about `path`, as a regex."""
    return "^" + re.escape(str(path)) + ": "


def _header_length(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _rewrite_header(path: pathlib.Path, edit) -> None:
    """Apply `edit` to the JSON header of the safetensors file at `path`, keeping the data."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


# --- Loading the layouts. -------------------------------------------------------------------

@pytest.mark.parametrize("where", ["pretrained_dir", "hub_dir", "pretrained_file", "hub_file"])
def test_layouts_match_transformers(tiny_ref, where):
    """save_pretrained's `transformer.` prefix and the hub's bare names, as a directory or file."""
    directory = getattr(tiny_ref, where.replace("_file", "_dir"))
    path = directory / "model.safetensors" if where.endswith("_file") else directory
    _assert_logits_match(GPT2.from_pretrained(path), tiny_ref)


def test_float32_weights_are_memory_mapped(tiny_ref):
    """The float32 arrays are read-only views whose base chain ends in the file's mmap (all but
    wte and the blocks' tensors, which the model copies)."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    for array in (model.wpe, model.ln_f.weight, model.ln_f.bias):
        assert not array.flags.owndata and not array.flags.writeable
        chain = [array]
        while getattr(chain[-1], "base", None) is not None:
            chain.append(chain[-1].base)
        assert any(isinstance(a, np.memmap) for a in chain)
        assert isinstance(chain[-1], mmap.mmap)


def test_block_tensors_are_one_array_in_the_order_a_step_reads_them(tiny_ref):
    """Every block's tensors are copies in one array (so that nearly all of it is on huge
    pages), in the order a decoding step reads them, holding the file's values (as
    safetensors reads them): the matrices as the .T views of [out, in] rows."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    file = load_file(str(tiny_ref.hub_dir / "model.safetensors"))
    order = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias")
    arrays = [(f"h.{i}.{name}", operator.attrgetter(name)(block)) for i, block in enumerate(model.h) for name in order]
    memory = arrays[0][1].base
    while memory.base is not None:
        memory = memory.base
    start = memory.ctypes.data
    for name, array in arrays:
        np.testing.assert_array_equal(array, file[name], err_msg=name)
        owner = array.base
        while owner.base is not None:
            owner = owner.base
        assert owner is memory, name
        if array.ndim == 2:
            assert array.T.flags.c_contiguous, name                                 # [out, in] rows
        assert array.__array_interface__["data"][0] == start, f"{name} is not where the one before it ends"
        start += array.nbytes
    assert start == memory.ctypes.data + memory.nbytes


def _resident_file_kib() -> int:
    """This process's resident pages that are mapped files, as Linux counts them (RssShmem
    too, for a tmp_path on tmpfs)."""
    with open("/proc/self/status") as status:
        return sum(int(line.split()[1]) for line in status if line.startswith(("RssFile:", "RssShmem:")))


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or not hasattr(mmap, "MADV_DONTNEED"),
                    reason="needs Linux's /proc/self/status and madvise")
def test_release_pages_hands_file_pages_back_and_keeps_the_data(tmp_path):
    data = np.random.default_rng(0).random(8 * 2**20)                    # 64 MiB of float64
    path = tmp_path / "big.bin"
    data.tofile(path)
    view = np.memmap(path, dtype=np.float64, mode="r")[1001:]             # starts inside a page
    before = _resident_file_kib()
    assert view.sum() == data[1001:].sum()
    touched = _resident_file_kib()
    assert touched - before > 60 * 1024
    release_pages(view)
    assert touched - _resident_file_kib() > 60 * 1024
    np.testing.assert_array_equal(view, data[1001:])                     # read back from the page cache

    # Left alone: ordinary memory, and a copy-on-write map whose changes madvise would drop.
    copy_ = data[:1024].copy()
    release_pages(copy_)
    np.testing.assert_array_equal(copy_, data[:1024])
    changed = np.memmap(path, dtype=np.float64, mode="c")
    changed[:] = 1.0
    release_pages(changed)
    assert np.all(changed == 1.0)


def test_converted_files_keep_no_file_pages(tiny_ref, tmp_path):
    """float64 compute converts every tensor: the model then holds none of the file's pages,
    and its logits still match (the pages were read before they were handed back)."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir, dtype="float64")
    for array in (model.wte, model.h[0].attn.c_attn.weight, model.ln_f.bias):
        chain = [array]
        while getattr(chain[-1], "base", None) is not None:
            chain.append(chain[-1].base)
        assert chain[-1].flags.owndata                                    # not a view of the map
    _assert_logits_match(model, tiny_ref, dtype="float64")


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("file_dtype", ["float16", "bfloat16"])
def test_half_precision_files(tiny_ref, tmp_path, file_dtype, compute):
    """A float16/bfloat16 file equals torch run on the weights rounded through that dtype.

    Widening fp16/bf16 to float32 or float64 is exact, so the reference is torch in the compute
    dtype on `w.to(file_dtype).to(compute)`, and the usual tolerance applies.
    """
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save_file

    half = getattr(torch, file_dtype)
    state = tiny_ref.torch_model.transformer.state_dict()
    tensors = {k: v.detach().to(half).contiguous() for k, v in state.items()}
    tmp_path.joinpath("half").mkdir()
    torch_save_file(tensors, str(tmp_path / "half" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(tiny_ref.hub_dir / "config.json", tmp_path / "half" / "config.json")

    rounded = copy.deepcopy(tiny_ref.torch_model).to(getattr(torch, compute))
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(half).to(p.dtype))
    ids = _ids(1000, (2, 17))
    with torch.no_grad():
        expected = rounded(torch.as_tensor(ids)).logits.numpy()

    model = GPT2.from_pretrained(tmp_path / "half", dtype=compute)
    if compute == "float32":  # kept in the file's bfloat16 or float16 (`kernels.narrow`)
        assert model.weights == file_dtype
    else:
        assert model.h[1].mlp.c_fc.weight.dtype == np.dtype(compute)
    logits = model(ids)
    assert logits.dtype == np.dtype(compute)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=tolerance(expected, compute, tiny_ref.config))


# --- A bare .safetensors file: the config from the shapes. ---------------------------------

@pytest.fixture(scope="module")
def default_eps_ref(tmp_path_factory):
    """The tiny shape with GPT-2's own layer_norm_epsilon (1e-5), the one a bare file implies."""
    config = {k: v for k, v in TINY.items() if k != "layer_norm_epsilon"}
    return build_reference(config, tmp_path_factory.mktemp("default-eps"), seed=7)


def test_bare_file_with_n_head(default_eps_ref, tmp_path):
    bare = tmp_path / "bare.safetensors"
    shutil.copyfile(default_eps_ref.hub_dir / "model.safetensors", bare)
    model = GPT2.from_pretrained(bare, n_head=3)
    hf = default_eps_ref.torch_model.config
    assert (model.config.vocab_size, model.config.n_positions, model.config.n_embd,
            model.config.n_layer, model.config.n_head) == (hf.vocab_size, hf.n_positions, hf.n_embd,
                                                           hf.n_layer, hf.n_head)
    _assert_logits_match(model, default_eps_ref)


def test_bare_file_without_n_head_asks_for_it(tiny_ref, tmp_path):
    bare = tmp_path / "bare.safetensors"
    shutil.copyfile(tiny_ref.hub_dir / "model.safetensors", bare)
    with pytest.raises(CheckpointError, match=rf"{_at(bare)}.*n_embd=96, n_layer=3.*--n-head / n_head="):
        GPT2.from_pretrained(bare)


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_bare_file_of_a_preset_size_infers_its_heads(preset):
    """Shapes only (zero-stride arrays, no memory): each published size gives its n_head."""
    C, L, H = PUBLISHED[preset]
    shape = lambda *s: np.broadcast_to(np.float32(0), s)  # noqa: E731
    tensors = {"wte.weight": shape(50257, C), "wpe.weight": shape(1024, C)}
    for i in range(L):
        tensors.update({f"h.{i}.ln_1.weight": shape(C), f"h.{i}.mlp.c_fc.weight": shape(C, 4 * C)})
    config = infer_config(tensors, "bare.safetensors")
    assert (config.n_embd, config.n_layer, config.n_head, config.inner_dim) == (C, L, H, 4 * C)
    assert (config.vocab_size, config.n_positions) == (50257, 1024)


# --- Errors: each names the file and what is wrong. ----------------------------------------

def _cut(fraction_of: str):
    """A function truncating a copied file at a point given relative to its header."""
    def cut(path: pathlib.Path):
        n = _header_length(path)
        size = path.stat().st_size
        keep = {"data": 8 + n + (size - 8 - n) // 2, "header": 8 + n // 2, "4 bytes": 4}[fraction_of]
        path.write_bytes(path.read_bytes()[:keep])
    return cut


@pytest.mark.parametrize("where, message", [
    ("data", r"tensor \S+ ends at byte \d+ but the file has \d+ bytes \(truncated file\)"),
    ("header", r"header length \d+ does not fit a file of \d+ bytes \(truncated"),
    ("4 bytes", r"file of 4 bytes is too short to be safetensors"),
])
def test_truncated_file(tiny_ref, tmp_path, where, message):
    directory = _copy_hub(tiny_ref, tmp_path / "ckpt")
    path = directory / "model.safetensors"
    _cut(where)(path)
    with pytest.raises(CheckpointError, match=rf"{_at(path)}{message}"):
        GPT2.from_pretrained(directory)


def test_info_verify_of_safetensors_checks_the_header_and_sizes(tiny_ref, tmp_path, capsys):
    # safetensors stores no checksum: --verify is the header and size checks every load makes.
    from numpy_gpt2 import cli

    directory = _copy_hub(tiny_ref, tmp_path / "ckpt")
    assert cli.main(["info", "--model", str(directory), "--verify"]) == 0
    n_tensors = 2 + 12 * tiny_ref.config["n_layer"] + 2  # wte, wpe; 12 per block; ln_f
    assert capsys.readouterr().out.splitlines()[0] == f"verified {n_tensors} tensors"
    _cut("data")(directory / "model.safetensors")
    assert cli.main(["info", "--model", str(directory), "--verify"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert re.search(r"tensor \S+ ends at byte \d+ but the file has \d+ bytes \(truncated file\)", captured.err)


def test_corrupt_header_json(tiny_ref, tmp_path):
    directory = _copy_hub(tiny_ref, tmp_path / "ckpt")
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("[")  # the header's opening brace, now an unbalanced bracket
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{_at(path)}corrupt safetensors header"):
        GPT2.from_pretrained(directory)


def test_missing_tensor(tiny_ref, tmp_path):
    tensors = _hub_tensors(tiny_ref)
    del tensors["h.1.mlp.c_fc.bias"]
    path = _write_checkpoint(tmp_path / "ckpt", tensors, tiny_ref)
    with pytest.raises(CheckpointError, match=rf"{_at(path)}missing tensor h\.1\.mlp\.c_fc\.bias$"):
        GPT2.from_pretrained(path.parent)


@pytest.mark.parametrize("name, shape, expected", [
    ("h.1.attn.c_attn.weight", (96, 287), (96, 288)),
    ("h.2.ln_2.bias", (97,), (96,)),
    ("wpe.weight", (41, 96), (40, 96)),
])
def test_wrong_shape(tiny_ref, tmp_path, name, shape, expected):
    tensors = _hub_tensors(tiny_ref)
    assert tensors[name].shape == expected  # the reference file agrees on the right shape
    tensors[name] = np.zeros(shape, np.float32)
    path = _write_checkpoint(tmp_path / "ckpt", tensors, tiny_ref)
    found, want = (re.escape(str(s)) for s in (shape, expected))
    message = rf"{_at(path)}tensor {re.escape(name)} has shape {found}, expected {want}"
    with pytest.raises(CheckpointError, match=message):
        GPT2.from_pretrained(path.parent)


def test_unknown_layout(tiny_ref, tmp_path):
    tensors = {"model.layers.0.weight": np.zeros((4, 4), np.float32), "model.embed.weight": np.zeros(4, np.float32)}
    path = _write_checkpoint(tmp_path / "ckpt", tensors, tiny_ref)
    with pytest.raises(CheckpointError, match=rf"{_at(path)}unknown checkpoint layout: found model\.embed\.weight, "
                                              r"model\.layers\.0\.weight"):
        GPT2.from_pretrained(path.parent)


def test_unknown_extra_tensor(tiny_ref, tmp_path):
    tensors = _hub_tensors(tiny_ref)
    tensors["h.3.ln_1.weight"] = np.ones(96, np.float32)
    path = _write_checkpoint(tmp_path / "ckpt", tensors, tiny_ref)
    with pytest.raises(CheckpointError, match=rf"{_at(path)}unknown tensor h\.3\.ln_1\.weight .*n_layer=3"):
        GPT2.from_pretrained(path.parent)


def test_integer_weight_is_refused(tiny_ref, tmp_path):
    tensors = _hub_tensors(tiny_ref)
    tensors["h.0.attn.c_proj.weight"] = np.zeros((96, 96), np.int32)
    path = _write_checkpoint(tmp_path / "ckpt", tensors, tiny_ref)
    message = rf"{_at(path)}tensor h\.0\.attn\.c_proj\.weight has dtype I32, expected one of F32"
    with pytest.raises(CheckpointError, match=message):
        GPT2.from_pretrained(path.parent)


def test_dtype_unknown_to_the_reader(tiny_ref, tmp_path):
    """A dtype safetensors defines but the reader does not (one-byte float8)."""
    directory = _copy_hub(tiny_ref, tmp_path / "ckpt")
    path = directory / "model.safetensors"
    _rewrite_header(path, lambda h: h["ln_f.bias"].update(dtype="F8_E5M2"))
    with pytest.raises(CheckpointError, match=rf"{_at(path)}tensor ln_f\.bias has unsupported dtype 'F8_E5M2'"):
        GPT2.from_pretrained(directory)


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, r"activation_function 'relu' is not supported"),
    ({"n_head": 5}, r"n_embd=96 is not divisible by n_head=5"),
])
def test_bad_config_json(tiny_ref, tmp_path, change, message):
    config = {**json.loads((tiny_ref.hub_dir / "config.json").read_text()), **change}
    path = _write_checkpoint(tmp_path / "ckpt", _hub_tensors(tiny_ref), config=config)
    with pytest.raises(ConfigError, match=rf"{_at(path.parent / 'config.json')}{message}"):
        GPT2.from_pretrained(path.parent)


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=rf"{_at(tmp_path)}no checkpoint in this directory"):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["missing", "missing.safetensors"])
def test_nonexistent_path(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ModelNotFoundError, match=rf"{_at(path)}no such file or directory"):
        GPT2.from_pretrained(path)
    with pytest.raises(ModelNotFoundError, match=rf"{_at(path)}no such file or directory"):
        load_checkpoint(path)


# --- Names: ./weights/NAME and the Hugging Face cache. --------------------------------------

@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty HF_HUB_CACHE, no HF_HOME, an empty cwd and checkout weights/: nothing real leaks in."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setattr(resolve, "_CHECKOUT_WEIGHTS", tmp_path / "checkout" / "weights")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path


def _fill_cache(ref, hub: pathlib.Path, repo_dir: str, revision: str) -> pathlib.Path:
    """Lay out a repo the way huggingface_hub does: blobs, refs/main, symlinked snapshot files."""
    repo = hub / repo_dir
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"{revision[:8]}-{name}"
        shutil.copyfile(ref.hub_dir / name, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"


@pytest.mark.parametrize("repo_dir", ["models--openai-community--gpt2", "models--gpt2"])
def test_name_found_in_hf_hub_cache(tiny_ref, isolated, repo_dir):
    snapshot = _fill_cache(tiny_ref, isolated / "hub", repo_dir, REVISION)
    assert pathlib.Path(resolve_model("gpt2")) == snapshot
    huggingface_hub = pytest.importorskip("huggingface_hub")
    repo_id = repo_dir.removeprefix("models--").replace("--", "/")
    assert huggingface_hub.try_to_load_from_cache(repo_id, "model.safetensors", cache_dir=isolated / "hub") \
        == str(snapshot / "model.safetensors")
    _assert_logits_match(GPT2.from_pretrained("gpt2"), tiny_ref)


def test_name_found_under_hf_home(tiny_ref, isolated, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(isolated / "home"))
    snapshot = _fill_cache(tiny_ref, isolated / "home" / "hub", "models--openai-community--gpt2", REVISION)
    assert pathlib.Path(resolve_model("openai-community/gpt2")) == snapshot
    _assert_logits_match(GPT2.from_pretrained("gpt2"), tiny_ref)


def test_refs_main_wins_over_a_newer_snapshot(tiny_refs, isolated):
    """huggingface_hub serves the revision refs/main names, not the latest written snapshot."""
    hub = isolated / "hub"
    main = _fill_cache(tiny_refs["tiny"], hub, "models--openai-community--gpt2", REVISION)
    newer = hub / "models--openai-community--gpt2" / "snapshots" / ("f" * 40)
    _copy_hub(tiny_refs["tiny-inner"], newer)
    os.utime(main, (1, 1))
    assert pathlib.Path(resolve_model("gpt2")) == main
    huggingface_hub = pytest.importorskip("huggingface_hub")
    assert huggingface_hub.try_to_load_from_cache("openai-community/gpt2", "model.safetensors", cache_dir=hub) \
        == str(main / "model.safetensors")


@pytest.mark.parametrize("name", ["gpt2-medium", "openai-community/gpt2-medium"])
def test_name_found_in_weights_under_cwd(tiny_ref, isolated, name):
    _copy_hub(tiny_ref, pathlib.Path("weights") / "gpt2-medium")
    assert pathlib.Path(resolve_model(name)).resolve() == (isolated / "cwd" / "weights" / "gpt2-medium")
    _assert_logits_match(GPT2.from_pretrained(name), tiny_ref)


def test_unknown_name_says_where_it_looked(isolated):
    with pytest.raises(ModelNotFoundError) as info:
        GPT2.from_pretrained("gpt7")
    message = str(info.value)
    assert message.startswith("model 'gpt7' not found; looked in: ")
    for place in ("weights/gpt7", str(isolated / "checkout" / "weights" / "gpt7"),
                  str(isolated / "hub" / "models--gpt7")):
        assert place in message


# --- GPT2Config. ----------------------------------------------------------------------------

def test_presets_are_the_published_sizes():
    assert set(PRESETS) == set(PUBLISHED)
    for name, (C, L, H) in PUBLISHED.items():
        config = GPT2Config.from_preset(name)
        assert (config.n_embd, config.n_layer, config.n_head) == (C, L, H), name
        assert (config.vocab_size, config.n_positions, config.inner_dim) == (50257, 1024, 4 * C), name


FIELDS = [f.name for f in dataclasses.fields(GPT2Config)]
HF_CONFIGS = [
    {},
    dict(vocab_size=1000, n_positions=40, n_embd=96, n_layer=3, n_head=3, n_inner=200,
         layer_norm_epsilon=1e-3, activation_function="gelu_pytorch_tanh", scale_attn_weights=False,
         scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, bos_token_id=7, eos_token_id=9),
]


@pytest.mark.parametrize("fields", HF_CONFIGS, ids=["defaults", "every-field"])
def test_config_round_trips_through_transformers(fields, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Config(**fields)
    ours = GPT2Config.from_dict(hf.to_dict())
    for name in FIELDS:
        assert getattr(ours, name) == getattr(hf, name), name
    back = transformers.GPT2Config.from_dict(ours.to_dict())
    for name in FIELDS:
        assert getattr(back, name) == getattr(hf, name), name
    ours.save_json(tmp_path / "config.json")
    from_file = transformers.GPT2Config.from_json_file(tmp_path / "config.json")
    for name in FIELDS:
        assert getattr(from_file, name) == getattr(hf, name), name


def test_save_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text("original")

    def fail(src, dst):
        raise OSError("disk full")

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        GPT2Config(n_layer=2).save_json(path)
    assert path.read_text() == "original"
    assert os.listdir(tmp_path) == ["config.json"]
    monkeypatch.setattr(os, "replace", real_replace)
    GPT2Config(n_layer=2).save_json(path)
    assert json.loads(path.read_text())["n_layer"] == 2
    assert os.listdir(tmp_path) == ["config.json"]
