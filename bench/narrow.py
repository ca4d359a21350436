"""Narrow weights against float32 (issue 20): numpy-gpt2 with float32, bfloat16, float16 and int8 weights,
and torch's float32, side by side in one run on the GPT-2 124M shape.

    python bench/narrow.py              # the full run, a few minutes
    python bench/narrow.py --quick      # a smoke run with small sizes, no PASS/MISS

Rows (numpy-gpt2 with each `--weights`, from the same float32 checkpoint that bench/run.py
uses; torch in float32), timed as bench/run.py times them (`run.run_case`: warm-up, engines in
turn, rotating order, a pause before each, median of the repeats):
- decode batch 1 after an 8-token prompt: tokens/s of the steps after the first new token;
- prefill 512, last logits, and all logits: prompt tokens/s;
- peak RSS of `numpy-gpt2 generate --weights W` (32 tokens), each in a fresh process.
Targets, against numpy-gpt2's own float32 in the same run: decode bfloat16 and float16 >= 1.7x,
int8 >= 2.5x; prefill >= 0.9x; peak RSS bfloat16 and float16 <= 0.6x, int8 <= 0.4x.

What bounds decoding, measured in the same run for every weights kind: every matrix of a step
(the blocks' four and the tied head) streamed once through the kernel a step uses
(`kernels.decode.rows_matmul`): the bytes a step reads, the bytes a second that gives, and the
tokens a second it allows; and the kernel's arithmetic rate with one 2304 x 768 matrix held in
cache, which caps tokens a second at that rate over the step's 124 M multiply-adds.

Writes bench/results/narrow-latest.md and narrow-latest.json (atomically), and prints the table.
"""

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import measure
import run

WEIGHTS = ("float32", "bfloat16", "float16", "int8")
NARROW = WEIGHTS[1:]
DECODE_TARGETS = {"bfloat16": 1.7, "float16": 1.7, "int8": 2.5}
PREFILL_TARGET = 0.9
RSS_TARGETS = {"bfloat16": 0.6, "float16": 0.6, "int8": 0.4}


def narrow_engine(path, threads, weights):
    """bench/engines.py's numpy-gpt2 engine, its model loaded with `weights`."""
    import engines
    from numpy_gpt2 import GPT2

    engine = engines.NumpyGPT2Engine(path, threads)  # float32, and the threads set
    if weights != "float32":
        engine.model = None  # the float32 copy goes before the narrow one is made
        engine.model = GPT2.from_pretrained(path, weights=weights)
    engine.label = f"numpy-gpt2 {weights}"
    return engine


def stream_bound(model, repeats: int) -> dict:
    """Every matrix of a decoding step through `rows_matmul` once, as a step reads them: bytes,
    seconds (median of `repeats`), bytes/s and the tokens/s that allows."""
    import numpy as np

    from numpy_gpt2.kernels.decode import rows_matmul, stored_rows

    weights = [stored_rows(lin.weight) for b in model.h
               for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    weights.append(stored_rows(model.wte) if model.weights != "float32" else model.wte)
    shape = [(w[0] if isinstance(w, tuple) else w).shape for w in weights]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, k)).astype(np.float32) for _, k in shape]
    outs = [np.empty((1, n), np.float32) for n, _ in shape]

    def products():
        for x, w, out in zip(xs, weights, outs):
            rows_matmul(x, w, out)

    products()
    seconds = []
    with measure.quiet_gc():
        for _ in range(repeats):
            start = time.perf_counter()
            products()
            seconds.append(time.perf_counter() - start)
    nbytes = sum(sum(a.nbytes for a in w) if isinstance(w, tuple) else w.nbytes for w in weights)
    alone = measure.median(seconds)
    return {"bytes_per_step": nbytes, "seconds": alone, "bytes_per_s": nbytes / alone,
            "tokens_per_s_ceiling": 1 / alone, "macs_per_step": sum(n * k for n, k in shape)}


def compute_bound(weights: str, macs_per_step: int, repeats: int) -> dict:
    """The kernel's multiply-adds a second with one 2304 x 768 matrix in cache (about 3.5 MB of
    float32, less narrow: it fits the L3), and the tokens/s that caps."""
    import numpy as np

    from numpy_gpt2.kernels import narrow
    from numpy_gpt2.kernels.decode import rows_matmul

    rows = np.random.default_rng(1).standard_normal((2304, 768)).astype(np.float32) * np.float32(0.02)
    stored = rows if weights == "float32" else narrow.narrow_matrix(rows, weights).stored
    x, out = np.ones((1, 768), np.float32), np.empty((1, 2304), np.float32)
    for _ in range(3):
        rows_matmul(x, stored, out)
    best = float("inf")
    for _ in range(repeats * 20):
        start = time.perf_counter()
        rows_matmul(x, stored, out)
        best = min(best, time.perf_counter() - start)
    rate = rows.size / best
    return {"macs_per_s": rate, "tokens_per_s_ceiling": rate / macs_per_step}


def peak_rss(path, weights: str, new_tokens: int, repeats: int) -> dict:
    command = [*measure.cli_command(), "generate", run.PROMPT, "--model", str(path), "--greedy", "--no-stream",
               "--no-eos", "--max-new-tokens", str(new_tokens), "--weights", weights]
    samples = [measure.peak_rss_bytes(command) for _ in range(repeats)]
    return {"bytes": samples, "median": measure.median(samples), "command": command}


def fixed_part(results: dict) -> list[str]:
    """Lines that split a decoding step's time into what the bytes cost and what they do not.

    The matrices' times streamed alone, over the three formats, fitted (least squares) as a fixed
    part plus bytes / bandwidth; the rest of the step (attention, layer norms, the sampling, the
    loop) is the decode row's step time less the matrices'. Both fixed parts are the same in every
    format (the rest a little less for narrow weights), so they cap the ratio to float32 below the
    ratio of the bytes.
    """
    import numpy as np

    bounds = results["bounds"]
    decode = next((c for c in results["cases"] if c["kind"] == "decode"), None)
    if decode is None:
        return []
    nbytes = np.array([bounds[w]["bytes_per_step"] for w in WEIGHTS], float)
    seconds = np.array([bounds[w]["seconds"] for w in WEIGHTS])
    per_byte, fixed = np.polyfit(nbytes, seconds, 1)
    rest = {w: 1 / decode["engines"][w]["median"] - bounds[w]["seconds"] for w in WEIGHTS}
    drifted = [w for w in WEIGHTS if rest[w] < 0]
    if drifted or fixed < 0:
        return [f"No split of the decode step in this run: {', '.join(drifted) or 'the fit'} "
                + ("streamed its matrices alone slower than it decoded whole steps" if drifted else "came out negative")
                + " (the memory bandwidth moved between the measurements)."]
    step = {w: fixed + rest[w] + bounds[w]["bytes_per_step"] * per_byte for w in WEIGHTS}
    caps = {w: step["float32"] / step[w] for w in NARROW}
    return [
        f"What bounds the decode ratios: the matrices' times above fit {fixed * 1e3:.1f} ms a step plus their bytes at "
        f"{1 / per_byte / 1e9:.1f} GB/s (the fixed part: what each product costs whatever its bytes, a "
        "parallel loop and a stream started and ended, four a block and the head); the rest of the step (attention, layer norms, "
        "sampling, the loop) took " + ", ".join(f"{w} {rest[w] * 1e3:.1f} ms" for w in WEIGHTS) + ". Fewer bytes "
        "shorten only the bytes' part: fixed + rest + bytes / bandwidth gives " + ", ".join(
            f"{w} {caps[w]:.2f}x" for w in caps) + " of float32's tokens/s (the bytes alone would give " + ", ".join(
            f"{w} {nbytes[0] / bounds[w]['bytes_per_step']:.2f}x" for w in caps) + ")."]


def table(results: dict) -> str:
    head = ["measurement", *(f"numpy-gpt2 {w}" for w in WEIGHTS), "torch float32",
            *(f"{w} / float32" for w in NARROW), "targets", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 3) + ["---", "---"]) + "|"]
    for case in results["cases"]:
        e = case["engines"]
        torch = run._rate(e["torch"]["median"]) if "torch" in e else "n/a"
        torch_ratio = f" (torch {e['torch']['median'] / e['float32']['median']:.2f}x)" if "torch" in e else ""
        cells = [case["label"] + torch_ratio, *(run._rate(e[w]["median"]) for w in WEIGHTS), torch,
                 *(f"{case['ratios'][w]:.2f}x" for w in NARROW),
                 " / ".join(f"≥ {t:g}x" for t in case["targets"].values()), case.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    if "peak_rss" in results:
        rss = results["peak_rss"]
        cells = [f"peak RSS, generate {results['sizes']['rss_new_tokens']} tokens",
                 *(run._mib(rss[w]["median"]) for w in WEIGHTS), "",
                 *(f"{rss['ratios'][w]:.2f}x" for w in NARROW),
                 " / ".join(f"≤ {t:g}x" for t in RSS_TARGETS.values()), rss.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    s = results["settings"]
    top = (f"GPT-2 124M shape, {results['model_kind']}; {s['threads']} threads; median of {s['repeats']}; "
           "tokens/s unless noted; ratios to numpy-gpt2 float32 in this run" + ("; QUICK smoke run" if s["quick"] else ""))
    lines = [top, ""] + lines + ["", "What bounds decoding (one token, every matrix of a step through its kernel):", ""]
    lines += ["| weights | bytes a step | streamed alone | GB/s | tokens/s allowed by the stream | "
              "kernel in cache, GMAC/s | tokens/s allowed by arithmetic |", "|---|---:|---:|---:|---:|---:|---:|"]
    for w in WEIGHTS:
        b = results["bounds"][w]
        lines.append(f"| {w} | {b['bytes_per_step'] / 1e6:.0f} MB | {b['seconds'] * 1e3:.1f} ms | "
                     f"{b['bytes_per_s'] / 1e9:.1f} | {run._rate(b['tokens_per_s_ceiling'])} | "
                     f"{b['compute']['macs_per_s'] / 1e9:.1f} | {run._rate(b['compute']['tokens_per_s_ceiling'])} |")
    lines += ["", *fixed_part(results)]
    if "peak_rss" in results:
        # The process around the weights (Python, NumPy, Numba, the tokenizer, buffers) is the
        # same whatever the weights: float32's peak less its matrices.
        rest = results["peak_rss"]["float32"]["median"] - results["bounds"]["float32"]["bytes_per_step"]
        floors = {w: (rest + results["bounds"][w]["bytes_per_step"]) / results["peak_rss"]["float32"]["median"]
                  for w in NARROW}
        lines += ["", f"What bounds peak RSS: float32's process less its matrices is {run._mib(rest)}; with the "
                  "narrow matrices' bytes added that floor is " + ", ".join(f"{w} {r:.2f}x" for w, r in floors.items())
                  + " of float32's peak."]
    lines += ["", *(f"- {n}" for n in results["notes"])] if results["notes"] else []
    lines += ["", run.machine_line(results)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/narrow.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=None, help="default 5, 1 with --quick")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torch", action="store_true", help="leave out torch's column")
    parser.add_argument("--out", type=pathlib.Path, default=run.BENCH / "results")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if not args.no_torch:
        run._import_torch_first()
    import numpy as np

    import engines as bench_engines
    from numpy_gpt2 import choose_blas_kernels

    choose_blas_kernels()
    path, kind = run.find_model(None)
    sizes = run.QUICK if args.quick else run.FULL
    loaded = {w: narrow_engine(path, args.threads, w) for w in WEIGHTS}
    notes = []
    if not args.no_torch:
        try:
            loaded["torch"] = bench_engines.TorchEngine(path, args.threads)
        except ImportError as exc:
            notes.append(f"torch column skipped: {exc}")
    long_prompt = 512 if 512 in sizes.prefill else max(sizes.prefill)
    cases = [run.Case("decode_b1_p8", f"decode batch 1, 8-token prompt, {sizes.new_tokens} new", "decode", 1, 8,
                      sizes.new_tokens),
             run.Case(f"prefill_{long_prompt}_last", f"prefill {long_prompt}, last logits", "prefill", 1,
                      long_prompt, keep_last=True),
             run.Case(f"prefill_{long_prompt}_all", f"prefill {long_prompt}, all logits", "prefill", 1, long_prompt)]
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {"date": started.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
               "settings": {"threads": args.threads, "repeats": repeats, "quick": args.quick},
               "sizes": {"rss_new_tokens": sizes.rss_new_tokens}, "model_kind": f"{kind} ({run._shown_path(path)})",
               "load_average": {"start": os.getloadavg()}, "notes": notes, "cases": []}
    rng = np.random.default_rng(0)
    for case in cases:
        ids = rng.integers(0, 50257, size=(case.batch, case.prompt))
        measured = run.run_case(case, loaded, repeats, ids)
        ratios = {w: measured[w]["median"] / measured["float32"]["median"] for w in NARROW}
        targets = DECODE_TARGETS if case.kind == "decode" else {w: PREFILL_TARGET for w in NARROW}
        entry = {"key": case.key, "label": case.label, "kind": case.kind, "engines": measured, "ratios": ratios,
                 "targets": targets}
        if not args.quick:
            entry["status"] = run._status(all(ratios[w] >= targets[w] for w in ratios))
        results["cases"].append(entry)
        print(f"{case.label}: " + ", ".join(f"{n} {run._rate(m['median'])}" for n, m in measured.items()),
              file=sys.stderr)
    results["bounds"] = {}
    for w in WEIGHTS:
        bound = stream_bound(loaded[w].model, repeats)
        bound["compute"] = compute_bound(w, bound["macs_per_step"], repeats)
        results["bounds"][w] = bound
    del loaded  # the subprocesses' memory is measured with this process's freed
    if not args.quick:
        rss = {w: peak_rss(path, w, sizes.rss_new_tokens, repeats) for w in WEIGHTS}
        rss["ratios"] = {w: rss[w]["median"] / rss["float32"]["median"] for w in NARROW}
        rss["status"] = run._status(all(rss["ratios"][w] <= RSS_TARGETS[w] for w in RSS_TARGETS))
        results["peak_rss"] = rss
    results["load_average"]["end"] = os.getloadavg()
    results["machine"] = run.machine_info(args.threads)
    text = table(results)
    from numpy_gpt2.fileio import atomic_write_bytes

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / "narrow-latest.json", json.dumps(results, indent=1, default=float).encode())
    atomic_write_bytes(args.out / "narrow-latest.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
