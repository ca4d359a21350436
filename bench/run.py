"""The benchmark: numpy-gpt2 against Hugging Face transformers on torch and a naive NumPy GPT-2.

    python bench/run.py                       # the full run on the GPT-2 124M shape
    python bench/run.py --quick               # a smoke run with small sizes
    python bench/run.py --threads 1 --repeats 5 --engines numpy,torch

Every engine runs in this one process, on the same prompts, the engines taking turns within
each repeat so that a slow moment of the machine is shared out rather than landing on one
engine; the median of the repeats is reported. Cold start and peak memory need a fresh
process and run the command line in a subprocess. The table goes to stdout and to
`bench/results/latest.md`, every raw timing to `bench/results/latest.json` (both tracked) and
to `bench/results/<UTC time>.json` (git-ignored, so a machine keeps its own history of runs).
See bench/README.md.
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import sys
import time

import measure  # standard library only: safe to import before the thread settings below

BENCH = pathlib.Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
# Every token of this prompt is below 1000, so it also runs on the tests' tiny vocabulary.
PROMPT = "I am a man and"
ENGINE_ORDER = ("numpy", "torch", "naive")

# Targets for numpy-gpt2 / torch on the GPT-2 124M shape, by case key (issue 4).
RATIO_TARGETS = {
    "prefill_512_last": 1.0,
    "prefill_512_all": 1.3,
    "decode_b1_p8": 2.3,
    "decode_b1_p512": 2.0,
    "decode_b8_p8": 1.5,
}
COLD_START_TARGET_S = 2.0
RSS_TARGET_RATIO = 1.25  # peak RSS over the size of the weight file
SETTLE_SECONDS = 0.3  # pause before each timed run (see run_case)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes one run measures."""

    prefill: tuple          # prompt lengths for prefill
    short_prompt: int       # batch-1 decode after this many tokens ...
    long_prompt: int        # ... and after this many
    new_tokens: int         # tokens generated per batch-1 decode
    batch: int              # rows of the batched decode, each a short prompt
    batch_new_tokens: int
    naive_new_tokens: int   # the naive engine's decode, short prompt only: it recomputes all
    rss_new_tokens: int     # tokens of the generate run whose peak memory is measured


FULL = Sizes(prefill=(64, 256, 512, 1024), short_prompt=8, long_prompt=512, new_tokens=128,
             batch=8, batch_new_tokens=64, naive_new_tokens=16, rss_new_tokens=32)
QUICK = Sizes(prefill=(16, 32), short_prompt=8, long_prompt=24, new_tokens=8,
              batch=8, batch_new_tokens=4, naive_new_tokens=4, rss_new_tokens=4)


@dataclasses.dataclass(frozen=True)
class Case:
    """One in-process measurement; every engine gets the same prompts `ids` [batch, prompt]."""

    key: str
    label: str
    kind: str               # "prefill" or "decode"
    batch: int
    prompt: int
    new_tokens: int = 0
    keep_last: bool = False
    naive_new_tokens: int | None = None  # decode: None leaves the naive engine out

    def tokens_per_second(self, seconds, new_tokens=None) -> float:
        """Prefill: prompt tokens over the forward; decode: the timed steps (all but the first)."""
        if self.kind == "prefill":
            return self.batch * self.prompt / seconds
        return self.batch * ((new_tokens or self.new_tokens) - 1) / seconds


def cases_for(sizes: Sizes, n_positions: int) -> tuple:
    """The cases of a run, and notes on those that do not fit the model's context."""
    cases = []
    for T in sizes.prefill:
        cases.append(Case(f"prefill_{T}_last", f"prefill {T} tokens, last logits", "prefill", 1, T, keep_last=True))
        cases.append(Case(f"prefill_{T}_all", f"prefill {T} tokens, all logits", "prefill", 1, T))
    for T in (sizes.short_prompt, sizes.long_prompt):
        cases.append(Case(f"decode_b1_p{T}", f"decode batch 1, {T}-token prompt, {sizes.new_tokens} new",
                          "decode", 1, T, sizes.new_tokens,
                          naive_new_tokens=sizes.naive_new_tokens if T == sizes.short_prompt else None))
    B, T = sizes.batch, sizes.short_prompt
    cases.append(Case(f"decode_b{B}_p{T}", f"decode batch {B}, {T}-token prompts, {sizes.batch_new_tokens} new each",
                      "decode", B, T, sizes.batch_new_tokens))
    fits = [c for c in cases if c.prompt + max(c.new_tokens, 1) - 1 <= n_positions]
    notes = [f"{c.key} skipped: {c.prompt} + {c.new_tokens} tokens exceed n_positions={n_positions}"
             for c in cases if c not in fits]
    return fits, notes


# ---- the model to measure -----------------------------------------------------------------

def random_checkpoint(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A GPT-2 124M-shaped checkpoint of random weights in `directory`, made once and reused.

    The official hub layout (no prefix, the 12 `h.{i}.attn.bias` mask buffers), so the file
    has the official size (548 MB) for the memory ratio. Weights N(0, 0.02), layernorm gains 1,
    biases 0: what GPT-2's initialisation gives, enough for timing, which does not depend on
    the values.
    """
    import numpy as np

    from numpy_gpt2.config import GPT2Config
    from numpy_gpt2.weights import expected_shapes, safetensors_file

    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    print(f"making a random GPT-2 124M checkpoint in {directory} (once)", file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    config = GPT2Config()
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if ".ln_" in name or name.startswith("ln_f."):
            tensors[name] = (np.ones if name.endswith(".weight") else np.zeros)(shape, np.float32)
        elif name.endswith(".bias"):
            tensors[name] = np.zeros(shape, np.float32)
        else:
            tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    P = config.n_positions
    mask = np.tril(np.ones((P, P), np.float32))[None, None]
    for i in range(config.n_layer):
        tensors[f"h.{i}.attn.bias"] = mask
    safetensors_file.write_arrays(directory / "model.safetensors", tensors, metadata={"format": "pt"})
    config.save_json(directory / "config.json")  # written last: its presence marks a whole checkpoint
    return directory


def find_model(given) -> tuple:
    """(path, kind): `--model` as given, else the real gpt2 where the package finds it, else
    the cached random checkpoint."""
    from numpy_gpt2.errors import ModelNotFoundError
    from numpy_gpt2.weights.resolve import resolve_model

    if given:
        return resolve_model(given), "given"
    try:
        return resolve_model("gpt2"), "real gpt2"
    except ModelNotFoundError:
        return str(random_checkpoint(CACHE / "gpt2-124m-random")), "random weights"


def weight_file_bytes(path) -> int:
    """The size of the file holding the weights (the .safetensors, or the TF data shards)."""
    path = pathlib.Path(path)
    if path.is_file():
        return path.stat().st_size
    if (path / "model.safetensors").is_file():
        return (path / "model.safetensors").stat().st_size
    return sum(p.stat().st_size for p in path.glob("model.ckpt.data-*"))


# ---- running the cases ---------------------------------------------------------------------

def load_engines(names, path, threads) -> tuple:
    """name -> engine for each engine that loads; notes for those that do not."""
    import engines

    loaded, notes = {}, []
    for name in names:
        try:
            loaded[name] = engines.ENGINES[name](path, threads)
        except ImportError as exc:
            notes.append(f"{name} column skipped: {exc}")
        except Exception as exc:  # a checkpoint one engine cannot read (say transformers on TF files)
            notes.append(f"{name} column skipped: {type(exc).__name__}: {exc}")
    return loaded, notes


def run_case(case: Case, engines: dict, repeats: int, ids) -> dict:
    """Warm each engine up on the case, then `repeats` rounds with the engines taking turns."""
    # name -> tokens it decodes (None for a prefill); the naive engine sits out most decodes.
    active = {}
    for name in engines:
        if case.kind == "prefill":
            active[name] = None
        elif name != "naive":
            active[name] = case.new_tokens
        elif case.naive_new_tokens is not None:
            active[name] = case.naive_new_tokens

    def once(name):
        engine, n_new = engines[name], active[name]
        # The previous engine's idle workers (OpenBLAS's, torch's and Numba's OpenMP threads)
        # spin for a while after their last task, taking a core from whoever runs next; let
        # them go to sleep first, so neither engine is timed against the other's leftovers.
        time.sleep(SETTLE_SECONDS)
        if case.kind == "prefill":
            return engine.prefill(ids, case.keep_last), None
        return engine.decode(ids, n_new)

    for name in active:
        # The first calls on a new shape pay one-off costs (Numba loading its cache; torch is
        # several times slower on its first two calls of a shape); a few decode steps are
        # enough to pay them.
        if case.kind == "prefill":
            once(name)
            once(name)
        else:
            engines[name].decode(ids, min(active[name], 4))
    samples = {name: [] for name in active}
    tokens = {}
    names = list(active)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, out = once(name)
            samples[name].append(seconds)
            tokens[name] = out
    result = {}
    for name, seconds in samples.items():
        rates = [case.tokens_per_second(s, active[name]) for s in seconds]
        entry = {"seconds": seconds, "tokens_per_s": rates, "median": measure.median(rates), "best": max(rates)}
        if case.kind == "decode":
            entry["new_tokens"] = active[name]
            if name != "numpy" and "numpy" in tokens:
                n = active[name]
                entry["same_tokens_as_numpy"] = bool((tokens[name] == tokens["numpy"][:, :n]).all())
        result[name] = entry
    return result


def process_measurements(path, sizes: Sizes, engines: dict, repeats: int, threads: int) -> tuple:
    """Cold start, first compile and peak memory, each a fresh process; -> (results, notes)."""
    from engines import torch_generate_command
    from numpy_gpt2 import Tokenizer

    env = dict(os.environ)
    generate = [*measure.cli_command(), "generate", PROMPT, "--model", str(path), "--greedy", "--no-stream"]
    out, notes = {}, []
    if "numpy" in engines:
        first_token = [*generate, "--max-new-tokens", "1"]
        measure.run_seconds(first_token, env)  # makes sure the Numba cache is warm
        warm = [measure.run_seconds(first_token, env) for _ in range(repeats)]
        out["cold_start"] = {"seconds": warm, "median": measure.median(warm), "command": first_token}
        # Two tokens, so that the decode kernels compile too, not only the prompt's.
        two_tokens = [*generate, "--max-new-tokens", "2"]
        warm_two = measure.median([measure.run_seconds(two_tokens, env) for _ in range(repeats)])
        seconds, written = measure.first_compile_seconds(two_tokens, env)
        out["first_compile"] = {"seconds_with_empty_cache": seconds, "numba_cache_files_written": written,
                                "median": seconds - warm_two, "command": two_tokens}
        if not written:
            notes.append("NUMBA_CACHE_DIR was not used: the first-compile time measured no compilation")
    rss = {}
    if "numpy" in engines:
        rss["numpy"] = [*generate, "--no-eos", "--max-new-tokens", str(sizes.rss_new_tokens)]
    if "torch" in engines:
        ids = Tokenizer.from_pretrained(path).encode(PROMPT)
        rss["torch"] = torch_generate_command(path, ids, sizes.rss_new_tokens, threads)
    if rss:
        out["peak_rss"] = {"weight_file_bytes": weight_file_bytes(path), "new_tokens": sizes.rss_new_tokens}
    for name, command in rss.items():
        samples = [measure.peak_rss_bytes(command, env) for _ in range(repeats)]
        out["peak_rss"][name] = {"bytes": samples, "median": measure.median(samples), "command": command}
    return out, notes


# ---- reporting -----------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    """What the numbers depend on: CPU, cores, BLAS, library versions, threads."""
    import numba
    import numpy as np

    from numpy_gpt2.threads import blas_kernels

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    versions = {"python": platform.python_version()}
    for package in ("numpy", "numba", "torch", "transformers", "safetensors", "tiktoken"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process
        layer = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "blas": {**{k: blas.get(k) for k in ("name", "version", "openblas configuration")},
                 "kernels": blas_kernels()},  # as numpy_gpt2 chose them (threads.choose_blas_kernels)
        "versions": versions,
        "threads": threads,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": layer,
    }


def _rate(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _mib(n):
    return f"{n / 2**20:,.0f} MiB"


def _shown_path(path) -> str:
    """A path inside the checkout relative to it, so the committed table names no home directory."""
    try:
        return str(pathlib.Path(path).resolve().relative_to(BENCH.parent))
    except ValueError:
        return str(path)


def markdown_table(results: dict) -> str:
    """The results as a markdown table: medians, the ratio to torch, targets."""
    engines = [e for e in ENGINE_ORDER if e in results["engines"]]
    head = ["measurement", *(results["engines"][e]["label"] for e in engines), "numpy-gpt2 / torch", "target", ""]
    rows = []
    footnotes = []
    for case in results["cases"]:
        cells = [case["label"]]
        for e in engines:
            entry = case["engines"].get(e)
            if entry is None:
                cells.append("n/a")
            elif case["kind"] == "decode" and entry["new_tokens"] != case["new_tokens"]:
                cells.append(f"{_rate(entry['median'])} ({entry['new_tokens']} new)")
            else:
                cells.append(_rate(entry["median"]))
        ratio, target = case.get("ratio_to_torch"), case.get("target")
        cells.append(_ratio(ratio, target) if ratio is not None else "–")
        cells.append(f"≥ {target:g}x" if target is not None else "")
        cells.append(case.get("status") or "")
        rows.append(cells)
    proc = results.get("process", {})
    blank = [""] * len(engines)
    if "cold_start" in proc:
        s = proc["cold_start"]["median"]
        row = ["CLI cold start to first token (s)", *blank, "", f"< {COLD_START_TARGET_S:g} s",
               proc["cold_start"].get("status", "")]
        row[1 + engines.index("numpy")] = f"{s:.2f}"
        rows.append(row)
    if "first_compile" in proc:
        row = ["first-ever Numba compile (s, extra)", *blank, "", "", ""]
        row[1 + engines.index("numpy")] = f"{proc['first_compile']['median']:.1f}"
        rows.append(row)
    if "peak_rss" in proc:
        rss = proc["peak_rss"]
        size = rss["weight_file_bytes"]
        row = [f"peak RSS, generate {rss['new_tokens']} tokens", *blank, "",
               f"≤ {RSS_TARGET_RATIO:g}x file ({_mib(RSS_TARGET_RATIO * size)})", rss.get("status", "")]
        for i, e in enumerate(engines):
            if e in rss:
                row[1 + i] = f"{_mib(rss[e]['median'])} ({rss[e]['median'] / size:.2f}x file)"
        rows.append(row)
    if any(c["kind"] == "decode" and c["engines"].get("naive", {}).get("new_tokens") not in (None, c["new_tokens"])
           for c in results["cases"]):
        footnotes.append("naive NumPy recomputes the whole sequence per token, so it decodes fewer tokens "
                         "and only after the short prompt; n/a: not run.")
    s, model = results["settings"], results["model"]
    lines = [
        f"GPT-2 of {model['parameters'] / 1e6:.3g}M parameters ({model['n_layer']} layers, n_embd "
        f"{model['n_embd']}), {model['kind']} ({_shown_path(model['path'])}); "
        f"{s['threads']} threads; median of {s['repeats']}; tokens/s unless noted"
        + ("; QUICK smoke run" if s["quick"] else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(engines) + 1) + ["---", "---"]) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    notes = footnotes + results["notes"]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    bounds = results.get("bounds", {})
    if bounds:
        lines += ["", "What bounds these rows, measured in this run (bench/bound.py):"]
        lines += [f"- {bound_note(case, bounds[case['key']])}" for case in results["cases"] if case["key"] in bounds]
    lines += ["", machine_line(results)]
    return "\n".join(lines) + "\n"


def machine_line(results: dict) -> str:
    """The line under a table that says what it ran on: CPU, cores, BLAS, threading, date, load."""
    m = results["machine"]
    kernels = f" ({m['blas']['kernels']} kernels)" if m["blas"].get("kernels") else ""
    return (f"{m['cpu']}, {m['cores_available']} cores, {m['blas']['name']} {m['blas']['version']}{kernels}, "
            f"numba threading layer {m['numba_threading_layer']}, {results['date']}; "
            "load average {:.1f} at start, {:.1f} at end".format(
                results["load_average"]["start"][0], results["load_average"]["end"][0]))


def _status(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def judge(results: dict) -> None:
    """Add the ratios (to torch, to the weight file) and, on a full run, PASS or MISS."""
    # The targets are for the full sizes; a quick run's shapes are too small to judge.
    full = not results["settings"]["quick"]
    for case in results["cases"]:
        measured = case["engines"]
        if "numpy" in measured and "torch" in measured:
            case["ratio_to_torch"] = measured["numpy"]["median"] / measured["torch"]["median"]
            if full and case["key"] in RATIO_TARGETS:
                case["target"] = RATIO_TARGETS[case["key"]]
                case["status"] = _status(case["ratio_to_torch"] >= case["target"])
    process = results.get("process", {})
    if "cold_start" in process:
        cold = process["cold_start"]
        cold["target_s"] = COLD_START_TARGET_S
        if full:
            cold["status"] = _status(cold["median"] < COLD_START_TARGET_S)
    rss = process.get("peak_rss", {})
    for name in ("numpy", "torch"):
        if name in rss:
            rss[name]["ratio_to_weight_file"] = rss[name]["median"] / rss["weight_file_bytes"]
    if "numpy" in rss:
        rss["target_ratio"] = RSS_TARGET_RATIO
        if full:
            rss["status"] = _status(rss["numpy"]["ratio_to_weight_file"] <= RSS_TARGET_RATIO)


def measure_bounds(results: dict, engines: dict, vocab_size: int, every: bool) -> dict:
    """What bounds each case that missed its target (every case with `every`), by case key.

    Measured now, on numpy-gpt2's loaded model: see bench/bound.py.
    """
    import numpy as np

    import bound

    model = engines["numpy"].model
    rng = np.random.default_rng(1)
    out = {}
    for case in results["cases"]:
        if not (every or case.get("status") == "MISS"):
            continue
        torch_rate = case["engines"].get("torch", {}).get("median")
        if case["kind"] == "prefill":
            ids = rng.integers(0, vocab_size, size=(case["batch"], case["prompt"]))
            torch_seconds = case["batch"] * case["prompt"] / torch_rate if torch_rate else None
            out[case["key"]] = bound.prefill_bound(model, ids, case["keep_last"], torch_seconds)
        else:
            ids = rng.integers(0, vocab_size, size=(case["batch"], case["prompt"]))
            out[case["key"]] = bound.decode_bound(model, ids, torch_rate)
        print(f"bound of {case['label']} measured", file=sys.stderr)
    return out


def _ratio(ratio: float, target: float | None) -> str:
    """The ratio to two decimals, or to three where two would round a miss up to its target."""
    digits = 3 if target is not None and ratio < target <= round(ratio, 2) else 2
    return f"{ratio:.{digits}f}x"


def bound_note(case: dict, bound: dict) -> str:
    """One line: how far the row is from its target and what its measured bound allows."""
    head = case["label"]
    if case.get("ratio_to_torch") is not None:
        head += f": {_ratio(case['ratio_to_torch'], case.get('target'))} torch"
        if case.get("target") is not None:
            head += f" against a target of {case['target']:g}x"
    ceiling = bound.get("ratio_ceiling")
    if case["kind"] == "prefill":
        p = {part: f"{seconds * 1e3:.0f}" for part, seconds in bound["profile_seconds"].items()}
        alone = {part: f"{seconds * 1e3:.0f}" for part, seconds in bound["dense_products_alone_seconds_by_part"].items()}
        text = (f"{head}. One forward of numpy-gpt2, profiled: {p['total']} ms = block products "
                f"{p['block products']} (their bias and GELU included; the products alone {alone['block products']}) "
                f"+ head {p['head']} (alone {alone['head']}) + attention {p['attention']} + layernorms "
                f"{p['layernorms']} + the rest {p['rest']}. Its {bound['dense_products']} dense products, "
                f"{bound['dense_product_flops'] / 1e9:.0f} GFLOP, take "
                f"{bound['dense_products_alone_seconds'] * 1e3:.0f} ms on their own "
                f"({bound['dense_products_alone_flops_per_s'] / 1e9:.0f} GFLOP/s, each the faster of numpy-gpt2's "
                "path and one BLAS call)")
        if ceiling is not None:
            text += (f"; torch's {bound['torch_seconds'] * 1e3:.0f} ms over that is {ceiling:.2f}x, the most "
                     "any engine on this BLAS could reach with nothing else to do")
    else:
        text = (f"{head}. Timed in turn after the case, a step of numpy-gpt2 took "
                f"{bound['step_seconds'] * 1e3:.1f} ms and its products alone, every weight read once "
                f"({bound['weight_bytes_per_step'] / 1e6:.0f} MB), "
                f"{bound['products_alone_seconds_per_step'] * 1e3:.1f} ms "
                f"({bound['bytes_per_s'] / 1e9:.0f} GB/s): at most {bound['tokens_per_s_ceiling']:.0f} tokens/s")
        if ceiling is not None:
            text += f", {ceiling:.2f}x torch's {bound['torch_tokens_per_s']:.1f}"
    return text + "."


def write_results(results: dict, out_dir: pathlib.Path, table: str) -> pathlib.Path:
    """`<UTC time>.json`, `latest.json` and `latest.md` in `out_dir`, each written atomically
    (a temporary file, then a rename), so a run cut short leaves the last results whole."""
    from numpy_gpt2.fileio import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(results, indent=1) + "\n").encode("utf-8")
    stamped = out_dir / f"{results['stamp']}.json"
    atomic_write_bytes(stamped, data)
    atomic_write_bytes(out_dir / "latest.json", data)
    atomic_write_bytes(out_dir / "latest.md", table.encode("utf-8"))
    return stamped


# ---- the command -------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for every engine (default: all available cores)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per engine and case; the median is reported (default 5, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run with small sizes")
    parser.add_argument("--engines", default=",".join(ENGINE_ORDER),
                        help=f"comma-separated, of {', '.join(ENGINE_ORDER)} (default: all)")
    parser.add_argument("--model", default=None,
                        help="a checkpoint directory or name (default: gpt2 if found, else a random "
                             "124M-shaped checkpoint made once in bench/.cache/)")
    parser.add_argument("--out", type=pathlib.Path, default=BENCH / "results",
                        help="where the JSON and markdown results go (default: bench/results)")
    parser.add_argument("--cases", default=None,
                        help="run only the cases whose key starts with one of these comma-separated "
                             "prefixes (prefill, prefill_512, decode_b1, ...; keys in the JSON)")
    parser.add_argument("--bounds", action="store_true",
                        help="measure what bounds every case, not only those that miss their target")
    parser.add_argument("--no-process", action="store_true",
                        help="leave out the subprocess measurements (cold start, compile, memory)")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINE_ORDER]
    if unknown or not args.engines:
        parser.error(f"--engines: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(ENGINE_ORDER)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _import_torch_first():
    """Load torch before Numba starts its OpenMP thread pool.

    Both use a library named libgomp.so.1: Numba's "omp" threading layer the system's, torch
    its own copy. When Numba's pool starts first, the system's is loaded and the dynamic
    linker gives torch that one instead of its own, on which torch decodes about 1.7x slower
    (measured here: 65 ms a step against 38 ms). Loaded first, torch keeps its copy and Numba
    still gets the system's. A torch user never has Numba loaded, so torch goes first;
    numpy-gpt2's speed is the same either way (also measured).
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        pass  # load_engines reports the missing column


def set_up_threads(threads: int, torch: bool = True) -> None:
    """Before NumPy or torch is imported: every library's thread count (BLAS and OpenMP read
    theirs once, when they load; subprocesses inherit them), torch loaded first when it is to
    be measured (`_import_torch_first`), and the BLAS kernels that fit this CPU chosen as the
    command line chooses them."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)
    if torch:
        _import_torch_first()
    from numpy_gpt2 import choose_blas_kernels

    choose_blas_kernels()


def main(argv=None) -> int:
    args = parse_args(argv)
    set_up_threads(args.threads, torch="torch" in args.engines)
    from numpy_gpt2.errors import GPT2Error

    try:
        return _run(args)
    except (GPT2Error, OSError, RuntimeError) as exc:  # RuntimeError: a subprocess that failed
        print(f"bench/run.py: error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    import numpy as np

    from numpy_gpt2.weights import expected_shapes, load_checkpoint

    path, kind = find_model(args.model)
    config = load_checkpoint(path).config  # only the header is read: the tensors are memory-mapped
    sizes = QUICK if args.quick else FULL
    engines, notes = load_engines(args.engines, path, args.threads)
    if not engines:
        print("no engine could be loaded: " + "; ".join(notes), file=sys.stderr)
        return 1
    cases, skipped = cases_for(sizes, config.n_positions)
    if args.cases:
        prefixes = tuple(p.strip() for p in args.cases.split(",") if p.strip())
        cases = [c for c in cases if c.key.startswith(prefixes)]
    notes += skipped
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {
        "stamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "date": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "settings": {"threads": args.threads, "repeats": args.repeats, "quick": args.quick,
                     "engines": args.engines, "sizes": dataclasses.asdict(sizes)},
        "model": {"path": str(path), "kind": kind, "weight_file_bytes": weight_file_bytes(path),
                  "parameters": sum(math.prod(shape) for shape in expected_shapes(config).values()),
                  "n_layer": config.n_layer, "n_embd": config.n_embd},
        "engines": {name: {"label": e.label, "class": type(e).__name__} for name, e in engines.items()},
        # The machine may be shared: a high load average explains a noisy run.
        "load_average": {"start": os.getloadavg()},
        "notes": notes,
        "cases": [],
    }
    if "torch" in engines:
        results["engines"]["torch"]["attn_implementation"] = engines["torch"].attn_implementation

    rng = np.random.default_rng(0)
    for case in cases:
        ids = rng.integers(0, config.vocab_size, size=(case.batch, case.prompt))
        measured = run_case(case, engines, args.repeats, ids)
        results["cases"].append({**dataclasses.asdict(case), "unit": "tokens/s", "engines": measured})
        summary = ", ".join(f"{n} {_rate(m['median'])}" for n, m in measured.items())
        print(f"{case.label}: {summary} tokens/s", file=sys.stderr)
        for name, m in measured.items():
            if m.get("same_tokens_as_numpy") is False:
                notes.append(f"{case.key}: {name} chose other greedy tokens than numpy-gpt2 "
                             "(near-ties under rounding; the timing is unaffected)")

    if not args.no_process:
        print("cold start, first compile, peak memory (subprocesses)", file=sys.stderr)
        process, more_notes = process_measurements(path, sizes, engines, args.repeats, args.threads)
        notes += more_notes
        results["process"] = process

    judge(results)
    if "numpy" in engines:
        bounds = measure_bounds(results, engines, config.vocab_size, args.bounds)
        if bounds:
            results["bounds"] = bounds
    results["load_average"]["end"] = os.getloadavg()
    # After the runs: the Numba threading layer is only known once a parallel kernel has run.
    results["machine"] = machine_info(args.threads)
    table = markdown_table(results)
    stamped = write_results(results, args.out, table)
    print(table)
    print(f"results: {stamped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
