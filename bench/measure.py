"""Timing helpers: a clock, medians, and the measurements that need a fresh process.

In-process timings use `time.perf_counter` with the garbage collector run beforehand and
switched off during the timed region, so a collection of earlier garbage does not land in one
engine's sample. Cold start and peak memory are about a whole process, so they run the command
line in a subprocess.
"""

import contextlib
import gc
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# Runs the command in argv[1:] with its output discarded and prints its peak RSS in KiB.
# A fresh wrapper per measurement, because RUSAGE_CHILDREN is the maximum over every child a
# process has waited for: in the harness itself it would still hold an earlier, larger child.
_PEAK_RSS_WRAPPER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if done.returncode:
    sys.exit(done.stderr or f"exit status {done.returncode}")
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@contextlib.contextmanager
def quiet_gc():
    """Collect now, then keep the collector off until the block ends."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def median(values):
    """The median of a non-empty list of numbers (the mean of the middle two for even lengths)."""
    return statistics.median(values)


def run_seconds(command, env=None, timeout=600) -> float:
    """Wall time of `command` (a list of strings) in a subprocess, from spawn to exit.

    Raises RuntimeError with its stderr when it fails: a broken command must not become a
    fast-looking time.
    """
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return seconds


def peak_rss_bytes(command, env=None, timeout=600) -> int:
    """Peak resident set size of `command` run to completion in a fresh wrapper process."""
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_WRAPPER, *command], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return int(done.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def first_compile_seconds(command, env) -> tuple:
    """Wall time of `command` with an empty Numba cache -> (seconds, cache files written).

    NUMBA_CACHE_DIR points at a fresh temporary directory; Numba's cache locators try it
    before the `__pycache__` beside the source, so every `cache=True` kernel is compiled anew.
    The count of index files written there shows that Numba did use it: 0 would mean the
    time measured no compilation.
    """
    cache_dir = tempfile.mkdtemp(prefix="numba-cold-")
    try:
        seconds = run_seconds(command, env={**env, "NUMBA_CACHE_DIR": cache_dir})
        written = sum(1 for _ in pathlib.Path(cache_dir).rglob("*.nbi"))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return seconds, written


def cli_command() -> list:
    """The `numpy-gpt2` console script of this Python, else `python -m numpy_gpt2`."""
    script = pathlib.Path(sys.executable).with_name("numpy-gpt2")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "numpy_gpt2"]
