"""Scoring a corpus on a Dask distributed cluster: one task per partition, one model per worker.

    score_on_dask(["data/*.jsonl"], "results", "tcp://scheduler:8786", "/shared/gpt2", ScoreOptions())

The corpus is cut into partitions (`score.plan_partitions`); each partition is one task, which
calls `score.score_partition` and so writes its own output file, atomically. The caller skips the
partitions whose file exists before submitting anything, which makes a run that is started again
finish only what is missing. Each worker process loads the model once, when a worker plugin is
registered with it (and again only if the process is replaced), and runs its tasks on one thread.

When a worker dies in the middle of a task, the scheduler runs that partition again on another
worker; its output file appears once, whole, from whichever run finishes (the rename of
`fileio.atomic_path`). A task that raises (a shared file system's hiccup, say) is retried
`RETRIES` times before the run fails.

dask and distributed are optional (`pip install 'dask[distributed]'`) and imported only here,
inside the functions that need them.
"""

import asyncio
import contextlib
import functools
import glob
import logging
import os
import pathlib
import re
import threading
import uuid

from .errors import GPT2Error

RETRIES = 2  # a task that raises runs at most 1 + RETRIES times
TIMEOUT = 30  # seconds to wait for a scheduler to answer, and for its first worker
# A LocalCluster that listens on 127.0.0.1 only, without a dashboard: the scheduler's HTTP server
# (health and metrics routes, which it always starts) on a free port of 127.0.0.1 rather than on
# 8787, where another cluster may be.
LOCAL_ONLY = dict(host="127.0.0.1", dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
# What the workers of a local cluster run with. Dask's statistical profiler samples every worker
# thread's stack every 10 ms for the dashboard (which a local cluster here does not serve),
# walking the stack with the GIL held; off, two workers scored more tokens per CPU second
# (bench/scale.py; docs/cluster.md).
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
_PLUGIN = "numpy-gpt2-model"
_load_lock = threading.Lock()
_model_loads = 0  # models loaded by this process, for the tests: one per worker process, not per task


def score_on_dask(paths, out_dir, address: str, model, options, progress: bool = True) -> list[pathlib.Path]:
    """Score the JSON Lines files `paths` (globs allowed) on a Dask cluster into `out_dir`.

    `address` is "tcp://HOST:PORT", a running scheduler, or "local:N", N worker processes on this
    machine (127.0.0.1 only, one thread each) started for this call and closed after it. `model`
    is a checkpoint path that every worker can read at that same path; `options` a
    `score.ScoreOptions` (its `dtype` is the workers' model dtype). Input paths and `out_dir` are
    made absolute here, since remote workers have their own working directory: on several
    machines they must be on storage every worker and this process share.

    Returns the output file of every partition, in input order; partitions whose file already
    exists are not run again. A progress bar on stderr counts finished partitions (`progress`).
    Raises GPT2Error for a malformed address, a scheduler that does not answer, a scheduler
    without workers, workers that cannot load the model, and whatever a partition raises
    (`options.on_error="fail"`); partitions finished before that keep their files.
    """
    from .data import Progress
    from .score import partition_output, plan_partitions

    distributed = _import_distributed()
    out_dir = pathlib.Path(out_dir).absolute()
    partitions = plan_partitions([os.path.abspath(path) for path in paths], options)
    outputs = [partition_output(partition, out_dir, options) for partition in partitions]
    todo = [partition for partition, output in zip(partitions, outputs) if not output.exists()]
    if todo:
        bar = Progress(len(partitions), enabled=progress)
        done = len(partitions) - len(todo)
        with _client(distributed, address) as client:
            out_dir.mkdir(parents=True, exist_ok=True)
            model = os.path.abspath(model)
            # One plugin per model and dtype: a worker of a long-lived cluster that has loaded
            # them keeps them for the next run (the plugin is idempotent).
            plugin = f"{_PLUGIN}:{options.dtype}:{model}"
            client.register_plugin(_model_plugin(model, options.dtype), name=plugin)
            run = uuid.uuid4().hex[:8]
            futures = {client.submit(_score_on_worker, partition, out_dir, options, plugin,
                                     key=f"numpy-gpt2-score-{partition.name}-{run}", retries=RETRIES): partition
                       for partition in todo}
            try:
                for future in distributed.as_completed(futures):
                    try:
                        result = future.result()
                    except distributed.KilledWorker as error:
                        raise GPT2Error(_killed_message(futures[future], error.allowed_failures + 1)) from None
                    if isinstance(result, GPT2Error):
                        raise result
                    done += 1
                    bar.update(done, f"scoring on {address}: {done}/{len(partitions)} partitions")
            finally:
                client.cancel(list(futures))
                bar.close()
    _remove_leftovers(outputs)
    return outputs


def _import_distributed():
    """The `distributed` module, or GPT2Error saying how to install it."""
    try:
        import distributed
    except ImportError as error:
        raise GPT2Error(f"scoring on a Dask cluster needs dask.distributed ({error}): pip install 'dask[distributed]'") from None
    return distributed


def local_cluster(n_workers: int, threads_per_worker: int = 1):
    """A distributed.LocalCluster of `n_workers` processes on this machine, 127.0.0.1 only
    (LOCAL_ONLY), running WORKER_CONFIG; the workers' logs stay quiet, since what goes wrong
    reaches the caller as an exception. Use it as a context manager."""
    import dask

    distributed = _import_distributed()
    # A worker process (its nanny) takes the configuration in force when it is made.
    with dask.config.set(WORKER_CONFIG):
        return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                                        silence_logs=logging.CRITICAL, **LOCAL_ONLY)


@contextlib.contextmanager
def _client(distributed, address: str):
    """A `distributed.Client` for `address` (see `score_on_dask`), closed on exit, with a
    LocalCluster for "local:N"; GPT2Error for a malformed address or a scheduler that does not
    answer or has no worker within TIMEOUT seconds."""
    local = re.fullmatch(r"local:(\d+)", address)
    if local is not None:
        n_workers = int(local.group(1))
        if n_workers < 1:
            raise GPT2Error(f"Dask address {address!r}: local:N needs at least one worker process, found N = 0")
        with local_cluster(n_workers) as cluster, distributed.Client(cluster) as client:
            yield client
        return
    if re.fullmatch(r"tcp://[^/:\s]+:\d+", address) is None:
        raise GPT2Error(f"Dask address {address!r}: expected tcp://HOST:PORT (a running scheduler, as "
                        "`dask scheduler` prints it) or local:N (N worker processes on this machine)")
    try:
        client = distributed.Client(address, timeout=TIMEOUT)
    except OSError:  # TimeoutError, for a port nobody listens on as for a host name that does not resolve
        raise GPT2Error(f"Dask address {address}: no scheduler answered within {TIMEOUT} s; "
                        "start one with `dask scheduler` and give the address it prints") from None
    with client:
        try:
            client.wait_for_workers(1, timeout=TIMEOUT)
        except TimeoutError:
            raise GPT2Error(f"the Dask scheduler at {address} has no worker after {TIMEOUT} s; start some with "
                            f"`dask worker {address} --nthreads 1 --nworkers N`") from None
        yield client


def _killed_message(partition, deaths: int) -> str:
    return (f"{partition.path} lines {partition.start_line}-{partition.stop_line - 1} ({partition.name}): the "
            f"Dask workers running them died {deaths} time{'s' * (deaths != 1)} (out of memory?); the partitions "
            "finished are kept, and a run started again goes on from there")


@functools.lru_cache(maxsize=1)
def _model_plugin_class():
    """The worker plugin class, made on first use since its base class is distributed's."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class ModelPlugin(WorkerPlugin):
        """Loads the model and tokenizer once in each worker process it is registered with,
        and in each worker that joins later; the tasks take them from `loaded`."""

        idempotent = True

        def __init__(self, path: str, dtype: str):
            self.path, self.dtype = path, dtype
            self.model_and_tokenizer = None

        async def setup(self, worker):
            # Off the event loop, so that the worker keeps answering the scheduler while it reads.
            await asyncio.get_running_loop().run_in_executor(None, self.loaded, worker)

        def loaded(self, worker):
            """(model, tokenizer), loaded on the first call: in `setup`, or, where that failed,
            in a task. The plugin stays registered after a failed setup, so a run started again
            once the model is in place loads it in its first task on each worker; while it is
            not, the task returns the same clear error."""
            return _load_once(self, worker)

    return ModelPlugin


def _model_plugin(path: str, dtype: str):
    return _model_plugin_class()(path, dtype)


def _load_once(plugin, worker):
    """`plugin`'s (model, tokenizer), loaded into it on the first call in `worker`'s process.

    A module function, not the plugin's method: the plugin class is pickled by value, and so
    would be the lock.
    """
    with _load_lock:
        if plugin.model_and_tokenizer is None:
            if worker.state.nthreads != 1:
                # The tasks of one process would share the model's work buffers.
                raise GPT2Error(f"Dask worker {worker.address} runs {worker.state.nthreads} threads; numpy-gpt2 "
                                "needs one per worker process: dask worker ADDRESS --nthreads 1 --nworkers N")
            plugin.model_and_tokenizer = _load(plugin.path, plugin.dtype, worker.address)
        return plugin.model_and_tokenizer


def _load(path: str, dtype: str, where: str):
    """(model, tokenizer) from `path`; GPT2Error naming the worker `where` if it cannot."""
    global _model_loads
    from .model import GPT2
    from .threads import choose_blas_kernels
    from .tokenizer import Tokenizer

    # The process is the workers': the BLAS kernels the command line would choose on this CPU,
    # so that a partition's file is the one a single process writes.
    choose_blas_kernels()
    try:
        model, tokenizer = GPT2.from_pretrained(path, dtype=dtype), Tokenizer.from_pretrained(path)
    except (GPT2Error, OSError) as error:
        raise GPT2Error(f"Dask worker {where} cannot load the model: {error}; every worker must read the model "
                        "at the same path (a copy on each machine, or shared storage)") from None
    _model_loads += 1
    return model, tokenizer


def _score_on_worker(partition, out_dir: pathlib.Path, options, plugin: str) -> pathlib.Path | GPT2Error:
    """The task: score one partition with the model the worker plugin loaded. Bad input (a
    GPT2Error) is returned rather than raised: it would fail the same way on every retry."""
    from distributed import get_worker

    from .score import score_partition
    from .threads import set_threads

    worker = get_worker()
    try:
        model, tokenizer = worker.plugins[plugin].loaded(worker)
        # Numba's thread count belongs to the calling thread, and each worker thread is one core's.
        set_threads(1)
        return score_partition(model, tokenizer, partition, out_dir, options)
    except GPT2Error as error:
        return error


def _remove_leftovers(outputs) -> None:
    """Remove the temporary files that workers killed while writing left beside `outputs`
    (`fileio.atomic_path` names them .NAME.*.tmp); every output is complete, so none is in use."""
    for output in outputs:
        for leftover in glob.glob(os.path.join(glob.escape(str(output.parent)), "." + glob.escape(output.name) + ".*.tmp")):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
