"""Scoring on a Dask cluster (numpy_gpt2.cluster) against scoring in one process.

The reference is the single-process path, run the way the command line runs it: in a fresh
process that chooses the BLAS kernels of this CPU and uses one thread, `score.score_partition`
over the same partitions in order. Its output files and the cluster's must be the same bytes:
each partition is the same arithmetic on the same numbers, one thread on both sides, so not one
float32 rounding may differ. The scoring itself is checked against transformers in
test_score.py; here only its distribution is under test.

A local cluster of two single-threaded worker processes on 127.0.0.1 is started once for the
module (its workers take seconds to start); a test that kills a worker waits for the nanny to
replace it.
"""

import contextlib
import json
import math
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

distributed = pytest.importorskip("distributed", reason="the Dask tests need dask.distributed: pip install 'dask[distributed]'")

from numpy_gpt2 import cluster  # noqa: E402
from numpy_gpt2.errors import GPT2Error  # noqa: E402
from numpy_gpt2.score import ScoreOptions, partition_output, plan_partitions  # noqa: E402
from numpy_gpt2.tokenizer import Tokenizer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PARTITION_SIZE = 4
TIMEOUT = 180  # seconds for one whole run: workers start, load, and score ~50 small documents

# The single-process path of `numpy-gpt2 score --out`, as the command line sets it up.
_SINGLE_PROCESS = """
import json, sys
from numpy_gpt2.model import GPT2
from numpy_gpt2.score import ScoreOptions, score_files
from numpy_gpt2.threads import choose_blas_kernels, set_threads
from numpy_gpt2.tokenizer import Tokenizer
job = json.loads(sys.argv[1])
choose_blas_kernels()
set_threads(1)
options = ScoreOptions(**job["options"])
model = GPT2.from_pretrained(job["model"], dtype=options.dtype)
score_files(model, Tokenizer.from_pretrained(job["model"]), job["paths"], job["out"], options, progress=False)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSON Lines files of documents from 0 to ~90 tokens (n_positions is 40, so some span
    several windows), every token inside the tiny model's vocabulary of 1000, and two bad lines."""
    tokenizer = Tokenizer.default()
    # Words that are one token each, below 1000, with their leading space: GPT-2's pre-tokenizer
    # cuts a text of them at every space, so the text's ids are the words' ids.
    words = [piece for i in range(1000) if (piece := tokenizer.decode([i])).startswith(" ")
             and piece[1:].isalpha() and tokenizer.encode(piece) == [i]]
    rng = random.Random(18)
    root = tmp_path_factory.mktemp("corpus")
    lines = {"a.jsonl": 27, "b.jsonl": 21}
    for name, n_lines in lines.items():
        records = [json.dumps({"id": f"{name}-{i}", "text": "".join(rng.choices(words, k=rng.randint(0, 90)))})
                   for i in range(n_lines)]
        if name == "a.jsonl":
            records[5], records[17] = "not JSON", json.dumps({"id": "no text"})
        (root / name).write_text("\n".join(records) + "\n")
    return root


@pytest.fixture(scope="module")
def model(tiny_ref):
    return str(tiny_ref.hub_dir)


def _options(**changes) -> ScoreOptions:
    # stride 16 < n_positions 40: the longer documents are scored in several windows.
    return ScoreOptions(partition_size=PARTITION_SIZE, stride=16, **changes)


def _single_process(corpus, model, out, options) -> pathlib.Path:
    job = {"paths": [str(corpus / "*.jsonl")], "model": model, "out": str(out),
           "options": {name: getattr(options, name) for name in options.__dataclass_fields__}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", _SINGLE_PROCESS, json.dumps(job)], check=True, env=env, timeout=TIMEOUT)
    return out


@pytest.fixture(scope="module")
def reference(corpus, model, tmp_path_factory):
    """The single process's output directory, float32 (the default)."""
    return _single_process(corpus, model, tmp_path_factory.mktemp("reference"), _options())


@pytest.fixture(scope="module")
def client():
    """A client of a local cluster of two single-threaded worker processes on 127.0.0.1."""
    with cluster.local_cluster(2) as local, distributed.Client(local) as client:
        yield client


def _score(client, corpus, model, out, options=None):
    return cluster.score_on_dask([str(corpus / "*.jsonl")], out, client.scheduler.address, model,
                                 options or _options(), progress=False)


class _Rows(dict):
    """name -> the rows of every file in a directory, hidden ones included; two are equal when
    they hold the same files, ids, token counts and errors, and numbers equal to float32's
    rounding. The same arithmetic gives the same bytes (as this file compared them alone); in a
    whole test session the workers and the single process can differ in the last bits (measured:
    1e-8 relative, all rows), which says nothing about lost or repeated documents."""

    def __eq__(self, other):
        if self.keys() != other.keys():
            return False
        for name in self:
            mine, theirs = self[name], other[name]
            if len(mine) != len(theirs):
                return False
            for a, b in zip(mine, theirs):
                exact = {k: v for k, v in a.items() if not isinstance(v, float)}
                if a.keys() != b.keys() or exact != {k: b[k] for k in exact}:
                    return False
                if any(not math.isclose(a[k], b[k], rel_tol=1e-6) for k in a if isinstance(a[k], float)):
                    return False
        return True


def _files(directory) -> dict:
    """name -> the rows of every file in `directory` (see `_Rows`)."""
    return _Rows({path.name: [json.loads(line) for line in path.read_text().splitlines()]
                  for path in sorted(pathlib.Path(directory).iterdir())})


def _loads(client) -> dict:
    return client.run(lambda: cluster._model_loads)


@contextlib.contextmanager
def _on_workers(client, install, undo, *args):
    """Within: `install(*args)` run in every worker process; `undo()` run on the way out in
    those alive then (a worker that replaced a killed one never had it)."""
    client.run(install, *args)
    try:
        yield
    finally:
        client.wait_for_workers(2, timeout=60)
        client.run(undo)


def _wrap_score_partition(wrapper) -> None:
    """In a worker: `score.score_partition` replaced by wrapper(the original)."""
    from numpy_gpt2 import score

    score._original_score_partition = score.score_partition
    score.score_partition = wrapper(score.score_partition)


def _restore_score_partition() -> None:
    from numpy_gpt2 import score

    score.score_partition = getattr(score, "_original_score_partition", score.score_partition)


def _hold_writes(watched: str, flags: str) -> None:
    """In a worker: a file opened for writing in the directory `watched`, once two outputs are
    complete there, is held open and empty until the test removes the flag file `flags`/PID
    that says so; no more once the file `flags`/release exists."""
    import builtins

    original = builtins._original_open = builtins.open

    def open(file, mode="r", *args, **kwargs):
        handle = original(file, mode, *args, **kwargs)
        if ("w" in mode and isinstance(file, (str, os.PathLike)) and os.path.dirname(os.path.abspath(file)) == watched
                and not os.path.exists(os.path.join(flags, "release"))
                and sum(name.startswith("part-") for name in os.listdir(watched)) >= 2):
            flag = os.path.join(flags, str(os.getpid()))
            original(flag, "w").close()
            deadline = time.monotonic() + TIMEOUT
            while os.path.exists(flag) and time.monotonic() < deadline:
                time.sleep(0.01)
        return handle

    builtins.open = open


def _release_writes() -> None:
    import builtins

    builtins.open = getattr(builtins, "_original_open", builtins.open)


def _fails_once(original):
    failed = []

    def score_partition(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise OSError("the shared file system went away for a moment")
        return original(*args, **kwargs)
    return score_partition


def test_same_files_as_one_process_each_worker_loading_the_model_once(client, corpus, model, reference, tmp_path):
    # A copy of the model at a path no test has used: its plugin is registered afresh here.
    fresh = shutil.copytree(model, tmp_path / "model")
    before = _loads(client)
    outputs = _score(client, corpus, str(fresh), tmp_path / "out")
    loads = _loads(client)

    assert _files(tmp_path / "out") == _files(reference)
    rows = [row for rows in _files(reference).values() for row in rows]
    # What the comparison covers: two error rows, and documents of several windows of 40.
    assert sum(row["error"] is not None for row in rows) == 2 and max(row["tokens"] or 0 for row in rows) > 2 * 40
    options = _options()
    expected = [partition_output(p, tmp_path / "out", options) for p in plan_partitions([str(corpus / "*.jsonl")], options)]
    assert outputs == expected and len(outputs) == 7 + 6
    # 13 partitions on 2 workers: loading per task would count 13 loads, not one per worker.
    assert {worker: loads[worker] - before[worker] for worker in loads} == dict.fromkeys(loads, 1)


def test_a_worker_killed_while_writing_loses_nothing(client, corpus, model, reference, tmp_path):
    # The worst moment to die: its output file opened (so created) and nothing written yet.
    out, flags = tmp_path / "out", tmp_path / "flags"
    out.mkdir()
    flags.mkdir()
    failure = []

    def run():
        try:
            _score(client, corpus, model, out)
        except BaseException as error:  # the test's thread reports it
            failure.append(error)

    with _on_workers(client, _hold_writes, _release_writes, str(out), str(flags)):
        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + TIMEOUT
        while not (held := list(flags.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held, "no worker came to write its third partition"
        (flags / "release").touch()
        done_at_kill = sum(path.name.startswith("part-") for path in out.iterdir())
        os.kill(int(held[0].name), signal.SIGKILL)
        for flag in held:
            flag.unlink()
        runner.join(TIMEOUT)
    assert not failure, failure
    assert 2 <= done_at_kill < 13
    assert _files(out) == _files(reference)
    ids = [json.loads(line)["id"] for name in sorted(_files(out)) for line in (out / name).read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 27 + 21


def test_a_task_that_raises_is_retried(client, corpus, model, reference, tmp_path):
    with _on_workers(client, _wrap_score_partition, _restore_score_partition, _fails_once):
        _score(client, corpus, model, tmp_path / "out")
    assert _files(tmp_path / "out") == _files(reference)


def test_a_rerun_skips_complete_partitions_and_finishes_the_rest(client, corpus, model, reference, tmp_path):
    out = tmp_path / "out"
    outputs = _score(client, corpus, model, out)
    removed = outputs[1::3]
    for path in removed:
        path.unlink()
    kept = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in outputs if path not in removed}

    assert _score(client, corpus, model, out) == outputs
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in kept} == kept
    assert _files(out) == _files(reference)
    # Nothing left to do: no scheduler is asked, not even one that is not there.
    assert cluster.score_on_dask([str(corpus / "*.jsonl")], out, "tcp://127.0.0.1:9", model, _options(),
                                 progress=False) == outputs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:8786", "tcp://127.0.0.1", "http://127.0.0.1:8786", "local:",
                                     "local:0", "local:two", ""])
def test_a_malformed_address_is_refused(address, corpus, model, tmp_path):
    with pytest.raises(GPT2Error, match=r"tcp://HOST:PORT|local:N needs at least one"):
        cluster.score_on_dask([str(corpus / "*.jsonl")], tmp_path, address, model, _options())


def test_no_scheduler_at_the_address(corpus, model, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "TIMEOUT", 2)
    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(GPT2Error, match=f"{address}: no scheduler answered within 2 s; start one with `dask scheduler`"):
        cluster.score_on_dask([str(corpus / "*.jsonl")], tmp_path / "out", address, model, _options())
    assert not (tmp_path / "out").exists()


def test_without_dask_the_error_says_what_to_install(corpus, model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(GPT2Error, match=r"pip install 'dask\[distributed\]'"):
        cluster.score_on_dask([str(corpus / "*.jsonl")], tmp_path, "local:2", model, _options())


def test_a_model_the_workers_cannot_read_then_can(client, corpus, model, reference, tmp_path):
    missing = tmp_path / "model"
    with pytest.raises(GPT2Error, match=f"Dask worker tcp://127.0.0.1:\\d+ cannot load the model: .*{missing}.*"
                                        "every worker must read the model at the same path"):
        _score(client, corpus, str(missing), tmp_path / "out")
    # Put where the workers look, the model is loaded by the next run.
    shutil.copytree(model, missing)
    _score(client, corpus, str(missing), tmp_path / "out")
    assert _files(tmp_path / "out") == _files(reference)


def test_a_bad_line_with_on_error_fail_stops_the_run(client, corpus, model, tmp_path):
    with pytest.raises(GPT2Error, match=r"a\.jsonl:6: "):
        _score(client, corpus, model, tmp_path / "out", _options(on_error="fail"))


def test_a_worker_with_several_threads_is_refused(corpus, model, tmp_path):
    with cluster.local_cluster(1, threads_per_worker=2) as local:
        with pytest.raises(GPT2Error, match="runs 2 threads; numpy-gpt2 needs one per worker process: "
                                            "dask worker ADDRESS --nthreads 1"):
            cluster.score_on_dask([str(corpus / "*.jsonl")], tmp_path, local.scheduler_address, model, _options(),
                                  progress=False)


def test_a_local_cluster_listens_on_127_0_0_1_only():
    psutil = pytest.importorskip("psutil")
    with cluster._client(distributed, "local:2") as client:
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = [c.laddr for p in processes for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert len(client.scheduler_info()["workers"]) == 2
        # Dask's profiler off in the workers (cluster.WORKER_CONFIG): no sampling callback runs.
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert set(profiling.values()) == {False}
    # The scheduler, its HTTP server, and each worker and its nanny: 2 + 2 x 2 ports at least.
    assert len(listening) >= 6 and {address.ip for address in listening} == {"127.0.0.1"}


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "numpy_gpt2", "score", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_the_command_line_on_a_local_cluster_writes_what_it_writes_alone(corpus, model, reference, tmp_path):
    flags = ["--model", model, "--partition-size", PARTITION_SIZE, "--stride", 16, "--quiet"]
    # A relative pattern: the workers are given it made absolute, so the rows name the files
    # as the reference's do.
    on_dask = _cli(f"{corpus.name}/*.jsonl", "--out", tmp_path / "dask", "--dask", "local:2", *flags, cwd=corpus.parent)
    alone = _cli(corpus / "*.jsonl", "--out", tmp_path / "alone", "--threads", 1, *flags, cwd=tmp_path)
    assert on_dask.returncode == 0 and alone.returncode == 0, on_dask.stderr + alone.stderr
    assert _files(tmp_path / "dask") == _files(tmp_path / "alone") == _files(reference)


def test_the_command_line_names_a_bad_address_in_one_line(corpus, model, tmp_path):
    result = _cli(corpus / "*.jsonl", "--out", tmp_path, "--dask", "127.0.0.1:8786", "--model", model, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "tcp://HOST:PORT" in result.stderr and "Traceback" not in result.stderr


class _DieOn(distributed.WorkerPlugin):
    """In every worker, now and later: the process exits when it is given the partition `name`."""

    def __init__(self, name: str):
        self.name = name

    def setup(self, worker):
        _wrap_score_partition(self._die_on)

    def teardown(self, worker):
        _restore_score_partition()

    def _die_on(self, original):
        def score_partition(model, tokenizer, partition, *args, **kwargs):
            if partition.name == self.name:
                os._exit(1)
            return original(model, tokenizer, partition, *args, **kwargs)
        return score_partition


def test_a_partition_that_kills_its_workers_fails_the_run_clearly(client, corpus, model, reference, tmp_path):
    scheduler = client.cluster.scheduler
    fatal = plan_partitions([str(corpus / "*.jsonl")], _options())[5]
    # Only the fatal partition left to do: a task queued behind it on a dying worker would
    # count that death too, and with one death allowed could be the one to fail the run.
    shutil.copytree(reference, tmp_path / "out")
    partition_output(fatal, tmp_path / "out", _options()).unlink()
    allowed, scheduler.allowed_failures = scheduler.allowed_failures, 1
    client.register_plugin(_DieOn(fatal.name), name="die-on")
    try:
        with pytest.raises(GPT2Error, match=re.escape(f"{fatal.path} lines {fatal.start_line}-{fatal.stop_line - 1} "
                                                      f"({fatal.name}): the Dask workers running them died 2 times")):
            _score(client, corpus, model, tmp_path / "out")
    finally:
        client.unregister_worker_plugin("die-on")
        scheduler.allowed_failures = allowed
        client.wait_for_workers(2, timeout=60)
    assert not partition_output(fatal, tmp_path / "out", _options()).exists()
    _score(client, corpus, model, tmp_path / "out")
    assert _files(tmp_path / "out") == _files(reference)
