"""Tests of the TensorFlow checkpoint reader against a checkpoint written by real TensorFlow.

References trusted here: the fixture itself (written by TF 2.21 `tf.compat.v1.train.Saver`),
Hugging Face transformers' `GPT2LMHeadModel` forward pass, whose logits the fixture stores
(checked against both transformers and the engine loading the directory),
a bit-by-bit CRC-32C written from the polynomial and checked against its published check
value, used to craft corrupt index files that still pass the block checksums, and the crc32c of
each tensor that TensorFlow stored in the index, which a flipped data byte must contradict.
"""

import mmap
import pathlib
import re
import shutil

import numpy as np
import pytest

from conftest import TF_TINY, shared_file, tolerance
from fuzz_files import block_handles, crc32c_reference as _crc32c_reference, gpt2_shapes, masked as _masked
from numpy_gpt2 import GPT2, cli
from numpy_gpt2.errors import CheckpointError, ModelNotFoundError
from numpy_gpt2.weights import load_checkpoint
from numpy_gpt2.weights.crc32c import crc32c
from numpy_gpt2.weights.tf_bundle import TensorBundle
from numpy_gpt2.weights.tf_checkpoint import is_tf_checkpoint_dir, load_tf_checkpoint

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "fixtures" / "openai-tf-tiny"
CHECKPOINT_FILES = ("checkpoint", "hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")
INDEX = "model.ckpt.index"
DATA = "model.ckpt.data-00000-of-00001"
V, P, C, L = 50257, 64, 32, 2


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared TensorFlow fixture, see ../shared/README.md)")
    return path


@pytest.fixture
def fixture_dir() -> pathlib.Path:
    for name in CHECKPOINT_FILES:
        _require(FIXTURE / name)
    return FIXTURE


@pytest.fixture
def ckpt_copy(fixture_dir, tmp_path) -> pathlib.Path:
    """A writable copy of the checkpoint files (copyfile: the fixture files are read-only)."""
    target = tmp_path / "ckpt"
    target.mkdir()
    for name in CHECKPOINT_FILES:
        shutil.copyfile(fixture_dir / name, target / name)
    return target


# --- The reference CRC-32C (tests/fuzz_files.py: one bit at a time, from the polynomial). ----

def test_reference_crc32c_check_value():
    assert _crc32c_reference(b"123456789") == 0xE3069283  # the published CRC-32C check value


@pytest.mark.parametrize("n", [0, 1, 9, 4095, 65535, 65536, 65537, 4096 * 3 + 7, 262147])
def test_crc32c_matches_reference(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32c(data) == _crc32c_reference(data)


# --- Reading the fixture. ---------------------------------------------------------------------

def _expected_shapes() -> dict:
    """The shapes the fixture README gives, under Hugging Face names, Conv1D squeezed to [in, out]."""
    return gpt2_shapes(V, P, C, L)


def _buffer_root(array: np.ndarray):
    root = array
    while isinstance(root, np.ndarray):
        root = root.base
    return root.obj if isinstance(root, memoryview) else root


def test_names_shapes_dtypes_and_memory_map(fixture_dir):
    config, tensors = load_tf_checkpoint(fixture_dir)
    assert (config.vocab_size, config.n_positions, config.n_embd, config.n_head, config.n_layer) == (V, P, C, 4, L)
    assert {k: v.shape for k, v in tensors.items()} == _expected_shapes()
    for name, array in tensors.items():
        assert array.dtype == np.float32, name
        assert not array.flags.owndata and not array.flags.writeable, name
        assert isinstance(_buffer_root(array), mmap.mmap), name


def test_logits_match_transformers(fixture_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    expected = np.load(_require(fixture_dir / "expected_logits.npz"))
    _, tensors = load_tf_checkpoint(fixture_dir)

    hf_config = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=4,
                                        attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(hf_config).eval().float()
    # HF's Conv1D stores [in, out] like OpenAI's, so the arrays load untransposed.
    state = {"transformer." + k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied to wte
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        logits = model(torch.from_numpy(expected["input_ids"])).logits.numpy()

    # float32 through two tiny blocks: differences are rounding (see conftest.tolerance).
    for got, want in ((logits[:, :, :512], expected["logits_head"]), (logits[:, -1, :], expected["logits_last"])):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want, "float32", TF_TINY))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_engine_logits_match_the_fixture(fixture_dir, dtype):
    """GPT2.from_pretrained on the checkpoint directory, against the logits the fixture stores
    (transformers in float32). The bound, conftest.tolerance for the fixture's shape, is
    8 u x max(1, max |logit|) = 9.5e-7; measured: 2.2e-7 in float32 (both sides round) and
    1.8e-7 in float64 (the fixture's own float32 rounding)."""
    expected = np.load(shared_file("fixtures", "openai-tf-tiny", "expected_logits.npz"))
    model = GPT2.from_pretrained(fixture_dir, dtype=dtype)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (L, C, P)
    logits = model(expected["input_ids"])
    assert logits.dtype == np.dtype(dtype)
    for got, want in ((logits[:, :, :512], expected["logits_head"]), (logits[:, -1, :], expected["logits_last"])):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want, "float32", TF_TINY))


def test_raw_bundle_names_and_conv1d_squeeze(fixture_dir):
    raw = TensorBundle(fixture_dir / "model.ckpt").read()
    assert raw["model/h0/attn/c_attn/w"].shape == (1, C, 3 * C)  # OpenAI's Conv1D layout
    assert raw["model/wte"].shape == (V, C) and raw["model/h1/mlp/c_proj/w"].shape == (1, 4 * C, C)
    _, tensors = load_tf_checkpoint(fixture_dir)
    np.testing.assert_array_equal(tensors["h.0.attn.c_attn.weight"], raw["model/h0/attn/c_attn/w"][0])


def test_verify_accepts_the_fixture(fixture_dir):
    _, checked = load_tf_checkpoint(fixture_dir, verify=True)
    assert len(checked) == len(_expected_shapes())


def test_is_tf_checkpoint_dir(fixture_dir, ckpt_copy, tmp_path):
    assert is_tf_checkpoint_dir(fixture_dir)
    assert not is_tf_checkpoint_dir(tmp_path / "nowhere")
    assert not is_tf_checkpoint_dir(fixture_dir / "hparams.json")
    (ckpt_copy / "hparams.json").unlink()
    assert not is_tf_checkpoint_dir(ckpt_copy)


def test_prefix_from_checkpoint_file(ckpt_copy):
    for suffix in (".index", ".data-00000-of-00001"):
        (ckpt_copy / ("model.ckpt" + suffix)).rename(ckpt_copy / ("model-1000" + suffix))
    (ckpt_copy / "checkpoint").write_text('model_checkpoint_path: "model-1000"\n')
    assert is_tf_checkpoint_dir(ckpt_copy)
    assert load_tf_checkpoint(ckpt_copy)[1]["wte.weight"].shape == (V, C)
    # An absolute path recorded on another machine: the files are looked for here instead.
    (ckpt_copy / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/run1/model-1000"\n')
    assert load_tf_checkpoint(ckpt_copy)[1]["wpe.weight"].shape == (P, C)


def test_prefix_defaults_to_model_ckpt(ckpt_copy):
    (ckpt_copy / "checkpoint").unlink()
    assert is_tf_checkpoint_dir(ckpt_copy)
    assert len(load_tf_checkpoint(ckpt_copy)[1]) == len(_expected_shapes())


# --- Missing files. ---------------------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nowhere: no such directory.*hparams.json"):
        load_tf_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("name, message", [
    ("hparams.json", r"hparams\.json: file not found; .*directory holds hparams\.json, <prefix>\.index"),
    (INDEX, r"model\.ckpt\.index: file not found"),
    (DATA, r"model\.ckpt\.data-00000-of-00001: data shard not found .*model\.ckpt\.index"),
])
def test_missing_file(ckpt_copy, name, message):
    (ckpt_copy / name).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_tf_checkpoint(ckpt_copy)


# --- A corrupt index. -------------------------------------------------------------------------

def _load_with_index(directory: pathlib.Path, index: bytes):
    (directory / INDEX).write_bytes(index)
    return load_tf_checkpoint(directory)


@pytest.mark.parametrize("keep", [0, 1, 47, 48, 100, 500, 900, -48, -47, -20, -8, -1])
def test_truncated_index(ckpt_copy, keep):
    index = (ckpt_copy / INDEX).read_bytes()
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: corrupt or truncated tensor-bundle index"):
        _load_with_index(ckpt_copy, index[:keep])


def test_every_truncation_is_a_checkpoint_error(ckpt_copy):
    index = (ckpt_copy / INDEX).read_bytes()
    for keep in range(len(index)):
        with pytest.raises(CheckpointError, match=r"model\.ckpt\.index"):
            _load_with_index(ckpt_copy, index[:keep])


@pytest.mark.parametrize("position", [-8, -5, -1])
def test_bad_footer_magic(ckpt_copy, position):
    index = bytearray((ckpt_copy / INDEX).read_bytes())
    index[position] ^= 0xFF
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: .*footer magic"):
        _load_with_index(ckpt_copy, bytes(index))


def _single_data_block(index: bytes) -> int:
    """The size of the fixture's one data block, which a table always starts at offset 0.

    Block order in a table written by TF: data blocks, metaindex, index, footer; so with one data
    block the metaindex handle (first varint of the footer) starts right after its 5-byte trailer.
    The stored checksum confirms the reading.
    """
    (offset, _), _ = block_handles(index[-48:])
    size = offset - 5
    assert int.from_bytes(index[size + 1 : size + 5], "little") == _masked(_crc32c_reference(index[: size + 1]))
    return size


def _patch_block(index: bytes, position: int, new: bytes) -> bytes:
    """Overwrite bytes inside the data block and recompute its trailer checksum."""
    size = _single_data_block(index)
    assert position + len(new) <= size + 1
    patched = bytearray(index)
    patched[position : position + len(new)] = new
    patched[size + 1 : size + 5] = _masked(_crc32c_reference(bytes(patched[: size + 1]))).to_bytes(4, "little")
    return bytes(patched)


def test_every_byte_flip_loads_or_is_a_checkpoint_error(ckpt_copy):
    """A flip may land where nothing reads it (footer padding, the empty metaindex block);
    one in the data block or the magic must be reported, and nothing but CheckpointError escapes."""
    index = (ckpt_copy / INDEX).read_bytes()
    must_fail = set(range(_single_data_block(index) + 5)) | set(range(len(index) - 8, len(index)))
    for position in range(len(index)):
        corrupt = bytearray(index)
        corrupt[position] ^= 0x5A
        try:
            _load_with_index(ckpt_copy, bytes(corrupt))
        except CheckpointError as exc:
            assert INDEX in str(exc)
        else:
            assert position not in must_fail, position


def test_flipped_block_byte_fails_checksum(ckpt_copy):
    index = bytearray((ckpt_copy / INDEX).read_bytes())
    index[100] ^= 0x01
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: .*data block at offset 0 fails its crc32c"):
        _load_with_index(ckpt_copy, bytes(index))


def _value_start(index: bytes, key: bytes) -> int:
    """Where the value of the first key ending in `key` starts (the fixture's keys are distinct)."""
    assert index.count(key) == 1
    return index.find(key) + len(key)


@pytest.mark.parametrize("offset, new, message", [
    (3, b"\x7f", r"field 2 claims 127 bytes"),          # shape: length beyond the entry
    (0, b"\x0b", r"wire type 3"),                       # dtype tag turned into a group start
    (0, b"\x00", r"field number 0"),
    (9, b"\xff" * 7, r"varint at byte 9 is truncated"),   # field 5 (size) runs off the end
    (0, b"\x08" + b"\xff" * 9 + b"\x02", r"varint at byte 1 does not fit in 64 bits"),
    (0, b"\x08" + b"\xff" * 10 + b"\x01", r"varint at byte 1 is longer than"),
])
def test_garbage_entry_proto(ckpt_copy, offset, new, message):
    # The first entry's key is stored whole: "model/h0/attn/c_attn/b", then its BundleEntryProto.
    index = (ckpt_copy / INDEX).read_bytes()
    start = _value_start(index, b"model/h0/attn/c_attn/b")
    corrupt = _patch_block(index, start + offset, new)
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: .*tensor model/h0/attn/c_attn/b: .*" + message):
        _load_with_index(ckpt_copy, corrupt)


def test_compressed_block_is_refused(ckpt_copy):
    index = (ckpt_copy / INDEX).read_bytes()
    corrupt = _patch_block(index, _single_data_block(index), b"\x01")  # the trailer's type byte
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: .*compression type 1 \(snappy\)"):
        _load_with_index(ckpt_copy, corrupt)


def test_unknown_variable(ckpt_copy):
    # "model/wpe" is stored as shared prefix "model/" + "wpe"; "wpx" keeps the keys in order.
    index = (ckpt_copy / INDEX).read_bytes()
    corrupt = _patch_block(index, index.find(b"wpe"), b"wpx")
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: unknown GPT-2 variable model/wpx"):
        _load_with_index(ckpt_copy, corrupt)


def test_entry_size_disagrees_with_shape(ckpt_copy):
    # model/h0/attn/c_attn/b: ... 0x28 (field 5, size) 0x80 0x03 (384 = 96 float32) -> 256.
    index = (ckpt_copy / INDEX).read_bytes()
    start = _value_start(index, b"model/h0/attn/c_attn/b")
    size_field = index.index(b"\x28\x80\x03", start)
    corrupt = _patch_block(index, size_field + 1, b"\x80\x02")
    with pytest.raises(CheckpointError, match=r"tensor model/h0/attn/c_attn/b has 256 bytes, expected 384 "
                                              r"for shape \(96,\) of float32"):
        _load_with_index(ckpt_copy, corrupt)


# --- A corrupt data shard. --------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 1000, -1])
def test_truncated_data_shard(ckpt_copy, keep):
    data = (ckpt_copy / DATA).read_bytes()
    (ckpt_copy / DATA).write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.ckpt\.data-00000-of-00001: tensor model/\S+ needs bytes "
                                              r"\[\d+, \d+\) but the file has \d+ bytes"):
        load_tf_checkpoint(ckpt_copy)


def test_verify_catches_a_flipped_tensor_byte(ckpt_copy):
    # TF writes tensors in key order, so the file ends with model/wte, the last key.
    data = bytearray((ckpt_copy / DATA).read_bytes())
    data[-1] ^= 0x01
    (ckpt_copy / DATA).write_bytes(bytes(data))
    assert load_tf_checkpoint(ckpt_copy)[1]["wte.weight"].shape == (V, C)  # sizes alone look fine
    with pytest.raises(CheckpointError, match=r"data-00000-of-00001: tensor model/wte fails its crc32c check"):
        load_tf_checkpoint(ckpt_copy, verify=True)


# --- Verifying on the user's paths: load_checkpoint(verify=True), `info --verify`, `convert --verify`. ---

def _flip_a_byte_inside(directory: pathlib.Path, tf_name: str) -> None:
    """Flip one bit in the middle of tensor `tf_name`'s bytes in the data shard."""
    entry = TensorBundle(directory / "model.ckpt").entries[tf_name]
    data = bytearray((directory / DATA).read_bytes())
    data[entry.offset + entry.size // 2] ^= 0x10
    (directory / DATA).write_bytes(bytes(data))


def test_load_checkpoint_verify_accepts_the_fixture(fixture_dir):
    assert len(load_checkpoint(fixture_dir, verify=True).tensors) == len(_expected_shapes())


@pytest.mark.parametrize("tf_name", ["model/h0/attn/c_attn/b", "model/h1/mlp/c_fc/w", "model/wpe"])
def test_load_checkpoint_verify_names_the_flipped_tensor(ckpt_copy, tf_name):
    _flip_a_byte_inside(ckpt_copy, tf_name)
    assert len(load_checkpoint(ckpt_copy).tensors) == len(_expected_shapes())  # sizes alone look fine
    with pytest.raises(CheckpointError, match=rf"{DATA}: tensor {tf_name} fails its crc32c check"):
        load_checkpoint(ckpt_copy, verify=True)


def test_info_verify_reports_the_tensors_checked(fixture_dir, capsys):
    assert cli.main(["info", "--model", str(fixture_dir), "--verify"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"verified {len(_expected_shapes())} tensors"
    assert captured.err == ""


def test_info_verify_names_the_flipped_tensor_in_one_line(ckpt_copy, capsys):
    _flip_a_byte_inside(ckpt_copy, "model/h1/mlp/c_fc/w")
    assert cli.main(["info", "--model", str(ckpt_copy)]) == 0
    assert "verified" not in capsys.readouterr().out
    assert cli.main(["info", "--model", str(ckpt_copy), "--verify"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(rf"numpy-gpt2: error: \S+{DATA}: tensor model/h1/mlp/c_fc/w fails its crc32c check "
                        r"\(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\)\n", captured.err)


def test_convert_verify_refuses_a_corrupt_source(ckpt_copy, tmp_path, capsys):
    _flip_a_byte_inside(ckpt_copy, "model/wpe")
    assert cli.main(["convert", str(ckpt_copy), str(tmp_path / "out"), "--verify"]) == 1
    assert "tensor model/wpe fails its crc32c check" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main(["convert", str(ckpt_copy), str(tmp_path / "out")]) == 0  # without it, nothing notices
