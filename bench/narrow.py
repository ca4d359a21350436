"""Narrow weights against float32 (issue 20): numpy-gpt2 with float32, bfloat16, float16 and int8 weights,
and torch's float32, side by side in one run on the GPT-2 124M shape.

    python bench/narrow.py              # the full run, a few minutes
    python bench/narrow.py --quick      # a smoke run with small sizes, no PASS/MISS

Rows (numpy-gpt2 with each `--weights`, from the same float32 checkpoint that bench/run.py
uses; torch in float32):
- decode batch 1 after an 8-token prompt: tokens/s of the steps after the first new token.
  The four formats decode side by side, SLICE steps each in turn, rotating, until each has made
  its tokens (`interleaved_decode`): the memory bandwidth this host gives moves by tens of
  percent within seconds, and slices of a fraction of a second see nearly the same bandwidth,
  where whole decodes one after another did not (a format's ratio moved by 15% from run to run).
  Each ratio is the median over the rounds of float32's time over the format's. torch decodes
  as bench/run.py times it (`run.run_case`), beside float32, for its ratio;
- prefill 512, last logits, and all logits: prompt tokens/s, timed as bench/run.py times them
  (`run.run_case`: warm-up, engines in turn, rotating order, a pause before each, median);
- peak RSS of `numpy-gpt2 generate --weights W` (32 tokens), each in a fresh process.
Targets, against numpy-gpt2's own float32 in the same run: decode bfloat16 and float16 >= 1.7x,
int8 >= 2.5x; prefill >= 0.9x; peak RSS bfloat16 and float16 <= 0.6x, int8 <= 0.4x.

What bounds decoding, measured in the same run for every weights kind: every matrix of a step
(the blocks' four and the tied head) streamed once through the kernel a step uses
(`kernels.decode.rows_matmul`), after each slice of the decode row: the bytes a step reads, the
bytes a second that gives, the tokens a second it allows, and the rest of the step (its time
less the matrices'); and the kernel's arithmetic rate with one 2304 x 768 matrix held in cache,
which caps tokens a second at that rate over the step's 124 M multiply-adds. For each narrow
format whose decode row misses, a line splits its step and float32's that way.
Peak RSS: the process around the weights (float32's peak less its matrices), and what each
phase of a generate adds to the resident memory (Python, NumPy, Numba and LLVM, the package,
the tokenizer, the weights, the generate with its compiled loops).

Writes bench/results/narrow-latest.md and narrow-latest.json (atomically), and prints the table.
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

import measure
import run

WEIGHTS = ("float32", "bfloat16", "float16", "int8")
NARROW = WEIGHTS[1:]
DECODE_TARGETS = {"bfloat16": 1.7, "float16": 1.7, "int8": 2.5}
PREFILL_TARGET = 0.9
RSS_TARGETS = {"bfloat16": 0.6, "float16": 0.6, "int8": 0.4}
SLICE = 16  # decoding steps a format makes before the next format's turn


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


class StepMatrices:
    """Every matrix of a model's decoding step, as `kernels.decode.rows_matmul` reads it, and one
    row of x for each: `run()` streams them all through their kernel once, as a step does."""

    def __init__(self, model, rng):
        import numpy as np

        from numpy_gpt2.kernels.decode import rows_matmul, stored_rows

        self.rows_matmul = rows_matmul
        self.weights = [stored_rows(lin.weight) for b in model.h
                        for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        self.weights.append(stored_rows(model.wte) if model.weights != "float32" else model.wte)
        shape = [(m[0] if isinstance(m, tuple) else m).shape for m in self.weights]
        self.xs = [rng.standard_normal((1, k)).astype(np.float32) for _, k in shape]
        self.outs = [np.empty((1, n), np.float32) for n, _ in shape]
        self.nbytes = sum(sum(a.nbytes for a in m) if isinstance(m, tuple) else m.nbytes for m in self.weights)
        self.macs = sum(n * k for n, k in shape)

    def run(self) -> float:
        """Seconds to stream them once."""
        start = time.perf_counter()
        for x, m, out in zip(self.xs, self.weights, self.outs):
            self.rows_matmul(x, m, out)
        return time.perf_counter() - start


def interleaved_decode(loaded: dict, ids, new_tokens: int, repeats: int) -> tuple:
    """Decode `new_tokens` + 1 tokens after `ids` with every numpy-gpt2 format, SLICE steps each
    in turn (the order rotating every slice), timing the steps after the first new token; after
    each slice, every format's step matrices streamed alone once (`StepMatrices`), in turn too.
    -> (run.run_case's entries per format, with "ratios": each narrow format's median over the
    rounds of float32's seconds over its own, and each format's tokens of the last round; and
    the bounds per format: the matrices' bytes,
    their median time alone, and "rest_seconds": the median over the rounds of a step's time
    less its matrices' time alone in that round)."""
    import numpy as np

    for w in WEIGHTS:
        loaded[w].decode(ids, 4)  # Numba's loops loaded, the buffers made
    matrices = {w: StepMatrices(loaded[w].model, np.random.default_rng(0)) for w in WEIGHTS}
    for m in matrices.values():
        m.run()
    seconds = {w: [] for w in WEIGHTS}
    alone = {w: [] for w in WEIGHTS}
    for _ in range(repeats):
        streams = {w: loaded[w].model.stream(ids, new_tokens + 1, eos_token_id=None) for w in WEIGHTS}
        made = {w: [next(streams[w])] for w in WEIGHTS}  # the prompt's pass and first token, untimed
        spent, streamed = dict.fromkeys(WEIGHTS, 0.0), {w: [] for w in WEIGHTS}
        order = list(WEIGHTS)
        with measure.quiet_gc():
            for done in range(0, new_tokens, SLICE):
                for w in order:
                    start = time.perf_counter()
                    for _ in range(min(SLICE, new_tokens - done)):
                        made[w].append(next(streams[w]))
                    spent[w] += time.perf_counter() - start
                for w in order:
                    streamed[w].append(matrices[w].run())
                order = order[1:] + order[:1]
        for w in WEIGHTS:
            seconds[w].append(spent[w])
            alone[w].append(sum(streamed[w]) / len(streamed[w]))
    result = {}
    for w in WEIGHTS:
        rates = [ids.shape[0] * new_tokens / s for s in seconds[w]]
        result[w] = {"seconds": seconds[w], "tokens_per_s": rates, "median": measure.median(rates),
                     "best": max(rates), "new_tokens": new_tokens + 1, "slice_steps": SLICE,
                     "tokens": np.stack(made[w], axis=1).tolist()}
    result["ratios"] = {w: measure.median([f / n for f, n in zip(seconds["float32"], seconds[w])]) for w in NARROW}
    bounds = {}
    for w, m in matrices.items():
        streamed = measure.median(alone[w])
        bounds[w] = {"bytes_per_step": m.nbytes, "seconds": streamed, "seconds_per_round": alone[w],
                     "bytes_per_s": m.nbytes / streamed, "tokens_per_s_ceiling": 1 / streamed,
                     "macs_per_step": m.macs,
                     "rest_seconds": measure.median([s / new_tokens - a for s, a in zip(seconds[w], alone[w])])}
    return result, bounds


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


# The process around the weights, phase by phase, as `numpy-gpt2 generate` goes through them:
# resident memory (VmRSS) after each, printed as JSON.
_RSS_PHASES = """
import json, sys
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
phases = {"python": rss()}
import numpy
phases["numpy"] = rss()
import numba
phases["numba and LLVM"] = rss()
import numpy_gpt2.kernels
from numpy_gpt2 import GPT2, Tokenizer
phases["numpy_gpt2"] = rss()
ids = Tokenizer.default().encode(sys.argv[3])
phases["tokenizer"] = rss()
model = GPT2.from_pretrained(sys.argv[1], weights=sys.argv[2])
phases["weights loaded"] = rss()
model.generate(numpy.array(ids), max_new_tokens=int(sys.argv[4]), do_sample=False)
phases["generated"] = rss()
print(json.dumps(phases))
"""


def rss_phases(path, weights: str, new_tokens: int) -> dict:
    """Resident memory after each phase of a generate with `weights`, in a fresh process:
    phase -> bytes (see _RSS_PHASES)."""
    done = subprocess.run([sys.executable, "-c", _RSS_PHASES, str(path), weights, run.PROMPT, str(new_tokens)],
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def peak_rss(path, weights: str, new_tokens: int, repeats: int) -> dict:
    command = [*measure.cli_command(), "generate", run.PROMPT, "--model", str(path), "--greedy", "--no-stream",
               "--no-eos", "--max-new-tokens", str(new_tokens), "--weights", weights]
    samples = [measure.peak_rss_bytes(command) for _ in range(repeats)]
    return {"bytes": samples, "median": measure.median(samples), "command": command}


def decode_bounds(results: dict) -> list[str]:
    """Lines that say, for each narrow format whose decode row misses, what its step is made of.

    Each round of the decode row also streamed every format's matrices alone after each slice
    (`interleaved_decode`), so a step splits into its matrices alone and the rest (attention,
    layer norms, sampling, the loop) under the same bandwidth: step = alone + rest.
    """
    bounds = results["bounds"]
    decode = next((c for c in results["cases"] if c["kind"] == "decode"), None)
    if decode is None or "rest_seconds" not in bounds["float32"]:
        return []
    f32 = bounds["float32"]
    lines = []
    for w in NARROW:
        ratio, target = decode["ratios"][w], decode["targets"][w]
        if ratio >= target:
            continue
        b = bounds[w]
        at_f32_rate = b["bytes_per_step"] / f32["bytes_per_s"] + b["rest_seconds"]
        in_cache = b["macs_per_step"] / b["compute"]["macs_per_s"]
        lines.append(
            f"- {w} decodes at {ratio:.2f}x, short of {target:g}x: a step is its matrices streamed alone, "
            f"{b['seconds'] * 1e3:.1f} ms ({b['bytes_per_s'] / 1e9:.1f} GB/s), plus {b['rest_seconds'] * 1e3:.1f} ms of "
            f"the rest; float32's is {f32['seconds'] * 1e3:.1f} ms ({f32['bytes_per_s'] / 1e9:.1f} GB/s) plus "
            f"{f32['rest_seconds'] * 1e3:.1f} ms. Its bytes are {f32['bytes_per_step'] / b['bytes_per_step']:.2f}x fewer, "
            f"but they stream at {b['bytes_per_s'] / f32['bytes_per_s']:.2f} of float32's rate: reading and "
            f"multiplying its weights takes {in_cache * 1e3:.1f} ms a step even from cache, and overlaps only in part "
            f"with the waiting for memory. At float32's rate its step would be {at_f32_rate * 1e3:.1f} ms, "
            f"{(f32['seconds'] + f32['rest_seconds']) / at_f32_rate:.2f}x.")
    if lines:
        lines.insert(0, "What bounds the decode rows that miss (each split measured in the same rounds as the row):")
    return lines


def table(results: dict) -> str:
    head = ["measurement", *(f"numpy-gpt2 {w}" for w in WEIGHTS), "torch float32",
            *(f"{w} / float32" for w in NARROW), "targets", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 3) + ["---", "---"]) + "|"]
    for case in results["cases"]:
        e = case["engines"]
        torch = run._rate(e["torch"]["median"]) if "torch" in e else "n/a"
        beside = e["torch"].get("float32_beside", e["float32"]) if "torch" in e else None
        torch_ratio = f" (torch {e['torch']['median'] / beside['median']:.2f}x)" if "torch" in e else ""
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
    lines = [top, ""] + lines + ["", "What bounds decoding (one token: every matrix of a step through its kernel, in the decode row's rounds; the rest of the step: its time less that):", ""]
    lines += ["| weights | bytes a step | streamed alone | GB/s | tokens/s allowed by the stream | rest of the step | "
              "kernel in cache, GMAC/s | tokens/s allowed by arithmetic |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for w in WEIGHTS:
        b = results["bounds"][w]
        rest = f"{b['rest_seconds'] * 1e3:.1f} ms" if "rest_seconds" in b else ""
        lines.append(f"| {w} | {b['bytes_per_step'] / 1e6:.0f} MB | {b['seconds'] * 1e3:.1f} ms | "
                     f"{b['bytes_per_s'] / 1e9:.1f} | {run._rate(b['tokens_per_s_ceiling'])} | {rest} | "
                     f"{b['compute']['macs_per_s'] / 1e9:.1f} | {run._rate(b['compute']['tokens_per_s_ceiling'])} |")
    lines += ["", *decode_bounds(results)]
    if "peak_rss" in results:
        # The process around the weights (Python, NumPy, Numba, the tokenizer, buffers) is the
        # same whatever the weights: float32's peak less its matrices.
        rest = results["peak_rss"]["float32"]["median"] - results["bounds"]["float32"]["bytes_per_step"]
        floors = {w: (rest + results["bounds"][w]["bytes_per_step"]) / results["peak_rss"]["float32"]["median"]
                  for w in NARROW}
        lines += ["", f"What bounds peak RSS: float32's process less its matrices is {run._mib(rest)}; with "
                  "the narrow matrices' bytes added that floor is " + ", ".join(f"{w} {r:.2f}x" for w, r in floors.items())
                  + " of float32's peak."]
        phases = results["peak_rss"].get("phases")
        if phases:
            lines += ["", "Resident memory as a generate goes (each phase's growth; a fresh process each):", "",
                      "| phase | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
            names = list(next(iter(phases.values())))
            for i, name in enumerate(names):
                cells = [run._mib(p[name] - (p[names[i - 1]] if i else 0)) for p in phases.values()]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("| total | " + " | ".join(run._mib(p[names[-1]]) for p in phases.values()) + " |")
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
    cases = [run.Case("decode_b1_p8", f"decode batch 1, 8-token prompt, {sizes.new_tokens} new, formats in turn every "
                      f"{SLICE} steps", "decode", 1, 8,
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
        if case.kind == "decode":
            measured, results["bounds"] = interleaved_decode(loaded, ids, case.new_tokens - 1, repeats)
            ratios = measured.pop("ratios")
            if "torch" in loaded:
                beside = run.run_case(case, {w: loaded[w] for w in ("float32", "torch")}, repeats, ids)
                measured["torch"] = beside["torch"]
                measured["torch"]["float32_beside"] = beside["float32"]
        else:
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
    time.sleep(run.SETTLE_SECONDS)  # torch's threads, which ran last, asleep first
    for w in WEIGHTS:
        results["bounds"][w]["compute"] = compute_bound(w, results["bounds"][w]["macs_per_step"], repeats)
    del loaded  # the subprocesses' memory is measured with this process's freed
    if not args.quick:
        rss = {w: peak_rss(path, w, sizes.rss_new_tokens, repeats) for w in WEIGHTS}
        rss["ratios"] = {w: rss[w]["median"] / rss["float32"]["median"] for w in NARROW}
        rss["status"] = run._status(all(rss["ratios"][w] <= RSS_TARGETS[w] for w in RSS_TARGETS))
        rss["phases"] = {w: rss_phases(path, w, sizes.rss_new_tokens) for w in ("float32", "int8")}
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
