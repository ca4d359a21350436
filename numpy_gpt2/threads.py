"""How many threads the work uses, and how it is shared between them.

Two kinds of parallel work, each on as many threads as the BLAS has by default (one per core,
unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say otherwise; Numba follows NUMBA_NUM_THREADS):
- a prompt's products and attention: the work is cut into one part per thread (bands of a
  product's output columns, groups of heads) and the parts run at once in Numba's pool, each
  calling the BLAS single-threaded (`blas_single_threaded_parts`; see `kernels.blas.gemm`). Where
  the BLAS's ?gemm cannot be called so, `run_in_parts` runs the parts, the caller's thread
  taking the first and a small pool of Python threads the others. The BLAS's own workers
  are kept out of it on purpose: after each product they spin for a while waiting for more,
  and between products the Numba loops (softmax, GELU) then share a core with a spinning
  thread, so that the same prompt's time depends on where the scheduler puts them. One pool,
  Numba's, for all of a forward's parallel work avoids the same fight between Numba's
  spinning workers and Python's.
- a decoding step's products of a few rows and its attention run in Numba's thread pool (see
  `kernels.decode`).
`set_threads(n)` sets the number for both, and for the BLAS outside these (it is found among
the libraries this process has loaded and set through its own setter: OpenBLAS, as NumPy's
wheels ship it, under any of its symbol prefixes; or MKL).

Waiting threads sleep soon. Numba's OpenMP layer (GNU libgomp) lets a thread that waits for
work, or for the others at the end of a parallel loop, spin for about 9 ms (300,000 rounds of
its wait loop) before it sleeps. A decoding step is about 60 short parallel loops; when another
program holds a core, our thread on it is descheduled for a time slice, and the spinning of the
others keeps it from getting a core back: one loop after another waits out a slice. So Numba's
threads are started (`start_numba_threads`, on first use, never on import) with libgomp's spin
cut to GOMP_SPINCOUNT=1000 rounds, about 30 us: longer than the gaps between a step's loops,
much shorter than a time slice (see docs/performance.md, "Threads on a busy machine").
Even then a step on all threads waits for the one whose core is taken, and one thread is
faster: a decoding loop watches for that and changes its count (`StepThreads`).

Which of OpenBLAS's kernel sets the products use can be chosen here too, by an explicit call
that changes the whole process's NumPy (`choose_blas_kernels`, which the command line makes):
on AMD Zen 4 its AVX2 kernels are faster than the AVX-512 ones it picks by itself. Importing
numpy_gpt2 never makes it.
"""

import concurrent.futures
import contextlib
import ctypes
import functools
import os
import threading
import time

import numba

from .errors import GPT2Error

_SETTERS = (
    "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_", "openblas_set_num_threads", "MKL_Set_Num_Threads",
)
_GETTERS = (
    "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_", "openblas_get_num_threads", "MKL_Get_Max_Threads",
)


@functools.lru_cache(maxsize=1)
def _blas_handle():
    """(library, setter, getter) of the BLAS NumPy loaded, or (None, None, None) if none is
    recognised."""
    import numpy  # noqa: F401  -- make sure NumPy's BLAS is loaded before we look for it

    paths = [path for path in _loaded_libraries() if "blas" in path.lower() or "mkl_rt" in path]
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SETTERS if hasattr(lib, s)), None)
        getter = next((getattr(lib, s) for s in _GETTERS if hasattr(lib, s)), None)
        if setter is not None:
            return lib, setter, getter
    return None, None, None


def _loaded_libraries() -> list:
    """The paths of the shared libraries this process has loaded, sorted; [] where
    /proc/self/maps cannot be read (not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line})
    except OSError:
        return []


def _blas_library():
    """(setter, getter) of the BLAS NumPy loaded, or (None, None) if none is recognised."""
    return _blas_handle()[1:]


def blas_function(*names: str):
    """The first of `names` that NumPy's BLAS exports, as a ctypes function, or None."""
    lib = _blas_handle()[0]
    return next((getattr(lib, name) for name in names if lib is not None and hasattr(lib, name)), None)


# OpenBLAS's kernel sets for AVX-512 cores, as `gotoblas_corename` names them.
_AVX512_KERNELS = ("skylakex", "cooperlake", "sapphirerapids")


def blas_kernels() -> str | None:
    """The name of the kernel set NumPy's OpenBLAS uses ("Haswell", "SkylakeX", ...), or None
    when the BLAS is not an OpenBLAS that says."""
    corename = blas_function("gotoblas_corename")
    if corename is None:
        return None
    corename.restype = ctypes.c_char_p
    return corename().decode()


def choose_blas_kernels() -> str | None:
    """On AMD Zen 4, switch NumPy's OpenBLAS from its AVX-512 kernels to its AVX2 (Haswell)
    ones; return the kernel set in force (see `blas_kernels`).

        import numpy_gpt2
        numpy_gpt2.choose_blas_kernels()   # once, before any thread uses NumPy's BLAS

    OpenBLAS picks its SkylakeX kernels for any CPU with AVX-512. Zen 4 runs a 512-bit
    instruction as two 256-bit halves, so they do the same arithmetic per cycle with blocking
    tuned for Intel's caches, and float32 products of a prompt's shapes run faster with the
    Haswell kernels (float64 ones a little slower). Nothing changes when OPENBLAS_CORETYPE is
    set (the user's own choice), on other CPUs (Zen 5 has full-width AVX-512), or when the
    library does not offer the switch (`gotoblas_dynamic_init` of a DYNAMIC_ARCH build with
    Haswell kernels).

    The switch replaces the kernel table of the whole process: every NumPy product after it,
    numpy-gpt2's or not, runs the other kernels, and its float32 results can differ in their
    last bits. So it is the caller's choice, never made on import: the command line (`cli.main`)
    and the benchmark (bench/run.py) make it. It must not run while another thread is inside
    the BLAS.
    """
    current = blas_kernels()
    if current is None or current.lower() not in _AVX512_KERNELS or "OPENBLAS_CORETYPE" in os.environ:
        return current
    dynamic_quit, dynamic_init = blas_function("gotoblas_dynamic_quit"), blas_function("gotoblas_dynamic_init")
    haswell = blas_function("gotoblas_HASWELL")  # its kernels are in this build
    if None in (dynamic_quit, dynamic_init, haswell) or not _zen_with_half_width_avx512(_cpu_info()):
        return current
    # dynamic_init reads OPENBLAS_CORETYPE, as it does when the library loads.
    os.environ["OPENBLAS_CORETYPE"] = "Haswell"
    try:
        dynamic_quit()
        dynamic_init()
    finally:
        del os.environ["OPENBLAS_CORETYPE"]
    return blas_kernels()


def _cpu_info() -> str:
    """The text of /proc/cpuinfo, or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as info:
            return info.read()
    except OSError:
        return ""


def _zen_with_half_width_avx512(cpu_info: str) -> bool:
    """Whether /proc/cpuinfo's text describes AMD Zen 4 (family 0x19 with AVX-512)."""
    fields = {}
    for line in cpu_info.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return (fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
            and "avx512f" in fields.get("flags", "").split())


# Rounds of libgomp's wait loop (a pause instruction each) before a waiting thread sleeps.
_GOMP_SPINCOUNT = "1000"
_numba_started = False


def start_numba_threads() -> None:
    """Start Numba's threading layer, once, with OpenMP's waiting threads sleeping soon (see
    the module's docstring). Every use of Numba's threads in numpy_gpt2 comes here first;
    importing numpy_gpt2 starts no threads.

    libgomp reads GOMP_SPINCOUNT when it is loaded, which is when Numba starts its OpenMP layer,
    so the variable is set for that moment only: afterwards the environment is as it was, for
    child processes and for any library loaded later. Nothing is set where the user chose the
    wait (OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment), or where libgomp was loaded
    before: it has read its settings already. Numba's other layers (workqueue, tbb) do not read
    it; workqueue's threads wait on a condition variable, without spinning.

    Started here before the first call of a cached function that is not parallel itself but
    calls parallel ones (`decode._decode_block`): loaded from the cache, such a function does not
    start the layer, and its parallel loops then crash the process (numba issue #8578: a segfault
    on the first decoding step of a process whose cache earlier processes filled).
    """
    global _numba_started
    if _numba_started:
        return
    with _pool_lock:
        if _numba_started:
            return
        choose = (not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys()
                  and not any(os.path.basename(path).startswith("libgomp") for path in _loaded_libraries()))
        if choose:
            os.environ["GOMP_SPINCOUNT"] = _GOMP_SPINCOUNT
        try:
            numba.get_num_threads()
        finally:
            if choose:
                del os.environ["GOMP_SPINCOUNT"]
        _numba_started = True


def numba_threads() -> int:
    """The number of threads Numba's parallel loops use in this thread, its layer started first
    (`start_numba_threads`)."""
    start_numba_threads()
    return numba.get_num_threads()


_parts = None  # threads for run_in_parts: set_threads(n), else the BLAS's own count (see _part_count)
_chosen = False  # whether set_threads was called: then StepThreads keeps the count
_pool, _pool_size = None, 0  # the other parts' threads, made on first use
_pool_lock = threading.Lock()
_blas_users, _blas_saved = 0, None  # see _blas_single_threaded


def set_threads(n: int) -> None:
    """Use `n` threads for the matrix products (BLAS and Numba) from now on in this process.

    Raises GPT2Error for n < 1. Where the BLAS cannot be found (not Linux, an unknown BLAS) it
    sets OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS for child processes only.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GPT2Error(f"threads must be a positive integer, found {n!r}")
    global _parts, _chosen
    _parts, _chosen = n, True
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(n)
    # Numba's pool has one thread per core (NUMBA_NUM_THREADS) and cannot grow past it.
    start_numba_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    setter, _ = _blas_library()
    if setter is not None:
        setter(ctypes.c_int(n))


def get_threads() -> int | None:
    """The BLAS thread count in force, or None when the BLAS is not one we recognise."""
    _, getter = _blas_library()
    return int(getter()) if getter is not None else None


def run_in_parts(n_items: int, work) -> None:
    """Call work(start, stop) over consecutive parts of range(n_items), one per thread, at once.

    The calling thread takes the first part and waits for the others. Meanwhile the BLAS runs
    single-threaded (see the module's docstring). Where the BLAS cannot be set (an unknown
    library), or with one thread, the whole range is one call on the calling thread.
    """
    setter, getter = _blas_library()
    if setter is None or getter is None:
        work(0, n_items)
        return
    parts = min(_part_count(getter), n_items)
    if parts <= 1:
        work(0, n_items)
        return
    per_part = -(-n_items // parts)
    bounds = [(start, min(n_items, start + per_part)) for start in range(0, n_items, per_part)]
    pool = _worker_pool(len(bounds) - 1)
    with _blas_single_threaded(setter, getter):
        others = [pool.submit(work, start, stop) for start, stop in bounds[1:]]
        try:
            work(*bounds[0])
        finally:
            for future in others:
                future.result()


@contextlib.contextmanager
def blas_single_threaded_parts():
    """Within: the BLAS at one thread, for work cut into parts that call it from Numba's pool.
    Yields the number of parts: one per thread, as `run_in_parts` cuts, at most Numba's pool
    size; 1 where the BLAS cannot be found or set."""
    setter, getter = _blas_library()
    if setter is None or getter is None:
        yield 1
        return
    parts = max(1, min(_part_count(getter), numba_threads()))  # before the BLAS is set to 1
    with _blas_single_threaded(setter, getter):
        yield parts


def _part_count(getter) -> int:
    """The threads for run_in_parts: set_threads(n) if called, else the BLAS's own count when
    first asked (one per core, or what OPENBLAS_NUM_THREADS / OMP_NUM_THREADS said)."""
    global _parts
    with _pool_lock:
        if _parts is None:
            # Never inside _blas_single_threaded: every caller comes here first.
            _parts = int(getter())
        return _parts


def _worker_pool(size: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of at least `size` threads, grown (replaced) when more are asked for."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool_size < size:
            old = _pool
            _pool, _pool_size = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="numpy-gpt2"), size
            if old is not None:
                old.shutdown(wait=False)
        return _pool


@contextlib.contextmanager
def _blas_single_threaded(setter, getter):
    """Within: the BLAS at one thread. Nested and concurrent uses count; the last one out puts
    back the count that the first one in found."""
    global _blas_users, _blas_saved
    with _pool_lock:
        if _blas_users == 0:
            _blas_saved = int(getter())
            setter(ctypes.c_int(1))
        _blas_users += 1
    try:
        yield
    finally:
        with _pool_lock:
            _blas_users -= 1
            if _blas_users == 0:
                setter(ctypes.c_int(_blas_saved))


# StepThreads' readings: the share of their run time our threads may wait for a core before
# the loop drops to one thread (measured: quiet, 0.01; beside programs of lower priority, up to
# 0.18; with a core held by a program of the same priority, 0.55), the idle cores that send it
# back to all, and how long it looks each way.
_WAIT_SHARE = 0.3
_FREE_CORES = 0.6
_ALL_WINDOW, _ONE_WINDOW = 0.1, 0.25  # seconds
_PROBE_WAIT = (0.5, 8.0)  # seconds before trying all threads again: after a good try, at most


def thread_times() -> tuple[int, int] | None:
    """(run, wait): nanoseconds this process's threads have run, and waited runnable for a core,
    summed over its threads (/proc/self/task/*/schedstat); None where the kernel does not say."""
    run = wait = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as stat:
                fields = stat.read().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that has just ended
    return (run, wait) if run else None


def cpu_times() -> tuple[int, int] | None:
    """(all, free): clock ticks of every core since boot, and of those the ones free for us:
    idle, waiting for I/O, or running a program of lower priority (nice), as /proc/stat counts
    them; None where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    except (OSError, ValueError):
        return None
    return user + nice + system + idle + iowait + irq + softirq + steal, nice + idle + iowait


class StepThreads:
    """How many of Numba's threads a decoding loop's steps use: all, or one while another
    program holds a core.

    A step is about 60 short parallel loops. With a core taken, each loop waits for the thread
    on that core to get it back, and a step on all threads is slower than on one (bench/busy.py).
    The loop reads what the kernel counts rather than timing itself (a step's time says little:
    the memory bandwidth it depends on swings from one moment to the next):
    - on all threads, over a window of steps: the time our threads waited runnable for a core
      against the time they ran (the run queue's wait, /proc/self/task/*/schedstat). Above
      0.3 (_WAIT_SHARE) a core is taken: go to one thread. A program of lower priority (nice) yields the
      core when our thread wakes, so it barely shows, and the loop keeps all threads.
    - on one thread: the machine's free time (/proc/stat: idle, and programs of lower
      priority; our own time not counted). Once about a core is free, try all threads again,
      judged as above; each failed try doubles the time before the next one.
    Each output of a step is computed by one thread in one order whatever the count, so the
    tokens do not depend on the choice. Only while nobody chose the count (`set_threads`), and
    where the kernel gives the readings (Linux); `close()` puts back this thread's count.

        threads = StepThreads(active=B <= kernels.FEW_ROWS)
        try:
            for step in range(n):
                with threads.step():
                    logits = model.decode_step(...)
        finally:
            threads.close()
    """

    def __init__(self, active: bool = True, clock=time.perf_counter, read_threads=thread_times,
                 read_cpu=cpu_times):
        self.all = numba_threads()
        self.before = numba.get_num_threads()
        self.clock, self.read_threads, self.read_cpu = clock, read_threads, read_cpu
        self.threads, self.trying = self.all, False
        self.probe_wait, self.next_probe = _PROBE_WAIT[0], 0.0
        self.active = active and not _chosen and self.all > 1
        if self.active:
            self._start_window()
            self.active = self.thread_readings is not None

    def _start_window(self) -> None:
        self.started, self.cpu_started = self.clock(), time.process_time()
        self.thread_readings, self.cpu_readings = self.read_threads(), self.read_cpu()

    @contextlib.contextmanager
    def step(self):
        """Run the block (one decoding step) on the count in force; judge after a window."""
        if not self.active:
            yield
            return
        numba.set_num_threads(self.threads)
        yield
        now = self.clock()
        if now - self.started >= (_ALL_WINDOW if self.threads > 1 else _ONE_WINDOW):
            self.threads = self._all_or_one(now) if self.threads > 1 else self._one_or_all(now)
            self._start_window()

    def _all_or_one(self, now: float) -> int:
        before, after = self.thread_readings, self.read_threads()
        if before is None or after is None or after[0] <= before[0]:
            return self.threads
        waited = (after[1] - before[1]) / (after[0] - before[0])
        trying, self.trying = self.trying, False
        if waited < _WAIT_SHARE:
            if trying:
                self.probe_wait = _PROBE_WAIT[0]
            return self.all
        if trying:
            self.probe_wait = min(2 * self.probe_wait, _PROBE_WAIT[1])
        self.next_probe = now + self.probe_wait
        return 1

    def _one_or_all(self, now: float) -> int:
        before, after = self.cpu_readings, self.read_cpu()
        if before is None or after is None or after[0] <= before[0] or now < self.next_probe:
            return 1
        free = (os.cpu_count() or 1) * (after[1] - before[1]) / (after[0] - before[0])
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:  # our own time is counted as nice
            free -= (time.process_time() - self.cpu_started) / (now - self.started)
        if free < _FREE_CORES:
            return 1
        self.trying = True
        return self.all

    def close(self) -> None:
        if self.active:
            numba.set_num_threads(self.before)
