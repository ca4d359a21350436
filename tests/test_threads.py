"""Thread control: the BLAS and Numba pools follow set_threads, a prompt's work is shared out in
parts, and the numbers do not depend on any of it (transformers is the reference)."""

import concurrent.futures
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from conftest import tolerance
from numpy_gpt2 import GPT2, GPT2Error, threads


def test_set_threads_reaches_the_blas():
    before = threads.get_threads()
    if before is None:
        pytest.skip("NumPy's BLAS is not one numpy_gpt2.threads recognises (OpenBLAS or MKL)")
    try:
        threads.set_threads(1)
        assert threads.get_threads() == 1  # as the BLAS library itself reports it
    finally:
        threads.set_threads(before)


def test_set_threads_reaches_numba():
    before = numba.get_num_threads()
    try:
        threads.set_threads(1)
        assert numba.get_num_threads() == 1
        threads.set_threads(10_000)  # more than there are cores: Numba's pool stays at its size
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    finally:
        threads.set_threads(before)


def test_logits_do_not_depend_on_thread_count(tiny_ref):
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 30))
    expected = tiny_ref.logits(ids)
    before = threads.get_threads() or 2
    try:
        for n in (1, 2):
            threads.set_threads(n)
            np.testing.assert_allclose(model(ids), expected, atol=tolerance(expected, "float32", tiny_ref.config))
            # A decoding step: two rows, so the products run in the Numba loops.
            cache = model.new_cache(2)
            model(ids[:, :-1], cache=cache)
            step = model(ids[:, -1:], cache=cache)
            np.testing.assert_allclose(step, expected[:, -1:], atol=tolerance(expected, "float32", tiny_ref.config))
    finally:
        threads.set_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_count(bad):
    with pytest.raises(GPT2Error, match="threads must be a positive integer"):
        threads.set_threads(bad)


def test_two_python_threads_decode_at_once(tiny_ref):
    """Two Python threads decoding at the same time share Numba's pool; each still gets
    transformers' logits for its own sequence at every step."""
    model = GPT2.from_pretrained(tiny_ref.hub_dir)
    sequences = np.random.default_rng(1).integers(0, 1000, (2, 1, 40))

    def decode(ids):
        cache = model.new_cache(1)
        steps = [model(ids[:, :12], cache=cache)]  # 12 rows: the prompt path, in parts
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(12, ids.shape[1])]
        return np.concatenate(steps, axis=1)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(decode, sequences))
    for ids, logits in zip(sequences, results):
        expected = tiny_ref.logits(ids)
        np.testing.assert_allclose(logits, expected, atol=tolerance(expected, "float32", tiny_ref.config))


def test_run_in_parts_covers_the_range_once_with_the_blas_single_threaded():
    if threads.get_threads() is None:
        pytest.skip("NumPy's BLAS is not one numpy_gpt2.threads recognises (OpenBLAS or MKL)")
    before = threads.get_threads()
    seen = []

    def work(start, stop):
        seen.append((start, stop, threads.get_threads()))

    try:
        threads.set_threads(2)
        blas_count = threads.get_threads()  # 2, unless the BLAS caps it at the cores there are
        threads.run_in_parts(7, work)
        assert sorted(seen) == [(0, 4, 1), (4, 7, 1)]  # two parts, each with a one-thread BLAS
        assert threads.get_threads() == blas_count  # and the count is back afterwards
        seen.clear()
        threads.set_threads(1)
        threads.run_in_parts(7, work)
        assert seen == [(0, 7, 1)]
    finally:
        threads.set_threads(before)


def test_run_in_parts_passes_on_an_error_and_restores_the_blas():
    if threads.get_threads() is None:
        pytest.skip("NumPy's BLAS is not one numpy_gpt2.threads recognises (OpenBLAS or MKL)")
    before = threads.get_threads()

    def work(start, stop):
        if start > 0:
            raise RuntimeError(f"part {start}..{stop} failed")

    try:
        threads.set_threads(2)
        blas_count = threads.get_threads()
        with pytest.raises(RuntimeError, match="part 5..9 failed"):
            threads.run_in_parts(9, work)
        assert threads.get_threads() == blas_count
    finally:
        threads.set_threads(before)


def _fresh_process_with_blas_threads(n: int, code: str) -> str:
    """The output of `code` run in a new Python whose BLAS has n threads by its environment."""
    if threads.get_threads() is None:
        pytest.skip("NumPy's BLAS is not one numpy_gpt2.threads recognises (OpenBLAS or MKL)")
    if n > (os.cpu_count() or 1):
        pytest.skip(f"the BLAS caps its threads at the {os.cpu_count()} cores here")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(n), "OMP_NUM_THREADS": str(n), "NUMBA_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("n", [1, 2])
def test_run_in_parts_follows_openblas_num_threads(n):
    """Without set_threads the parts follow the BLAS's own count, as the user's environment set it."""
    out = _fresh_process_with_blas_threads(n, "from numpy_gpt2 import threads\n"
                                              "seen = []\n"
                                              "threads.run_in_parts(8, lambda a, b: seen.append((a, b)))\n"
                                              "print(sorted(seen))\n")
    assert out.strip() == str([(0, 8)] if n == 1 else [(0, 4), (4, 8)])


@pytest.mark.parametrize("n", [1, 2])
def test_numbas_pool_parts_follow_openblas_num_threads_when_first_used(n):
    """A prompt's work in Numba's pool, as the first thing a process does, is cut into one part
    per thread the BLAS had (not the one thread it is set to meanwhile), and the BLAS gets its
    count back after."""
    out = _fresh_process_with_blas_threads(n, "from numpy_gpt2 import threads\n"
                                              "with threads.blas_single_threaded_parts() as parts:\n"
                                              "    inside = threads.get_threads()\n"
                                              "print(parts, inside, threads.get_threads())\n")
    assert out.split() == [str(n), "1", str(n)]


# ---- the BLAS kernel set (choose_blas_kernels) -------------------------------------------
# /proc/cpuinfo as Linux prints it for each CPU, cut to the fields that matter (AMD's family
# numbers: 0x19 = 25 is Zen 3 and Zen 4, 0x1A = 26 is Zen 5; Intel's server cores are family 6).
_CPUINFO = "vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 17\nflags\t\t: fpu sse2 avx avx2 fma{avx512}\n\n"


@pytest.mark.parametrize("vendor, family, avx512, zen4", [
    ("AuthenticAMD", 25, True, True),     # Zen 4 (EPYC 9004, Ryzen 7000)
    ("AuthenticAMD", 25, False, False),   # Zen 3: no AVX-512, OpenBLAS already picks AVX2 kernels
    ("AuthenticAMD", 26, True, False),    # Zen 5: full-width AVX-512
    ("GenuineIntel", 6, True, False),     # Skylake-X and later
])
def test_zen4_is_recognised_from_cpuinfo(vendor, family, avx512, zen4):
    text = _CPUINFO.format(vendor=vendor, family=family, avx512=" avx512f avx512vl" if avx512 else "") * 2
    assert threads._zen_with_half_width_avx512(text) is zen4


# OpenBLAS's own report of its kernel set, read without numpy_gpt2.
_KERNELS_READER = """
import ctypes, numpy
def openblas_kernels():
    libs = [line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()]
    corename = getattr(ctypes.CDLL(libs[0]), "gotoblas_corename", None) if libs else None
    if corename is None:
        return ""
    corename.restype = ctypes.c_char_p
    return corename().decode()
"""
_OPENBLAS_KERNELS = _KERNELS_READER + "print(openblas_kernels())\n"


def _run(code, **env):
    env = {**{k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}, **env}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def _zen4_with_avx512_kernels(own: str) -> bool:
    """Whether this machine is one where choose_blas_kernels switches: Zen 4, OpenBLAS on its
    AVX-512 kernels (`own`, what it chose by itself)."""
    return own.lower() in threads._AVX512_KERNELS and threads._zen_with_half_width_avx512(threads._cpu_info())


def test_zen4_gets_the_avx2_kernels_and_a_set_coretype_is_kept():
    """OpenBLAS's choice in a process without numpy_gpt2, against the one in force after
    numpy_gpt2.choose_blas_kernels()."""
    own = _run(_OPENBLAS_KERNELS)
    if not own:
        pytest.skip("NumPy's BLAS is not an OpenBLAS that names its kernels")
    after_choice = "import numpy_gpt2\nnumpy_gpt2.choose_blas_kernels()\n" + _OPENBLAS_KERNELS
    if _zen4_with_avx512_kernels(own):
        assert _run(after_choice) == "Haswell"
        # numpy_gpt2's own reader, in a process that made the choice
        assert _run("from numpy_gpt2 import threads\nthreads.choose_blas_kernels()\n"
                    "print(threads.blas_kernels())") == "Haswell"
        # A coretype the user set is theirs: the same AVX-512 kernels stay.
        assert _run(after_choice, OPENBLAS_CORETYPE=own) == own
    else:
        assert _run(after_choice) == own  # any other CPU keeps what OpenBLAS chose


# Float32 products by NumPy on fixed data, then `import numpy_gpt2` (and the kernel choice when
# CHOOSE is set), then the same products; and OpenBLAS's kernel set at both times, as OpenBLAS
# itself reports it.
_PRODUCTS_AROUND_IMPORT = _KERNELS_READER + """
import os
import numpy as np
def products():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 512), np.float32), rng.standard_normal((512, 384), np.float32)
    x, y = rng.standard_normal(10_000, np.float32), rng.standard_normal(10_000, np.float32)
    return (a @ b).tobytes() + np.dot(x, y).tobytes()
before, kernels_before = products(), openblas_kernels()
import numpy_gpt2
if os.environ.get("CHOOSE"):
    numpy_gpt2.choose_blas_kernels()
print(products() == before, openblas_kernels() == kernels_before, kernels_before or "-")
"""


def test_import_changes_no_float32_result_of_numpy():
    """`import numpy_gpt2` leaves NumPy as it found it: in a fresh process, a float32 matmul and
    a float32 dot are the same bytes before and after the import, and OpenBLAS's kernel set is
    the one it chose by itself.

    Where choose_blas_kernels would switch (Zen 4 with OpenBLAS on its AVX-512 kernels), the
    bytes themselves would show a switch made on import: the other kernels sum in another order.
    On other CPUs the switch is never made, so the bytes cannot show it there; the kernel set
    reported before and after still would, and any other change to NumPy's float32 results
    made on import would show in the bytes."""
    same_bytes, same_kernels, own = _run(_PRODUCTS_AROUND_IMPORT).split()
    assert same_kernels == "True", f"OpenBLAS's kernel set changed on import (it was {own})"
    assert same_bytes == "True", "a float32 product by NumPy changed on import"
    if _zen4_with_avx512_kernels(own):
        # Here the check can see a switch: after the explicit choice the same products differ.
        assert _run(_PRODUCTS_AROUND_IMPORT, CHOOSE="1").split()[:2] == ["False", "False"]


# One step of work per process, all sharing one Numba cache directory.
_CACHE_STEP = """
import sys
import numpy as np
from numpy_gpt2 import GPT2, kernels
step, path = sys.argv[1:]
if step == "attention":       # the parallel attention loop, on its own
    q, k = np.zeros((2, 1, 4, 8), np.float32), np.zeros((2, 4, 3, 8), np.float32)
    kernels.causal_attention(q, k, k, np.ones((2, 3), bool), 2, 0.3)
elif step == "prompt":        # four rows: the parallel few-rows product, on its own
    kernels.few_rows_matmul(np.ones((4, 8), np.float32), np.ones((6, 8), np.float32), np.empty((4, 6), np.float32))
else:                         # one position, two rows, no cache: decode_block first of all
    GPT2.from_pretrained(path)(np.arange(2)[:, None])
"""


def test_decode_block_from_a_cache_filled_by_earlier_processes(tiny_ref, tmp_path):
    """numba issue #8578: a cached function that is not parallel but calls parallel ones, loaded
    from the cache as the first Numba call of a process, used to crash it (segfault) when it had
    been compiled beside callees that were themselves loaded from the cache. Each step is the
    process it would be for a user; every one must exit cleanly."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    for step in ("attention", "prompt", "decode", "decode"):
        done = subprocess.run([sys.executable, "-c", _CACHE_STEP, step, str(tiny_ref.hub_dir)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"step {step}: exit {done.returncode}\n{done.stderr[-2000:]}"


# ---- waiting threads on a busy machine (issue 19) ------------------------------------------
# libgomp's own report of the settings it read when it was loaded (OMP_DISPLAY_ENV), from a
# fresh process that starts Numba's threads through numpy_gpt2; then whether the environment
# still holds GOMP_SPINCOUNT, and Numba's threading layer.
_START_THREADS = """
import os
from numpy_gpt2 import threads
threads.start_numba_threads()
import numba
print("GOMP_SPINCOUNT" in os.environ, os.environ.get("GOMP_SPINCOUNT"), numba.threading_layer())
"""


def _libgomp_report(code, **env):
    """(libgomp's settings as it printed them, stdout) of `code` in a fresh process whose
    environment is this one's without any OpenMP wait setting, plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], env={**base, "OMP_DISPLAY_ENV": "verbose", **env},
                          capture_output=True, text=True, check=True)
    settings = dict(line.strip().split(" = ", 1) for line in done.stderr.splitlines() if " = '" in line)
    return {k: v.strip("'") for k, v in settings.items()}, done.stdout.split()


def _needs_libgomp(stdout):
    if stdout[-1] != "omp":
        pytest.skip(f"Numba runs its {stdout[-1]} threading layer here, not OpenMP")


def test_numbas_openmp_threads_sleep_soon_and_the_environment_is_left_as_it_was():
    """Started through numpy_gpt2, libgomp reports the short spin (1000 rounds of its wait loop,
    not its own 300,000) and no GOMP_SPINCOUNT is left behind for child processes."""
    settings, stdout = _libgomp_report(_START_THREADS)
    _needs_libgomp(stdout)
    assert settings["GOMP_SPINCOUNT"] == threads._GOMP_SPINCOUNT == "1000"
    assert stdout[:2] == ["False", "None"]


@pytest.mark.parametrize("env, spin", [({"GOMP_SPINCOUNT": "7"}, "7"),
                                       ({"OMP_WAIT_POLICY": "active"}, None)])
def test_a_wait_the_user_chose_is_kept(env, spin):
    settings, stdout = _libgomp_report(_START_THREADS, **env)
    _needs_libgomp(stdout)
    if spin is None:  # OMP_WAIT_POLICY=active: libgomp's own spin for it, not numpy_gpt2's
        assert settings["OMP_WAIT_POLICY"] == "ACTIVE" and settings["GOMP_SPINCOUNT"] != threads._GOMP_SPINCOUNT
    else:
        assert settings["GOMP_SPINCOUNT"] == spin
    assert stdout[1] == env.get("GOMP_SPINCOUNT", "None")  # the user's variable stays set


def test_importing_starts_no_openmp_and_sets_nothing():
    """`import numpy_gpt2` and its threads module load no OpenMP (libgomp prints nothing) and
    leave the environment unchanged."""
    settings, stdout = _libgomp_report("import os\nbefore = dict(os.environ)\nimport numpy_gpt2\n"
                                       "from numpy_gpt2 import threads, GPT2\nprint(dict(os.environ) == before)\n")
    assert settings == {} and stdout == ["True"]


def test_a_model_loaded_first_starts_numbas_threads_with_the_short_spin(tiny_ref):
    """The first use in a process is often the load or a prompt, not a decoding step."""
    settings, stdout = _libgomp_report(f"from numpy_gpt2 import GPT2\nimport numpy as np, numba\n"
                                       f"GPT2.from_pretrained({str(tiny_ref.hub_dir)!r})(np.arange(30))\n"
                                       f"print(numba.threading_layer())\n")
    _needs_libgomp(stdout)
    assert settings["GOMP_SPINCOUNT"] == "1000"


class _Readings:
    """Fake kernel counters for StepThreads: a clock the test moves, our threads' (run, wait)
    nanoseconds and the machine's (all, free) ticks, each advanced by a window's worth."""

    def __init__(self):
        self.now, self.run, self.wait, self.all, self.free = 0.0, 10**9, 0, 10**6, 0

    def window(self, seconds, waited_share=0.0, free_cores=0.0, cores=os.cpu_count()):
        self.now += seconds
        ran = int(seconds * 1e9)
        self.run, self.wait = self.run + ran, self.wait + int(waited_share * ran)
        ticks = int(seconds * 100) * cores
        self.all, self.free = self.all + ticks, self.free + int(ticks * free_cores / cores)


def _chooser(readings):
    return threads.StepThreads(clock=lambda: readings.now, read_threads=lambda: (readings.run, readings.wait),
                               read_cpu=lambda: (readings.all, readings.free))


def _step(chooser):
    """One step under the chooser; the Numba thread count the step ran with."""
    with chooser.step():
        return numba.get_num_threads()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one core: nothing to choose")
def test_step_threads_drop_to_one_while_a_core_is_taken_and_come_back_when_it_is_free(monkeypatch):
    monkeypatch.setattr(threads, "_chosen", False)  # as in a process where nobody called set_threads
    readings = _Readings()
    before = numba.get_num_threads()
    chooser = _chooser(readings)
    everything = chooser.all
    assert _step(chooser) == everything
    readings.window(0.1, waited_share=0.01)       # quiet: a few thousandths waited
    assert _step(chooser) == everything
    readings.window(0.1, waited_share=0.5)        # a core taken: half the run time waited
    _step(chooser)                                # the step that ends the window judges it
    assert _step(chooser) == 1
    readings.window(0.3, free_cores=1.0)          # a core came free, but too soon to try again
    _step(chooser)
    assert _step(chooser) == 1
    readings.window(0.3, free_cores=0.2)          # after the wait, no core free
    _step(chooser)
    assert _step(chooser) == 1
    readings.window(0.3, free_cores=1.0)          # free: try all threads
    _step(chooser)
    assert _step(chooser) == everything
    readings.window(0.1, waited_share=0.4)        # the try fails: back to one, wait doubled
    _step(chooser)
    assert _step(chooser) == 1 and chooser.probe_wait == 1.0
    readings.window(0.6, free_cores=1.0)          # not yet: 1.0 s since the failed try
    _step(chooser)
    assert _step(chooser) == 1
    readings.window(0.6, free_cores=1.0)
    _step(chooser)
    assert _step(chooser) == everything
    readings.window(0.1, waited_share=0.02)       # the try holds: all threads, wait reset
    _step(chooser)
    assert _step(chooser) == everything and chooser.probe_wait == 0.5
    chooser.close()
    assert numba.get_num_threads() == before


def test_step_threads_leave_a_chosen_count_alone():
    readings = _Readings()
    before = threads.get_threads() or 2
    try:
        threads.set_threads(1)
        chooser = _chooser(readings)
        readings.window(0.1, waited_share=0.9)   # would drop to one, had nobody chosen
        _step(chooser)
        readings.window(0.3, free_cores=2.0)
        assert not chooser.active and _step(chooser) == 1
    finally:
        threads.set_threads(before)
        threads._chosen = False  # as before any set_threads: the loops choose again


def test_kernel_readings_against_the_clocks():
    """thread_times and cpu_times against the process's CPU clock and the wall clock."""
    run0, wait0 = threads.thread_times()
    all0, free0 = threads.cpu_times()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < 0.3:
        pass
    run1, wait1 = threads.thread_times()
    all1, free1 = threads.cpu_times()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # schedstat counts in nanoseconds what process_time counts; a timer tick (10 ms) apart
    assert abs((run1 - run0) / 1e9 - cpu) < 0.02 and wait1 >= wait0
    # /proc/stat: every core's ticks over the wall time, to a tick per core either side
    ticks = os.sysconf("SC_CLK_TCK")
    assert abs((all1 - all0) / ticks - os.cpu_count() * wall) <= 2 * os.cpu_count() / ticks + 0.02
    assert 0 <= free1 - free0 <= all1 - all0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to hold one")
def test_decoding_drops_to_one_thread_beside_a_program_holding_a_core(long_ref, monkeypatch):
    """A real spinning process pinned to one of our cores: the loop's own readings send it to
    one thread, and the tokens are those of the quiet run."""
    monkeypatch.setattr(threads, "_chosen", False)
    model = GPT2.from_pretrained(long_ref.hub_dir)
    ids = np.arange(8)[None]
    quiet = model.generate(ids, max_new_tokens=150)
    counts = []
    step = model.decode_step

    def counting_step(*args):
        counts.append(numba.get_num_threads())
        return step(*args)

    core = sorted(os.sched_getaffinity(0))[-1]
    spinner = subprocess.Popen([sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        model.decode_step = counting_step
        deadline = time.perf_counter() + 20
        while 1 not in counts and time.perf_counter() < deadline:
            np.testing.assert_array_equal(model.generate(ids, max_new_tokens=150), quiet)
    finally:
        spinner.kill()
        spinner.wait()
        del model.decode_step
    assert 1 in counts
