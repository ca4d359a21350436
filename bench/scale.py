"""Scale-out: two single-threaded Dask workers against one single-threaded process, scoring a corpus.

    flock /tmp/bench.lock python bench/scale.py      # GPT-2 124M shape, 30,000 tokens, about 3 minutes on 2 cores
    python bench/scale.py --quick                    # a tiny model and corpus, a smoke run, no PASS/MISS
    python bench/scale.py --workers 4 --tokens 40000 --out /tmp/results

Both sides score the same JSON Lines corpus (random text, documents of 64-512 tokens) in the same
partitions with `score.score_partition`, one thread each, in float32: first one process (this
one: load the model, score a warm-up corpus, then the corpus), then a local Dask cluster of
`--workers` single-threaded processes on 127.0.0.1 (`cluster.score_on_dask`: start the cluster,
score the warm-up corpus, which loads the model in every worker, then the corpus). The row is
the corpus's scored tokens per second on each side; the target (issue 18) is >= 1.8x for two
workers on a 2-core machine. Start-up is timed apart and shown under the table, with the whole
run's ratio. The two sides' output files must be the same bytes, or the row is a MISS.
The table goes to stdout and to `scale-latest.md`, every time to `scale-latest.json`.
"""

import argparse
import datetime
import json
import os
import pathlib
import random
import sys
import tempfile
import time

import run  # standard library only at import
import train

TARGET = 1.8  # two single-threaded workers against one single-threaded process
PARTITION_SIZE = 2  # documents per task: small enough that the last task does not leave a worker idle for long
DOC_TOKENS = (64, 512)
WARMUP_PARTITIONS = 6  # one-document partitions, so that every worker loads its Numba cache before the timing


def make_corpus(directory: pathlib.Path, n_tokens: int, doc_tokens=DOC_TOKENS, n_files: int = 2,
                seed: int = 0) -> list[str]:
    """JSON Lines files under `directory` of random-text documents of `doc_tokens` (a range)
    tokens each, about `n_tokens` in all.

    Each text is the decoding of random token ids, so it re-encodes to about that many tokens.
    """
    from numpy_gpt2.tokenizer import Tokenizer

    tokenizer = Tokenizer.default()
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / f"corpus-{i}.jsonl" for i in range(n_files)]
    handles = [open(path, "w", encoding="utf-8") for path in files]
    try:
        total, i = 0, 0
        while total < n_tokens:
            length = rng.randint(*doc_tokens)
            text = tokenizer.decode([rng.randrange(50000) for _ in range(length)])
            handles[i % n_files].write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
            total, i = total + length, i + 1
    finally:
        for handle in handles:
            handle.close()
    return [str(path) for path in files]


def scored_tokens(out: pathlib.Path) -> int:
    """The positions scored in the output files of `out` (the rows' "tokens")."""
    return sum(json.loads(line)["tokens"] or 0 for path in sorted(out.glob("part-*.jsonl"))
               for line in path.read_text().splitlines())


def single_process(model: str, jobs, out: pathlib.Path) -> dict:
    """One single-threaded process (this one): {"seconds": of loading, then of each job, a
    (name, paths, ScoreOptions), scored into out / name; "cpu_seconds": of the last job}."""
    from numpy_gpt2.model import GPT2
    from numpy_gpt2.score import plan_partitions, score_partition
    from numpy_gpt2.threads import set_threads
    from numpy_gpt2.tokenizer import Tokenizer

    set_threads(1)
    times = {}
    start = time.perf_counter()
    gpt2, tokenizer = GPT2.from_pretrained(model), Tokenizer.from_pretrained(model)
    times["load"] = time.perf_counter() - start
    for name, paths, options in jobs:
        (out / name).mkdir(parents=True)
        start, cpu = time.perf_counter(), time.process_time()
        for partition in plan_partitions(paths, options):
            score_partition(gpt2, tokenizer, partition, out / name, options)
        times[name], cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": times, "cpu_seconds": cpu}


def on_dask(workers: int, model: str, jobs, out: pathlib.Path) -> dict:
    """A local cluster of `workers` single-threaded processes: {"seconds": of starting it, then
    of each job as in `single_process` (the first loads the model in every worker);
    "cpu_seconds": of the workers' processes during the last job}."""
    import distributed

    from numpy_gpt2.cluster import local_cluster, score_on_dask

    times = {}
    start = time.perf_counter()
    with local_cluster(workers) as local, distributed.Client(local) as client:
        times["start"] = time.perf_counter() - start
        for name, paths, options in jobs:
            start, cpu = time.perf_counter(), client.run(time.process_time)
            score_on_dask(paths, out / name, local.scheduler_address, model, options, progress=name == "score")
            times[name], cpu = time.perf_counter() - start, {w: t - cpu[w] for w, t in client.run(time.process_time).items()}
    return {"seconds": times, "cpu_seconds": sum(cpu.values())}


def same_files(a: pathlib.Path, b: pathlib.Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def markdown_table(results: dict) -> str:
    s, one, many = results["settings"], results["single"], results["dask"]
    label = f"{s['workers']} Dask workers against 1 process, {results['tokens']:,} tokens (tokens/s)"
    status = results.get("status", "")
    lines = [
        f"Scoring a corpus (`score_partition`, float32, {s['partition_size']} documents of {DOC_TOKENS[0]}-"
        f"{DOC_TOKENS[1]} tokens per partition), one thread per process; {results['model']}"
        + ("; QUICK smoke run" if s["quick"] else ""),
        "",
        "| row | 1 process | Dask workers | ratio | target | PASS/MISS |",
        "|---|---:|---:|---:|---|---|",
        f"| {label} | {run._rate(one['tokens_per_s'])} | {run._rate(many['tokens_per_s'])} | "
        f"{run._ratio(results['ratio'], TARGET)} | {f'≥ {TARGET:g}x' if status else ''} | {status} |",
        "",
        f"- Start-up, not in the row: the process loads the model in {one['seconds']['load']:.1f} s and scores the "
        f"warm-up corpus in {one['seconds']['warmup']:.1f} s; the cluster starts in {many['seconds']['start']:.1f} s "
        f"and scores the warm-up corpus (registering the model, which each worker loads) in "
        f"{many['seconds']['warmup']:.1f} s.",
        f"- The whole run, start-up included: {sum(one['seconds'].values()):.1f} s against "
        f"{sum(many['seconds'].values()):.1f} s, {results['ratio_with_startup']:.2f}x.",
        f"- CPU time while scoring the corpus: the process {one['cpu_seconds']:.1f} s ({one['cores_used']:.2f} cores "
        f"on average, {run._rate(one['tokens_per_cpu_s'])} tokens per CPU second), the workers "
        f"{many['cpu_seconds']:.1f} s ({many['cores_used']:.2f} cores, {run._rate(many['tokens_per_cpu_s'])} tokens "
        f"per CPU second). The ratio reaches {s['workers']}x only where the machine gives the workers "
        f"{s['workers']} cores: under Linux's autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled) "
        "the CPU is shared between sessions, and the workers, of this session, get one session's share "
        "while other sessions are busy (the load average below).",
        f"- Output files of the two sides: {'the same bytes' if results['same_output'] else 'DIFFERENT, so the row is a MISS'}.",
        "",
        run.machine_line(results),
    ]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: pathlib.Path, table: str) -> None:
    """scale-latest.json and scale-latest.md in `out_dir`, each written atomically."""
    from numpy_gpt2.fileio import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "scale-latest.json", (json.dumps(results, indent=1) + "\n").encode("utf-8"))
    atomic_write_bytes(out_dir / "scale-latest.md", table.encode("utf-8"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes, one thread each (default 2)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens in the corpus (default 30,000; 1,000 with --quick)")
    parser.add_argument("--model", default=None,
                        help="a checkpoint (default: GPT-2 124M where found, else its shape with random weights; "
                             "with --quick a tiny 2-layer model)")
    parser.add_argument("--quick", action="store_true", help="a smoke run on a tiny model, no PASS/MISS")
    parser.add_argument("--out", type=pathlib.Path, default=run.BENCH / "results",
                        help="where scale-latest.json and scale-latest.md go (default: bench/results)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.tokens is None:
        args.tokens = 1000 if args.quick else 30000
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from numpy_gpt2.errors import GPT2Error
    from numpy_gpt2.threads import choose_blas_kernels

    choose_blas_kernels()  # as the command line does, and as the workers do
    try:
        return _run(args)
    except (GPT2Error, OSError) as exc:
        print(f"bench/scale.py: error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from numpy_gpt2.score import ScoreOptions

    if args.model is not None or not args.quick:
        model, kind = run.find_model(args.model)
        kind = f"{kind} ({run._shown_path(model)})"
    else:
        model, kind = train.model_path("tiny")
    options = ScoreOptions(partition_size=PARTITION_SIZE, stride=None)  # None: 512, or half the context if less
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "settings": {"workers": args.workers, "tokens": args.tokens, "quick": args.quick,
                     "partition_size": PARTITION_SIZE, "doc_tokens": DOC_TOKENS, "dtype": options.dtype},
        "model": f"model: {kind}",
        "load_average": {"start": os.getloadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="numpy-gpt2-scale-") as tmp:
        tmp = pathlib.Path(tmp)
        jobs = [("warmup", make_corpus(tmp / "warmup", WARMUP_PARTITIONS * DOC_TOKENS[0],
                                           (DOC_TOKENS[0],) * 2, seed=1),
                 ScoreOptions(partition_size=1, stride=None)),
                ("score", make_corpus(tmp / "corpus", args.tokens), options)]
        print("one process: scoring", file=sys.stderr)
        sides = {"single": single_process(model, jobs, tmp / "single")}
        print(f"{args.workers} Dask workers: scoring", file=sys.stderr)
        sides["dask"] = on_dask(args.workers, model, jobs, tmp / "dask")
        tokens = scored_tokens(tmp / "single" / "score")
        results["tokens"] = tokens
        for side in sides.values():
            side["tokens_per_s"] = tokens / side["seconds"]["score"]
            side["tokens_per_cpu_s"] = tokens / side["cpu_seconds"]
            side["cores_used"] = side["cpu_seconds"] / side["seconds"]["score"]
        results.update(sides)
        results["same_output"] = same_files(tmp / "single" / "score", tmp / "dask" / "score") and \
            scored_tokens(tmp / "dask" / "score") == tokens
    results["ratio"] = results["dask"]["tokens_per_s"] / results["single"]["tokens_per_s"]
    results["ratio_with_startup"] = sum(results["single"]["seconds"].values()) / sum(results["dask"]["seconds"].values())
    if not args.quick:
        results["status"] = run._status(results["ratio"] >= TARGET and results["same_output"])
    results["load_average"]["end"] = os.getloadavg()
    results["machine"] = run.machine_info(1)
    table = markdown_table(results)
    write_results(results, args.out, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
