"""The server's speed: 8 concurrent clients against one alone, and one client against decoding
in-process, in one run.

    flock /tmp/bench.lock python bench/serve.py [--model M] [--clients 8] [--tokens 64] [--threads N]

The model is bench/run.py's (`find_model`: the real gpt2 where found, else a random checkpoint of
the 124M shape). `numpy-gpt2 serve --max-batch CLIENTS` runs in its own process; each client
streams a greedy completion of `--tokens` new tokens over plain HTTP and times its first token
and its last. Each round measures the three below in turn; reported, the median of `--repeats`
rounds:

- in-process: `GPT2.stream` decoding (bench/engines.py), tokens/s after the first token;
- one client alone: tokens/s after its first token (the same quantity through HTTP), and for
  its whole request (prefill included);
- CLIENTS at once: aggregate tokens/s = all their tokens / the time from the first request
  sent to the last token received; time to first token, median and worst.
Results go to bench/results/serve-latest.{json,md}.
"""

import argparse
import http.client
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engines import NumpyGPT2Engine  # noqa: E402
from measure import cli_command  # noqa: E402
from run import find_model  # noqa: E402

PROMPTS = ["The history of the city begins", "In a small village by the sea there lived",
           "Scientists announced today that", "The recipe calls for", "Once upon a time",
           "The committee met on Tuesday to discuss the", "Her first novel", "According to the report, the"]


def stream_completion(port, prompt, max_tokens) -> dict:
    """One streamed greedy completion -> {start, first, end, tokens} (perf_counter seconds)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]!r}")
    first = tokens = None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    connection.close()
    return {"start": start, "first": first, "end": end, "tokens": tokens}


def concurrent_round(port, clients, max_tokens) -> dict:
    barrier = threading.Barrier(clients)
    results = [None] * clients

    def client(i):
        barrier.wait()
        results[i] = stream_completion(port, PROMPTS[i % len(PROMPTS)], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    ttft = [r["first"] - r["start"] for r in results]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / (end - start),
            "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft)}


def start_server(path, clients, threads) -> tuple:
    """`numpy-gpt2 serve` on a free port, once it answers /health -> (process, port); its stderr
    goes to a temporary file, shown if it does not start."""
    import tempfile

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = cli_command() + ["serve", "--model", str(path), "--port", str(port), "--max-batch", str(clients),
                               "--max-queue", str(2 * clients), "--threads", str(threads)]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stderr=log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    log.seek(0)
    raise RuntimeError(f"the server did not become ready: {log.read()[-2000:].decode(errors='replace')}")


def _status(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "MISS"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results")
    args = parser.parse_args(argv)
    path, kind = find_model(args.model)

    from numpy_gpt2.tokenizer import Tokenizer

    ids = np.array([Tokenizer.default().encode(PROMPTS[0])])
    process, port = start_server(path, args.clients, args.threads)
    try:
        # The in-process engine loads beside the idle server, and each round measures the three
        # in turn, so that the memory bandwidth's drift over minutes touches all of them alike.
        engine = NumpyGPT2Engine(path, args.threads)
        engine.decode(ids, 4)  # warm-up
        stream_completion(port, PROMPTS[0], 4)
        concurrent_round(port, args.clients, 4)
        in_process, alone, together = [], [], []
        for _ in range(args.repeats):
            in_process.append((args.tokens - 1) / engine.decode(ids, args.tokens)[0])
            alone.append(stream_completion(port, PROMPTS[0], args.tokens))
            together.append(concurrent_round(port, args.clients, args.tokens))
        del engine
    finally:
        process.terminate()
        process.wait(60)
    in_process = statistics.median(in_process)

    def med(values):
        return statistics.median(values)

    one_decode = med((r["tokens"] - 1) / (r["end"] - r["first"]) for r in alone)
    one_whole = med(r["tokens"] / (r["end"] - r["start"]) for r in alone)
    aggregate = med(r["tokens_per_s"] for r in together)
    results = {
        "model": str(path), "kind": kind, "clients": args.clients, "tokens": args.tokens, "threads": args.threads,
        "in_process_decode_tokens_per_s": in_process, "one_client_decode_tokens_per_s": one_decode,
        "one_client_whole_tokens_per_s": one_whole, "aggregate_tokens_per_s": aggregate,
        "aggregate_over_one_client": aggregate / one_whole,
        "one_client_over_in_process": one_decode / in_process,
        "ttft_median_s": med(r["ttft_median_s"] for r in together),
        "ttft_max_s": med(r["ttft_max_s"] for r in together),
        "alone": alone, "together": together,
    }
    table = "\n".join([
        f"# numpy-gpt2 serve: {args.clients} clients x {args.tokens} new tokens ({kind}, {args.threads} threads)",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| in-process decoding (GPT2.stream) | {in_process:.1f} tokens/s | |",
        f"| one client, after its first token | {one_decode:.1f} tokens/s "
        f"({one_decode / in_process:.2f}x in-process) | >= 0.90x {_status(one_decode / in_process, 0.9)} |",
        f"| one client, whole request | {one_whole:.1f} tokens/s | |",
        f"| {args.clients} clients, aggregate | {aggregate:.1f} tokens/s "
        f"({aggregate / one_whole:.2f}x one client) | >= 2.5x {_status(aggregate / one_whole, 2.5)} |",
        f"| time to first token under that load | median {results['ttft_median_s']:.2f} s, "
        f"worst {results['ttft_max_s']:.2f} s | |",
    ])
    print(table)
    from numpy_gpt2.fileio import atomic_write_bytes

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "serve-latest.json", (json.dumps(results, indent=1) + "\n").encode())
    atomic_write_bytes(args.out / "serve-latest.md", (table + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
