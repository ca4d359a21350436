"""Every loader under hostile files: each bad file is one GPT2Error naming the file, nothing else.

Every case runs guarded (`_guarded`): a hang is cut off after `BUDGET_S` seconds and the
address space is capped at what the process uses plus 1 GiB, so a loader that allocates what
a header declares before checking it against the file fails with MemoryError instead of passing.
Any exception other than a GPT2Error fails the test with its own traceback. A subprocess loads
the whole explicit corpus once more, so a crash (a signal) or a large peak RSS shows too.

References trusted here: the seeds of tests/fuzz_files.py (written from the formats' specs,
each checked to load to the arrays it was written from); the `safetensors` library, whose refusal
of a file ours must match; the fixture index real TensorFlow wrote, which fuzz_files's table
writer must reproduce byte for byte. Property-based cases use hypothesis with a fixed seed
(derandomize) and few enough examples that the file runs in seconds.
"""

import contextlib
import json
import math
import os
import pathlib
import resource
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_files as ff
from numpy_gpt2 import GPT2
from numpy_gpt2.errors import GPT2Error
from numpy_gpt2.weights import load_checkpoint

# A loader reads headers only, in milliseconds; a case still running after this is a hang.
BUDGET_S = 5
# Address space a case may add: far above what a tiny file needs, far below any size a
# corrupt header declares (the shapes below overflow 2**32 elements and more).
SPARE_BYTES = 1 << 30
# A message is one readable line: whatever a file holds, at most this much besides its path.
MESSAGE_CHARS = 400
FUZZ = settings(derandomize=True, max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

TENSORS = ff.tiny_tensors()
ST_HEADER, ST_DATA = ff.safetensors_seed()
LLMC_INTS, LLMC_PARAMS = ff.llmc_seed()
TF_ENTRIES, TF_DATA = ff.tf_seed()
N_HEAD = ff.TINY["n_head"]


class _Hang(BaseException):
    """Raised in a case that outlives its budget (a BaseException, so no loader swallows it)."""


@contextlib.contextmanager
def _guarded():
    """Cut the block off after BUDGET_S seconds; cap the address space at its use + SPARE_BYTES."""
    def hang(signum, frame):
        raise _Hang(f"still running after {BUDGET_S} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, BUDGET_S)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        in_use = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (in_use + SPARE_BYTES, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _load(path, entry="load_checkpoint", **kwargs):
    """The checkpoint (or model) at `path`, or the GPT2Error refusing it; guarded."""
    if str(path).endswith(".bin"):
        _import_torch()
    with _guarded():
        try:
            if entry == "from_pretrained":
                return GPT2.from_pretrained(path, n_head=N_HEAD, **kwargs)
            return load_checkpoint(path, n_head=N_HEAD, **kwargs)
        except GPT2Error as exc:
            return exc


def _import_torch():
    """A .bin without llm.c's magic is read as a PyTorch state dict: import torch outside the
    guard, its import taking seconds (an interrupted import leaves torch unusable)."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401


def _assert_refused(path, named=None, entry="load_checkpoint", **kwargs) -> None:
    """Loading `path` is one GPT2Error whose message names `named` (default `path`)."""
    result = _load(path, entry, **kwargs)
    assert isinstance(result, GPT2Error), f"{path}: loaded, expected a GPT2Error"
    _assert_clear(result, named or path)


def _assert_clear(error: GPT2Error, named) -> None:
    """One line that names `named` and is not much longer than that name."""
    message = str(error)
    assert "\n" not in message and str(named) in message, message[:2000]
    assert len(message) < len(str(named)) + MESSAGE_CHARS, message[:2000]


def _assert_seed_values(checkpoint) -> None:
    """A file that still loads after a mutation holds the seed's values under the seed's names."""
    assert sorted(checkpoint.tensors) == sorted(TENSORS)
    for name, array in TENSORS.items():
        assert np.array_equal(checkpoint.array(name, np.float32), array), name


def _write(path: pathlib.Path, content: bytes) -> pathlib.Path:
    path.write_bytes(content)
    return path


# --- The seeds ------------------------------------------------------------------------------

def test_tf_index_writer_reproduces_tensorflows_index():
    """The table writer turns the fixture's entries back into the index TensorFlow wrote."""
    from conftest import shared_file
    from numpy_gpt2.weights.tf_bundle import TensorBundle

    index = shared_file("fixtures", "openai-tf-tiny", "model.ckpt.index")
    entries = {n: (e.shape, e.offset, e.size, e.crc32c) for n, e in TensorBundle(str(index)[:-6]).entries.items()}
    assert ff.tf_index(entries) == index.read_bytes()


def _seed(tmp_path, fmt):
    if fmt == "safetensors":
        return _write(tmp_path / "seed.safetensors", ff.safetensors_bytes(ST_HEADER, ST_DATA))
    if fmt == "llmc":
        return _write(tmp_path / "seed.bin", ff.llmc_bytes(LLMC_INTS, LLMC_PARAMS))
    index = ff.sstable(_seed_items(), block_entries=3) if fmt.endswith("entries") else ff.tf_index(TF_ENTRIES)
    ff.write_tf_dir(tmp_path / "tf", index, TF_DATA)
    return tmp_path / "tf"


@pytest.mark.parametrize("fmt", ["safetensors", "llmc", "tf", "tf in blocks of 3 entries"])
def test_seeds_load_to_the_arrays_they_were_written_from(tmp_path, fmt):
    _assert_seed_values(_load(_seed(tmp_path, fmt)))
    model = _load(_seed(tmp_path, fmt), "from_pretrained")
    assert np.array_equal(model.wte, TENSORS["wte.weight"])
    assert model.num_parameters() == sum(a.size for a in TENSORS.values())


# --- safetensors ----------------------------------------------------------------------------

def _edited(edit) -> bytes:
    header = json.loads(json.dumps(ST_HEADER))
    edit(header)
    return ff.safetensors_bytes(header, ST_DATA)


def _set(name, key, value):
    return lambda h: h[name].__setitem__(key, value)


def _offsets(name):
    return ST_HEADER[name]["data_offsets"]


FC = "h.0.mlp.c_fc.weight"  # a tensor in the middle of the data
NAMES = sorted(n for n in ST_HEADER if n != "__metadata__")
HEADER_BYTES = json.dumps(ST_HEADER).encode()
FILE_SIZE = 8 + len(HEADER_BYTES) + len(ST_DATA)


def _duplicate_name() -> bytes:
    start = HEADER_BYTES.index(f'"{FC}":'.encode())
    entry = HEADER_BYTES[start:HEADER_BYTES.index(b"}", start) + 1]
    return ff.safetensors_bytes(HEADER_BYTES[:start] + entry + b", " + HEADER_BYTES[start:], ST_DATA)


def _prefixed_and_bare() -> bytes:
    """The save_pretrained layout, plus h.0.ln_1.weight unprefixed on bytes of its own."""
    header = {k if k == "__metadata__" else "transformer." + k: v for k, v in ST_HEADER.items()}
    header["h.0.ln_1.weight"] = {**ST_HEADER["h.0.ln_1.weight"], "data_offsets": [len(ST_DATA), len(ST_DATA) + 16]}
    return ff.safetensors_bytes(header, ST_DATA + bytes(16))


def _aliased() -> bytes:
    """h.1.mlp.c_fc.weight on the bytes of h.0's, every other tensor packed after the other:
    the data is tiled without a gap, but one range is read as two tensors."""
    header, data = {"__metadata__": ST_HEADER["__metadata__"]}, bytearray()
    for name in NAMES:
        if name != "h.1.mlp.c_fc.weight":
            begin, end = _offsets(name)
            header[name] = {**ST_HEADER[name], "data_offsets": [len(data), len(data) + end - begin]}
            data += ST_DATA[begin:end]
    header["h.1.mlp.c_fc.weight"] = {**ST_HEADER["h.1.mlp.c_fc.weight"], "data_offsets": header[FC]["data_offsets"]}
    return ff.safetensors_bytes(header, bytes(data))


def _huge_header_length(n: int) -> bytes:
    return struct.pack("<Q", n) + HEADER_BYTES + ST_DATA


SAFETENSORS_CASES = {
    # The 8-byte header length.
    **{f"length {n}": _huge_header_length(n) for n in
       (0, 1, len(HEADER_BYTES) - 1, len(HEADER_BYTES) + 1, FILE_SIZE - 8, FILE_SIZE - 7, 2**40, 2**63, 2**64 - 1)},
    # The header bytes.
    "not UTF-8": ff.safetensors_bytes(b'{"\xff": 1}', ST_DATA),
    "UTF-16": ff.safetensors_bytes(json.dumps(ST_HEADER).encode("utf-16"), ST_DATA),
    "not JSON": ff.safetensors_bytes(b"GPT-2 weights", ST_DATA),
    "a list": ff.safetensors_bytes(b"[]", ST_DATA),
    "null": ff.safetensors_bytes(b"null", ST_DATA),
    "nested 100000 deep": ff.safetensors_bytes(b"[" * 100_000 + b"]" * 100_000, ST_DATA),
    "5000-digit offset": ff.safetensors_bytes(HEADER_BYTES.replace(b'"data_offsets": [0', b'"data_offsets": [' + b"1" * 5000, 1), ST_DATA),
    "duplicate name": _duplicate_name(),
    # One entry's fields.
    **{f"dtype {v!r}": _edited(_set(FC, "dtype", v)) for v in ("F8_E4M3", "f32", 5, None, ["F32"], {"F32": 1}, "I32", "F16")},
    "dtype of 100000 characters": _edited(_set(FC, "dtype", "F" * 100_000)),
    "shape of 100000 sizes": _edited(_set(FC, "shape", [1] * 100_000)),
    **{f"shape {v!r}": _edited(_set(FC, "shape", v)) for v in
       ([], [-4, 16], [4.0, 16], "416", None, [True, 16], [4, 15], [16, 4, 1, 1, 0], [2**32, 2**32], [2**64 + 4, 16],
        [2**70], [10**30])},
    "shape of 35 dimensions": _edited(_set(FC, "shape", [1] * 33 + [4, 16])),
    "shape of 67 dimensions": _edited(_set(FC, "shape", [1] * 65 + [4, 16])),
    **{f"offsets {v!r}": _edited(_set(FC, "data_offsets", v)) for v in
       ([0], [1, 2, 3], None, "0,256", [-256, 0], _offsets(FC)[::-1], [1.5, 257.5], [str(n) for n in _offsets(FC)],
        [_offsets(FC)[0], 2**64], [_offsets(FC)[0], float("inf")], [_offsets(FC)[0], float("nan")],
        [n + 1 for n in _offsets(FC)], [n + len(ST_DATA) for n in _offsets(FC)])},
    "one range read as two tensors": _aliased(),
    "offsets of another tensor": _edited(lambda h: (h[FC].__setitem__("data_offsets", h["h.1.mlp.c_fc.weight"]["data_offsets"]))),
    "empty tensor over its neighbour's bytes": _edited(lambda h: h[FC].update(shape=[0, 16], data_offsets=[_offsets(FC)[0]] * 2)),
    "an extra empty tensor of 2**62 rows": _edited(lambda h: h.__setitem__("extra", {"dtype": "F32", "shape": [2**62, 0],
                                                                                 "data_offsets": [0, 0]})),
    **{f"entry {v!r}": _edited(lambda h, v=v: h.__setitem__(FC, v)) for v in ("F32", 5, [], None)},
    "entry of 100000 characters": _edited(lambda h: h.__setitem__(FC, "x" * 100_000)),
    "metadata of 100000 entries": _edited(lambda h: h.__setitem__("__metadata__", {str(i): i for i in range(100_000)})),
    "a header of 5 MiB": _edited(lambda h: h.__setitem__("__metadata__", {"pad": "x" * (5 * 2**20)})),
    **{f"entry without {k}": _edited(lambda h, k=k: h[FC].pop(k)) for k in ("dtype", "shape", "data_offsets")},
    # The metadata.
    **{f"metadata {v!r}": _edited(lambda h, v=v: h.__setitem__("__metadata__", v)) for v in
       (["format"], "pt", 5, {"format": 5}, {"format": None}, {"format": {"a": "b"}})},
    # The data.
    "a byte appended": ff.safetensors_bytes(ST_HEADER, ST_DATA + b"\0"),
    "a byte short": ff.safetensors_bytes(ST_HEADER, ST_DATA[:-1]),
    # The GPT-2 tensors (read by infer_config, there being no config.json beside the file).
    "no wpe": _edited(lambda h: h.pop("wpe.weight")),
    "no wte": _edited(lambda h: h.pop("wte.weight")),
    "wte of one dimension": _edited(_set("wte.weight", "shape", [8 * 4])),
    "c_fc of one dimension": _edited(_set("h.0.mlp.c_fc.weight", "shape", [4 * 16])),
    "layer 10**11": _edited(lambda h: h.__setitem__("h.99999999999.ln_1.weight", h.pop("h.1.ln_1.weight"))),
    "no layer 0": _edited(lambda h: h.__setitem__("h.2.ln_1.weight", h.pop("h.0.ln_1.weight"))),
    "layer 01": _edited(lambda h: h.__setitem__("h.01.ln_1.weight", h.pop("h.1.ln_1.weight"))),
    "layer index of 5000 digits": _edited(lambda h: h.__setitem__(f"h.{'9' * 5000}.ln_1.weight", h.pop("h.1.ln_1.weight"))),
    "a tensor with and without transformer.": _prefixed_and_bare(),
}


def test_many_tensors_are_refused_by_their_count(tmp_path):
    """Tens of thousands of small entries take seconds to check one by one: refused by their
    count first (no GPT-2 checkpoint lists more than 20000), the message saying so."""
    content = _edited(lambda h: h.update({f"extra.{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                                         for i in range(20_001)}))
    path = _write(tmp_path / "model.safetensors", content)
    _assert_refused(path)
    count = len([name for name in ST_HEADER if name != "__metadata__"]) + 20_001
    assert f"the header lists {count} tensors, more than the 20000" in str(_load(path))


def _boundaries() -> list[int]:
    """Every section boundary of the seed file, and a byte either side of it."""
    data_start = 8 + len(HEADER_BYTES)
    points = {0, 8, data_start} | {data_start + n for name, e in ST_HEADER.items() if name != "__metadata__"
                                   for n in e["data_offsets"]}
    return sorted({p + d for p in points for d in (-1, 0, 1)} & set(range(FILE_SIZE)))


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_hostile_safetensors(tmp_path, case):
    _assert_refused(_write(tmp_path / "model.safetensors", SAFETENSORS_CASES[case]))


@pytest.mark.parametrize("keep", _boundaries())
def test_safetensors_cut_at_a_section_boundary(tmp_path, keep):
    seed = ff.safetensors_bytes(ST_HEADER, ST_DATA)
    _assert_refused(_write(tmp_path / "model.safetensors", seed[:keep]))


@pytest.mark.parametrize("entry", ["load_checkpoint", "from_pretrained"])
@pytest.mark.parametrize("case", ["length 18446744073709551615", "nested 100000 deep", "shape [4, 15]",
                                  "one range read as two tensors", "metadata ['format']", "layer 10**11"])
def test_hostile_directory_through_every_entry_point(tmp_path, case, entry):
    _write(tmp_path / "model.safetensors", SAFETENSORS_CASES[case])
    (tmp_path / "config.json").write_text(json.dumps(ff.TINY))
    _assert_refused(tmp_path, entry=entry)


def test_named_pipe_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    _assert_refused(tmp_path / "model.safetensors")


def _reference_refuses(content: bytes) -> bool:
    from safetensors.numpy import load

    try:
        load(content)
    except Exception:  # the library raises its own SafetensorError, and ValueError from NumPy
        return True
    return False


def _check_against_reference(path: pathlib.Path, content: bytes) -> None:
    """What the safetensors library refuses we refuse; what loads holds the seed's values."""
    path.write_bytes(content)
    result = _load(path)
    if isinstance(result, GPT2Error):
        _assert_clear(result, path)
    else:
        assert not _reference_refuses(content), "the safetensors library refuses a file we load"
        _assert_seed_values(result)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=8)
    | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 4, 16, 64, 256, 2**32, 2**63 - 1, 2**64, -1]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
@FUZZ
@given(name=st.sampled_from(NAMES), key=st.sampled_from(["dtype", "shape", "data_offsets"]), value=JSON_VALUES)
def test_any_header_field_value(tmp_path, name, key, value):
    _check_against_reference(tmp_path / "model.safetensors", _edited(_set(name, key, value)))


@FUZZ
@given(name=st.sampled_from(NAMES), shape=st.lists(st.integers(0, 2**66), max_size=6),
       offsets=st.tuples(st.integers(-2**64, 2**65), st.integers(-2**64, 2**65)) | st.sampled_from([(0, 0)]))
def test_any_shape_and_offsets(tmp_path, name, shape, offsets):
    _check_against_reference(tmp_path / "model.safetensors",
                             _edited(lambda h: h[name].update(shape=shape, data_offsets=list(offsets))))


@FUZZ
@given(data=st.data())
def test_any_header_bytes_overwritten(tmp_path, data):
    header = bytearray(HEADER_BYTES)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(header) - 1))
        header[at:at + 1] = data.draw(st.binary(min_size=0, max_size=3))
    _check_against_reference(tmp_path / "model.safetensors", ff.safetensors_bytes(bytes(header), ST_DATA))


@FUZZ
@given(keep=st.integers(0, FILE_SIZE - 1))
def test_any_truncation_of_safetensors(tmp_path, keep):
    _assert_refused(_write(tmp_path / "model.safetensors", ff.safetensors_bytes(ST_HEADER, ST_DATA)[:keep]))


# --- llm.c .bin -----------------------------------------------------------------------------

def _llmc_with(position: int, value: int) -> bytes:
    ints = list(LLMC_INTS)
    ints[position] = value
    return ff.llmc_bytes(ints, LLMC_PARAMS)


INT32_EXTREMES = (0, -1, 2**31 - 1, -2**31)
LLMC_CASES = {
    **{f"magic {v}": _llmc_with(0, v) for v in (ff.LLMC_MAGIC + 1, 0)},
    **{f"version {v}": _llmc_with(1, v) for v in (0, 1, 2, 4, 5, -1, 2**31 - 1)},
    **{f"{field} {v}": _llmc_with(i, v) for i, field in enumerate(("maxT", "V", "L", "NH", "C", "Vp"), start=2)
       for v in INT32_EXTREMES},
    # One off, each disagrees with the file's size or another size (V may be anything up to Vp).
    **{f"{field} {LLMC_INTS[i] + d}": _llmc_with(i, LLMC_INTS[i] + d) for i, field in ((2, "maxT"), (4, "L"), (6, "C"), (7, "Vp"))
       for d in (-1, 1)},
    "V above Vp": _llmc_with(3, 129),
    "NH not dividing C": _llmc_with(5, 3),
    "a byte appended": ff.llmc_bytes(LLMC_INTS, LLMC_PARAMS + b"\0"),
    **{f"{n} bytes": ff.llmc_bytes(LLMC_INTS, LLMC_PARAMS)[:n] for n in (0, 4, 1023, 1024)},
}


def _llmc_boundaries() -> list[int]:
    """Where each tensor of the seed starts, and a byte either side: cuts through every section."""
    C, L, V, P = ff.TINY["n_embd"], ff.TINY["n_layer"], ff.TINY["vocab_size"], ff.TINY["n_positions"]
    sizes = [128 * C, P * C] + [L * n for n in (C, C, 3 * C * C, 3 * C, C * C, C, C, C, 4 * C * C, 4 * C, 4 * C * C, C)]
    starts = 1024 + 4 * np.cumsum([0] + sizes)
    return sorted({int(s) + d for s in starts for d in (-1, 0, 1)} & set(range(1024 + len(LLMC_PARAMS))))


@pytest.mark.parametrize("case", LLMC_CASES)
def test_hostile_llmc(tmp_path, case):
    _assert_refused(_write(tmp_path / "model.bin", LLMC_CASES[case]))


@pytest.mark.parametrize("keep", _llmc_boundaries())
def test_llmc_cut_at_a_section_boundary(tmp_path, keep):
    _assert_refused(_write(tmp_path / "model.bin", ff.llmc_bytes(LLMC_INTS, LLMC_PARAMS)[:keep]))


def _header_int(seed: int):
    """A header size: the seed's, one off, a small one, an extreme or any int32."""
    return (st.sampled_from([seed, seed - 1, seed + 1]) | st.integers(-2, 300) | st.sampled_from(INT32_EXTREMES)
            | st.integers(-2**31, 2**31 - 1))


@FUZZ
@given(ints=st.tuples(*(_header_int(n) for n in LLMC_INTS[2:])), version=st.sampled_from([3, 5]),
       keep=st.just(len(LLMC_PARAMS)) | st.integers(0, len(LLMC_PARAMS)))
def test_any_llmc_header(tmp_path, ints, version, keep):
    path = _write(tmp_path / "model.bin", ff.llmc_bytes([ff.LLMC_MAGIC, version, *ints], LLMC_PARAMS[:keep]))
    result = _load(path)
    if isinstance(result, GPT2Error):
        _assert_clear(result, path)
    else:
        # Only a header the file's size agrees with loads; llm.c's layout, counted here:
        # wte [Vp, C], wpe [maxT, C], per layer 12 C^2 + 13 C, ln_f 2 C, 4 or 2 bytes each.
        max_t, _, n_layer, _, C, vp = ints
        count = vp * C + max_t * C + n_layer * (12 * C * C + 13 * C) + 2 * C
        assert 1024 + (4 if version == 3 else 2) * count == path.stat().st_size


# --- TensorFlow -----------------------------------------------------------------------------

W = "model/h0/mlp/c_fc/w"


def _tf_with(name=W, **change) -> bytes:
    """The seed index with fields of one entry changed (shape, offset, size, crc; or dtype, shard_id)."""
    entries = dict(TF_ENTRIES)
    shape, offset, size, crc = entries[name]
    fields = dict(shape=shape, offset=offset, size=size, crc=crc, dtype=ff.DT_FLOAT, shard_id=0) | change
    entries[name] = ff.bundle_entry(fields["dtype"], fields["shape"], fields["offset"], fields["size"], fields["crc"],
                                    fields["shard_id"])
    return ff.tf_index(entries)


def _tf_table_with(footer: bytes = b"", items=None) -> bytes:
    if items is not None:
        return ff.sstable(items)
    index = ff.tf_index(TF_ENTRIES)
    return index[:-48] + footer + bytes(40 - len(footer)) + struct.pack("<Q", ff.TABLE_MAGIC)


def _seed_items():
    return [(b"", ff.BUNDLE_HEADER)] + [(n.encode(), ff.bundle_entry(ff.DT_FLOAT, *e)) for n, e in sorted(TF_ENTRIES.items())]


W_SHAPE, W_OFFSET, W_SIZE, _ = TF_ENTRIES[W]
TF_CASES = {
    **{f"offset {v}": _tf_with(offset=v) for v in
       (len(TF_DATA), len(TF_DATA) - W_SIZE + 1, -1, -2**63, 2**63 - 1, W_OFFSET + 4)},
    **{f"size {v}": _tf_with(size=v) for v in (W_SIZE + 4, W_SIZE - 4, 0, -4, 2**63 - 1)},
    **{f"shape {v}": _tf_with(shape=v) for v in
       ((1, 4, 17), (4, 16), (2**40, 2**40, 0), (2**62, 0), (-1, 4, 16))},
    "shape of 35 dimensions": _tf_with(shape=(1,) * 33 + (4, 16)),
    "shape of 67 dimensions": _tf_with(shape=(1,) * 65 + (4, 16)),
    "zero-size shape of 2**62 rows": _tf_with(shape=(2**62, 0), size=0),
    "zero-size shape of 2**70 rows": _tf_with(shape=(2**40, 2**40, 0), size=0),
    **{f"dtype {v}": _tf_with(dtype=v) for v in (0, 3, 7, 14, 999, 2**63)},
    **{f"shard {v}": _tf_with(shard_id=v) for v in (1, -1, 2**31)},
    "bytes of another tensor": _tf_with(offset=TF_ENTRIES["model/h1/mlp/c_fc/w"][1]),
    "sliced": ff.tf_index({**TF_ENTRIES, W: ff.bundle_entry(ff.DT_FLOAT, W_SHAPE, W_OFFSET, W_SIZE, 0) + ff.field(7, b"")}),
    "unknown rank": ff.tf_index({**TF_ENTRIES, W: ff.bundle_entry(ff.DT_FLOAT, W_SHAPE, W_OFFSET, W_SIZE, 0)
                                 + ff.field(2, ff.field(3, 1))}),
    **{f"header {h!r}": ff.tf_index(TF_ENTRIES, header=h) for h in
       (b"", ff.field(1, 0), ff.field(1, 2), ff.field(1, 2**31), ff.field(1, 1) + ff.field(2, 2), b"\xff")},
    "no header entry": ff.sstable(_seed_items()[1:]),
    "duplicate key": ff.sstable(_seed_items()[:3] + _seed_items()[2:]),
    "keys out of order": ff.sstable(_seed_items()[:2] + _seed_items()[3:4] + _seed_items()[2:3] + _seed_items()[4:]),
    "a key not UTF-8": ff.sstable(_seed_items() + [(b"\xff", ff.bundle_entry(ff.DT_FLOAT, (), 0, 0, 0))]),
    "unknown variable": ff.tf_index({**TF_ENTRIES, "model/h0/mlp/c_fc/v": TF_ENTRIES[W]}),
    "an empty entry, three per block": ff.sstable([(k, b"" if k == W.encode() else v) for k, v in _seed_items()], 3),
    **{f"index handle {o}, {s}": _tf_table_with(ff.varint(0) + ff.varint(0) + ff.varint(o) + ff.varint(s)) for o, s in
       ((0, 2**64 - 1), (2**64 - 1, 1), (10**6, 10), (0, 0))},
}


def _tf_dir(tmp_path, index: bytes, data: bytes = TF_DATA, hparams=None) -> pathlib.Path:
    ff.write_tf_dir(tmp_path / "tf", index, data, hparams)
    return tmp_path / "tf"


@pytest.mark.parametrize("case", TF_CASES)
def test_hostile_tf_index(tmp_path, case):
    _assert_refused(_tf_dir(tmp_path, TF_CASES[case]))


@pytest.mark.parametrize("verify", [False, True])
def test_tf_tensor_bytes_past_a_wrong_crc(tmp_path, verify):
    """Without verify the bytes are not read (it loads); with it the stored crc32c must match."""
    path = _tf_dir(tmp_path, _tf_with(crc=ff.masked(0)))
    result = _load(path, verify=verify)
    if verify:
        _assert_refused(path, verify=True)
    else:
        _assert_seed_values(result)


def test_tf_checkpoint_file_as_a_named_pipe_means_the_default_prefix(tmp_path):
    directory = _tf_dir(tmp_path, ff.tf_index(TF_ENTRIES))
    (directory / "checkpoint").unlink()
    os.mkfifo(directory / "checkpoint")
    _assert_seed_values(_load(directory))


def _tf_boundaries(length: int) -> list[int]:
    return sorted({e[1] + e[2] + d for e in TF_ENTRIES.values() for d in (-1, 0, 1)} & set(range(length)))


@pytest.mark.parametrize("keep", _tf_boundaries(len(TF_DATA)))
def test_tf_data_cut_at_a_tensor_boundary(tmp_path, keep):
    _assert_refused(_tf_dir(tmp_path, ff.tf_index(TF_ENTRIES), TF_DATA[:keep]))


TF_INDEX = ff.tf_index(TF_ENTRIES)


def _index_boundaries() -> list[int]:
    """Where each block, trailer and the footer of the seed index start and end, and a byte either side."""
    footer = TF_INDEX[-48:]
    (meta_offset, meta_size), (index_offset, index_size) = ff.block_handles(footer)
    points = {0, meta_offset - 5, meta_offset, meta_offset + meta_size, index_offset, index_offset + index_size,
              len(TF_INDEX) - 48, len(TF_INDEX) - 8}
    return sorted({p + d for p in points for d in (-1, 0, 1)} & set(range(len(TF_INDEX))))


@pytest.mark.parametrize("keep", _index_boundaries())
def test_tf_index_cut_at_a_section_boundary(tmp_path, keep):
    _assert_refused(_tf_dir(tmp_path, TF_INDEX[:keep]))


@FUZZ
@given(keep=st.integers(0, len(TF_INDEX) - 1))
def test_any_truncation_of_the_tf_index(tmp_path, keep):
    _assert_refused(_tf_dir(tmp_path, TF_INDEX[:keep]))


@FUZZ
@given(name=st.sampled_from(sorted(TF_ENTRIES)), dtype=st.sampled_from([1, 2, 3, 14, 19, 0, 200]),
       shape=st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 70), max_size=5),
       offset=st.integers(-2**63, 2**63 - 1) | st.integers(0, len(TF_DATA)),
       size=st.integers(-2**63, 2**63 - 1) | st.integers(0, len(TF_DATA)), shard_id=st.sampled_from([0, 1, 2**32]))
def test_any_tf_entry(tmp_path, name, dtype, shape, offset, size, shard_id):
    path = _tf_dir(tmp_path, _tf_with(name, dtype=dtype, shape=shape, offset=offset, size=size, shard_id=shard_id))
    result = _load(path)
    if isinstance(result, GPT2Error):
        _assert_clear(result, path)
    else:
        _assert_seed_values(result)


# --- config.json and hparams.json -----------------------------------------------------------

HOSTILE_CONFIG_FILES = {
    "not JSON": b"n_embd = 4",
    "empty": b"",
    "a list": b"[1, 2]",
    "null": b"null",
    "a number": b"4",
    "not UTF-8": b'{"n_embd": 4, "name": "\xff"}',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "5000-digit n_layer": b'{"n_layer": ' + b"1" * 5000 + b"}",
    "model_type bert": b'{"model_type": "bert"}',
    "n_layer of 4300 digits": b'{"n_layer": 1' + b"0" * 4299 + b"}",
}
HOSTILE_CONFIG_VALUES = {
    **{(k, repr(v)): v for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
       for v in ("4", 4.0, 4.5, -1, 0, True, None, [], {}, float("nan"), float("inf"), 1e308)},
    ("n_head", "3"): 3,  # 4 is not divisible by 3
    **{("n_inner", repr(v)): v for v in (0, -1, True, 16.0, "16", [16], float("nan"))},
    **{("layer_norm_epsilon", repr(v)): v for v in (0, -1e-5, float("nan"), float("inf"), "1e-5", True, None)},
    **{("activation_function", repr(v)): v for v in ("relu", "gelu", ["gelu_new"], None, 5)},
    ("activation_function", "100000 characters"): "x" * 100_000,
    **{(k, "2**63"): 2**63 for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")},
    **{(k, repr(v)): v for k in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
       for v in ("yes", "false", 2, None, [])},
    **{(k, repr(v)): v for k in ("bos_token_id", "eos_token_id") for v in ("0", -1, 1.5, True, [], {})},
    **{(k, "10**30"): 10**30 for k in ("vocab_size", "n_positions", "n_embd", "n_layer")},
}


def _config_dir(tmp_path, config: bytes, fmt: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(checkpoint directory, its config file) with a valid seed checkpoint and `config`."""
    if fmt == "tf":
        directory = _tf_dir(tmp_path, ff.tf_index(TF_ENTRIES), hparams=config)
        return directory, directory / "hparams.json"
    (tmp_path / "model.safetensors").write_bytes(ff.safetensors_bytes(ST_HEADER, ST_DATA))
    (tmp_path / "config.json").write_bytes(config)
    return tmp_path, tmp_path / "config.json"


@pytest.mark.parametrize("fmt", ["safetensors", "tf"])
@pytest.mark.parametrize("case", HOSTILE_CONFIG_FILES)
def test_hostile_config_file(tmp_path, case, fmt):
    directory, config = _config_dir(tmp_path, HOSTILE_CONFIG_FILES[case], fmt)
    _assert_refused(directory, named=config)


@pytest.mark.parametrize("fmt", ["safetensors", "tf"])
@pytest.mark.parametrize("key, value", HOSTILE_CONFIG_VALUES, ids=[f"{k}={v}" for k, v in HOSTILE_CONFIG_VALUES])
def test_hostile_config_value(tmp_path, key, value, fmt):
    """A bad value is the config file's error; a huge but well-typed size, the checkpoint's
    (its tensors disagree), found without walking the 10**30 layers or positions."""
    text = json.dumps({**ff.TINY, key: HOSTILE_CONFIG_VALUES[key, value]})
    directory, config = _config_dir(tmp_path, text.encode(), fmt)
    _assert_refused(directory, named=config if value != "10**30" else directory)


def _well_typed(config) -> bool:
    ints = [config.vocab_size, config.n_positions, config.n_embd, config.n_layer, config.n_head]
    ids = [i for i in (config.bos_token_id, config.eos_token_id) if i is not None]
    return (all(type(n) is int and n > 0 for n in ints + [config.inner_dim]) and all(type(i) is int and i >= 0 for i in ids)
            and type(config.layer_norm_epsilon) in (int, float) and math.isfinite(config.layer_norm_epsilon)
            and all(type(b) is bool for b in (config.scale_attn_weights, config.scale_attn_by_inverse_layer_idx,
                                                config.reorder_and_upcast_attn)))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["n_inner", "layer_norm_epsilon", "activation_function", "scale_attn_weights",
                                                "reorder_and_upcast_attn", "eos_token_id", "bos_token_id", "n_head",
                                                "n_embd", "model_type", "n_ctx"]), JSON_VALUES, max_size=3))
def test_any_config_values(tmp_path, changes):
    directory, config = _config_dir(tmp_path, json.dumps({**ff.TINY, **changes}).encode(), "safetensors")
    result = _load(directory)
    if isinstance(result, GPT2Error):
        _assert_clear(result, directory)
    else:
        assert _well_typed(result.config), result.config


# --- Crashes and memory, in a process of their own ------------------------------------------

def test_corpus_in_a_subprocess(tmp_path):
    """Every explicit case once more in a child: no signal, no exception but GPT2Error, and a
    peak RSS of the interpreter plus NumPy, not of any size a header declares."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, content in SAFETENSORS_CASES.items():
        _write(corpus / f"st {name}.safetensors", content)
    for name, content in LLMC_CASES.items():  # not .bin, which without the magic would be read by torch
        _write(corpus / f"llmc {name}.llmc", content)
    for name, index in TF_CASES.items():
        ff.write_tf_dir(corpus / f"tf {name}", index, TF_DATA)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(pathlib.Path(__file__).with_name("fuzz_files.py")), str(corpus)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert child.returncode == 0, child.stderr[-2000:]
    lines = [json.loads(line) for line in child.stdout.splitlines()]
    outcomes = {line["case"]: line["outcome"] for line in lines if "case" in line}
    assert len(outcomes) == len(SAFETENSORS_CASES) + len(LLMC_CASES) + len(TF_CASES)
    assert {case: o for case, o in outcomes.items() if o != "GPT2Error"} == {}
    # The interpreter with NumPy and the loaders is about 30 MiB; a header's declared size
    # would be GiBs (and hit the child's 1 GiB address-space cap first).
    assert lines[-1]["peak_rss_kib"] < 100 * 1024
