"""Speed with one core held by another program (issue 19): default threads against one thread
and all threads, and this checkout against an earlier commit on a quiet machine.

    python bench/busy.py                      # against the merge base with main
    python bench/busy.py --before abc123 --rounds 5 --prompt 512

Each (code, threads) pair is its own long-lived worker process (OpenMP reads its settings when
a process starts Numba's threads): `this` is this checkout, `before` a `git archive` of the
--before commit; threads `default` never calls set_threads, `1` and `all` call it. Each worker
loads the GPT-2 124M-shaped random checkpoint of bench/run.py, warms up, and then times what
the driver asks: `decode` (greedy, batch 1, --new tokens after an 8-token prompt, the steps after
the first token, as bench/run.py times them) and `prefill` (one forward over a --prompt-token
prompt, last logits kept). The scenarios:

- `quiet`: nothing started by the bench;
- `busy core 1`: a pure-Python spin loop in a subprocess pinned to core 1 (os.sched_setaffinity);
- `busy unpinned`: the same loop, the scheduler free to move it.

Within a scenario the workers take turns, the order rotating each round, and the median of the
rounds is reported with the spread (min-max). `before` runs in the quiet scenario only: the
question there is whether a quiet machine lost speed. Targets: busy rows, default >= 0.9x the
better of 1 and all threads; quiet rows, this >= before within the spread.

--boost raises the bench's own autogroup (Linux's per-session scheduling group) to nice -20:
on a machine other sessions keep busy, its processes, the workers and the spinner alike, then
get the cores nearly to themselves, which is the closest a shared machine comes to a quiet
one; the spinner competes with the workers as an equal, as another program would.
Results: bench/results/busy-latest.md and .json.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import measure
import run

BENCH = pathlib.Path(__file__).resolve().parent
SPIN = "import os, sys\nif sys.argv[1:]:\n    os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
SETTLE_SECONDS = 0.3  # pause before each timed run, as in bench/run.py
TARGET = 0.9


def worker(model: str, threads: str, new_tokens: int, prompt: int) -> None:
    """The worker's side: load, warm up, then answer `decode` / `prefill` lines with seconds."""
    import numpy as np

    from numpy_gpt2 import GPT2
    from numpy_gpt2.threads import set_threads

    if threads == "1":
        set_threads(1)
    elif threads == "all":
        set_threads(len(os.sched_getaffinity(0)))
    gpt2 = GPT2.from_pretrained(model)
    short = np.arange(8)[None] + 100
    long = (np.arange(prompt)[None] * 7) % 1000

    def decode():
        steps = gpt2.stream(short, new_tokens, eos_token_id=None)
        with measure.quiet_gc():
            next(steps)
            start = time.perf_counter()
            for _ in steps:
                pass
            return time.perf_counter() - start

    def prefill():
        with measure.quiet_gc():
            start = time.perf_counter()
            gpt2(long, logits_to_keep=1)
            return time.perf_counter() - start

    decode()
    prefill()
    print("ready", flush=True)
    for line in sys.stdin:
        print(decode() if line.strip() == "decode" else prefill(), flush=True)


class Worker:
    """A worker process and the pipe to it."""

    def __init__(self, code: pathlib.Path, threads: str, args):
        self.name = f"{'this' if code == BENCH.parent else 'before'} {threads}"
        env = {**os.environ, "PYTHONPATH": str(code)}
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH / "busy.py"), "--worker", args.model, threads, str(args.new), str(args.prompt)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=BENCH)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"worker {self.name} did not start")

    def time(self, what: str) -> float:
        time.sleep(SETTLE_SECONDS)
        self.process.stdin.write(what + "\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def spinner(core):
    """The busy program: a Python spin loop, pinned to `core` unless it is None."""
    return subprocess.Popen([sys.executable, "-c", SPIN, *([] if core is None else [str(core)])])


def checkout(commit: str, into: pathlib.Path) -> pathlib.Path:
    """The tree of `commit` of this repository, written out into `into`."""
    archive = subprocess.run(["git", "archive", commit], cwd=BENCH.parent, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def rates(seconds: list, what: str, args) -> list:
    """Tokens/s of each run: prompt tokens over the prefill, timed steps over the decode."""
    return [(args.prompt if what == "prefill" else args.new - 1) / s for s in seconds]


def summary(samples: list) -> dict:
    return {"median": measure.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def measure_all(args) -> dict:
    """Every scenario's rows: {scenario: {worker name: {what: summary of tokens/s}}}."""
    this = BENCH.parent
    with tempfile.TemporaryDirectory(prefix="busy-before-") as tmp:
        before = checkout(args.before, pathlib.Path(tmp))
        workers = {w.name: w for w in (Worker(code, threads, args) for code, threads in
                                        [(this, "default"), (this, "1"), (this, "all"),
                                         (before, "default"), (before, "1")])}
        results = {}
        try:
            for scenario, core in (("quiet", "none"), ("busy core 1", 1), ("busy unpinned", None)):
                names = [n for n in workers if scenario == "quiet" or n.startswith("this")]
                busy = None if core == "none" else spinner(core)
                samples = {n: {"decode": [], "prefill": []} for n in names}
                try:
                    for r in range(args.rounds):
                        for name in names[r % len(names):] + names[:r % len(names)]:
                            for what in ("decode", "prefill"):
                                samples[name][what].append(workers[name].time(what))
                        print(f"{scenario}: round {r + 1} of {args.rounds}", file=sys.stderr)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                results[scenario] = {n: {w: summary(rates(s, w, args)) for w, s in whats.items()}
                                     for n, whats in samples.items()}
        finally:
            for w in workers.values():
                w.close()
    return results


def verdicts(results: dict) -> list:
    """One line per busy row: default over the better of 1 and all threads, against TARGET."""
    lines = []
    for scenario, rows in results.items():
        for what in ("decode", "prefill"):
            if scenario == "quiet":
                ratio = rows["this default"][what]["median"] / rows["before default"][what]["median"]
                one = rows["this 1"][what]["median"] / rows["before 1"][what]["median"]
                lines.append(f"quiet {what}: this / before = {ratio:.2f}x (default threads), {one:.2f}x (1 thread)")
                continue
            best = max(rows["this 1"][what]["median"], rows["this all"][what]["median"])
            ratio = rows["this default"][what]["median"] / best
            lines.append(f"{scenario} {what}: default / better of 1 and all = {ratio:.2f}x "
                         f"({'PASS' if ratio >= TARGET else 'MISS'}, target >= {TARGET}x)")
    return lines


def table(results: dict, args, machine: str) -> str:
    head = ["scenario", "code, threads", f"decode tok/s ({args.new} new)", f"prefill tok/s ({args.prompt} tokens)"]
    lines = [f"GPT-2 124M shape, random weights; median (min-max) of {args.rounds} rounds; "
             f"before = {args.before}" + ("; --boost" if args.boost else ""), "",
             "| " + " | ".join(head) + " |", "|---|---|---:|---:|"]
    for scenario, rows in results.items():
        for name, whats in rows.items():
            cells = [f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})" for s in (whats["decode"], whats["prefill"])]
            lines.append(f"| {scenario} | {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {v}" for v in verdicts(results)] + ["", machine]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/busy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--before", default=None, help="the commit to compare with (default: merge base with main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=32, help="new tokens per decode")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens of the prefill")
    parser.add_argument("--boost", action="store_true", help="run at autogroup nice -20 (see the docstring)")
    parser.add_argument("--out", type=pathlib.Path, default=BENCH / "results")
    args = parser.parse_args(argv)
    if args.worker:
        model, threads, new, prompt = args.worker
        worker(model, threads, int(new), int(prompt))
        return 0
    if args.boost:
        with open("/proc/self/autogroup", "w") as group:
            group.write("-20")
    if args.before is None:
        args.before = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=BENCH.parent, capture_output=True,
                                     text=True, check=True).stdout.strip()
    args.model = str(run.random_checkpoint(run.CACHE / "gpt2-124m-random"))
    results = measure_all(args)
    import numba

    machine = (f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
               f"numba {numba.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
               f"load average {os.getloadavg()[0]:.1f} at the end")
    text = table(results, args, machine)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "busy-latest.md").write_text(text)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    (args.out / "busy-latest.json").write_text(json.dumps({"settings": settings, "results": results,
                                                           "verdicts": verdicts(results), "machine": machine},
                                                          indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
