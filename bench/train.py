"""Training speed: numpy-gpt2 against transformers + torch.optim.AdamW, one step at a time.

    python bench/train.py                 # the full run: GPT-2 124M and a small GPT-2
    python bench/train.py --quick         # a smoke run on a 2-layer model, no PASS/MISS
    python bench/train.py --threads 1 --repeats 5 --out /tmp/results

One step is what a training loop does per batch: forward, backward, clipping by global norm,
AdamW, in float32, on the same threads for both engines (issue 16, "Speed and memory"). Both
engines load the same checkpoint and train on the same batch, and their first-step losses are
compared to show it. The engines take turns within each round, as in bench/run.py; the median
step is reported, peak memory comes from a fresh process per engine, and what bounds each
speed row (its matrix products alone) is measured in the same run. The table goes to stdout and to
`train-latest.md`, every raw time to `train-latest.json`. See bench/README.md.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import measure  # standard library only, as is importing run: both safe before the thread settings
import run

LR = 1e-4
WEIGHT_DECAY = 0.1  # on 2-D parameters only, nanoGPT's grouping
BETAS = (0.9, 0.95)  # nanoGPT's for GPT-2
MAX_NORM = 1.0
WARMUP_STEPS = 2
RSS_STEPS = 3
LOSS_RTOL = 1e-4  # float32 losses of the same model on the same batch
PRODUCT_REPEATS = 3
ENGINE_ORDER = ("numpy", "torch")
LABELS = {"numpy": "numpy-gpt2", "torch": "torch"}

SMALL = {"n_layer": 4, "n_head": 4, "n_embd": 192, "n_positions": 256, "vocab_size": 50257}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 50257}


@dataclasses.dataclass(frozen=True)
class Case:
    """Training steps of batch x seq tokens on one model; target: numpy-gpt2 / torch tokens/s."""

    key: str
    label: str
    model: str              # "gpt2" (find_model's 124M), or a key of MODELS
    batch: int
    seq: int
    target: float | None = None
    measure_bound: bool = False  # measure what bounds this row


MODELS = {"small": SMALL, "tiny": TINY}

FULL_CASES = (Case("gpt2_b4_t64", "GPT-2 124M, batch 4 x 64", "gpt2", 4, 64, 2.5, measure_bound=True),
              Case("small_b8_t256", "small GPT-2 (4 layers, 4 heads, 192 wide), batch 8 x 256", "small", 8, 256, 2.0,
                   measure_bound=True))
FULL_RSS = Case("rss_gpt2_b4_t128", f"peak RSS, GPT-2 124M fine-tune, batch 4 x 128, {RSS_STEPS} steps",
                "gpt2", 4, 128, 1.0)
QUICK_CASES = (Case("tiny_b2_t16", "tiny GPT-2 (2 layers), batch 2 x 16", "tiny", 2, 16, measure_bound=True),
               Case("tiny_b4_t32", "tiny GPT-2 (2 layers), batch 4 x 32", "tiny", 4, 32))
QUICK_RSS = Case("rss_tiny_b2_t32", f"peak RSS, tiny GPT-2, batch 2 x 32, {RSS_STEPS} steps", "tiny", 2, 32)


# ---- the models ----------------------------------------------------------------------------

def init_checkpoint(name: str, fields: dict, seed: int = 0) -> pathlib.Path:
    """bench/.cache/<name>/: a hub-layout checkpoint (config.json + model.safetensors) of the
    config `fields` with GPT-2's initialisation (`numpy_gpt2.train.init_parameters`), made once.

    Written in a temporary directory renamed into place, so that two runs at once, or a run cut
    short, never leave half a checkpoint behind.
    """
    from numpy_gpt2.config import GPT2Config
    from numpy_gpt2.train import init_parameters
    from numpy_gpt2.weights import safetensors_file

    directory = run.CACHE / name
    if (directory / "config.json").is_file():
        return directory
    run.CACHE.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(**fields)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=run.CACHE))
    safetensors_file.write_arrays(staging / "model.safetensors", init_parameters(config, seed),
                                  metadata={"format": "pt"})
    config.save_json(staging / "config.json")
    try:
        os.rename(staging, directory)
    except OSError:  # another run put it there first
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def model_path(model: str) -> tuple:
    """(path, what it holds and where) of a case's model."""
    if model == "gpt2":
        path, kind = run.find_model(None)
    else:
        path, kind = str(init_checkpoint(f"gpt2-{model}-init", MODELS[model])), "GPT-2's init"
    return path, f"{kind} ({run._shown_path(path)})"


# ---- the engines ---------------------------------------------------------------------------

class NumpyTrainer:
    """numpy-gpt2: `loss_and_grads` (its gradients reused step to step), `clip_grad_norm`, AdamW."""

    def __init__(self, path, threads):
        from numpy_gpt2 import GPT2
        from numpy_gpt2.optim import AdamW
        from numpy_gpt2.threads import set_threads

        set_threads(threads)  # the BLAS, Numba's pool and numpy-gpt2's parts
        self.model = GPT2.from_pretrained(path)
        self.opt = AdamW(self.model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
        self.grads = None

    def step(self, ids) -> tuple:
        """One training step on ids [B, T] -> (seconds, loss before the update)."""
        from numpy_gpt2.optim import clip_grad_norm

        with measure.quiet_gc():
            start = time.perf_counter()
            loss, self.grads = self.model.loss_and_grads(ids, grads=self.grads)
            clip_grad_norm(self.grads, MAX_NORM)
            self.opt.step(self.grads)
            return time.perf_counter() - start, float(loss)


class TorchTrainer:
    """transformers' GPT2LMHeadModel in train mode, dropout off (numpy-gpt2 has none), sdpa
    attention, no KV cache; autograd, `clip_grad_norm_`, torch.optim.AdamW in nanoGPT's two
    groups (decay on dim >= 2)."""

    def __init__(self, path, threads):
        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        self.model = transformers.GPT2LMHeadModel.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in self.params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in self.params if p.dim() < 2], "weight_decay": 0.0}]
        # fused: torch's fastest AdamW on a CPU (the default loops over the tensors one by one)
        self.opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)

    def step(self, ids) -> tuple:
        """One training step on ids [B, T] -> (seconds, loss before the update)."""
        torch = self.torch
        ids = torch.from_numpy(ids)
        with measure.quiet_gc():
            start = time.perf_counter()
            loss = self.model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return time.perf_counter() - start, loss.item()


TRAINERS = {"numpy": NumpyTrainer, "torch": TorchTrainer}


def batch_ids(batch: int, seq: int, vocab_size: int):
    """The batch every step of a case trains on: [B, T] int64, the same for both engines."""
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab_size, size=(batch, seq))


# ---- measuring -----------------------------------------------------------------------------

def run_case(case: Case, path, names, threads: int, repeats: int, vocab_size: int) -> tuple:
    """Warm-up steps for each engine, then `repeats` rounds in turn, the order rotating.

    -> (result, trainers): the raw times, medians and the first-step losses; the trainers,
    kept for the bound."""
    trainers = {name: TRAINERS[name](path, threads) for name in names}
    ids = batch_ids(case.batch, case.seq, vocab_size)

    def once(name):
        time.sleep(run.SETTLE_SECONDS)  # let the other engine's idle workers stop spinning
        return trainers[name].step(ids)

    warmup = {name: [once(name) for _ in range(WARMUP_STEPS)] for name in names}
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(once(name)[0])
    engines = {}
    for name, seconds in samples.items():
        rates = [case.batch * case.seq / s for s in seconds]
        engines[name] = {"seconds": seconds, "warmup_seconds": [s for s, _ in warmup[name]],
                         "first_loss": warmup[name][0][1], "median_seconds": measure.median(seconds),
                         "tokens_per_s": rates, "median": measure.median(rates)}
    result = {**dataclasses.asdict(case), "unit": "tokens/s", "engines": engines}
    if set(ENGINE_ORDER) <= set(engines):
        ours, theirs = engines["numpy"]["first_loss"], engines["torch"]["first_loss"]
        difference = abs(ours - theirs) / abs(theirs)
        result["loss_agreement"] = {"numpy": ours, "torch": theirs, "relative_difference": difference,
                                    "rtol": LOSS_RTOL, "agree": difference <= LOSS_RTOL}
    return result, trainers


def rss_command(engine: str, path, case: Case, vocab_size: int, threads: int) -> list:
    """A fresh process that loads `engine` and trains RSS_STEPS steps of the case (see `_child`)."""
    return [sys.executable, __file__, "rss-child", engine, str(path), str(case.batch), str(case.seq),
            str(vocab_size), str(threads)]


def _child(engine: str, path: str, batch: int, seq: int, vocab_size: int, threads: int) -> None:
    """The peak-memory process: only what a user of that engine imports (torch's imports no
    numpy_gpt2, so neither library's memory counts against the other), then the steps."""
    if engine == "numpy":
        from numpy_gpt2.threads import choose_blas_kernels

        choose_blas_kernels()
    trainer = TRAINERS[engine](path, threads)
    ids = batch_ids(batch, seq, vocab_size)
    for _ in range(RSS_STEPS):
        trainer.step(ids)


def measure_rss(case: Case, path, names, vocab_size: int, threads: int) -> dict:
    """ru_maxrss of each engine's fine-tune, each in its own fresh process."""
    env = dict(os.environ)
    out = {**dataclasses.asdict(case), "steps": RSS_STEPS, "unit": "bytes", "engines": {}}
    for name in names:
        command = rss_command(name, path, case, vocab_size, threads)
        out["engines"][name] = {"bytes": measure.peak_rss_bytes(command, env), "command": command}
    return out


def step_products(config, batch: int, seq: int) -> list:
    """Every matrix product of one training step, as (what, batch of matrices, M, K, N, count):
    count products [M, K] @ [K, N] (each over `batch` matrices at once).

    Per block, each of c_attn, attn.c_proj, c_fc, mlp.c_proj is y = x W forward, and
    dx = dy W^T and dW = x^T dy backward; so is the tied head (W = wte^T, once). Attention per
    block over B * H heads: S = Q K^T and O = P V forward; dP = dO V^T, dV = P^T dO, dQ = dS K
    and dK = dS^T Q backward, each over the full T x T (as BLAS computes them).
    """
    n, C, L = batch * seq, config.n_embd, config.n_layer
    F = config.n_inner or 4 * C
    D = C // config.n_head
    products = []
    for what, fan_in, fan_out, count in (("c_attn", C, 3 * C, L), ("attn.c_proj", C, C, L),
                                         ("c_fc", C, F, L), ("mlp.c_proj", F, C, L),
                                         ("head", C, config.vocab_size, 1)):
        products += [(f"{what} forward", 1, n, fan_in, fan_out, count),
                     (f"{what} dx", 1, n, fan_out, fan_in, count),
                     (f"{what} dW", 1, fan_in, n, fan_out, count)]
    heads = batch * config.n_head
    products += [("attention Q K^T and dO V^T", heads, seq, D, seq, 2 * L),
                 ("attention P V, P^T dO, dS K, dS^T Q", heads, seq, seq, D, 4 * L)]
    return products


def products_bound(config, case: Case, numpy_seconds: float, torch_seconds: float | None) -> dict:
    """The step's products alone: each shape timed with `np.matmul(..., out=)` on random arrays
    (the median of PRODUCT_REPEATS), times its count; against the two engines' steps."""
    import numpy as np

    rng = np.random.default_rng(0)
    flops, seconds, parts = 0, 0.0, []
    for what, b, M, K, N, count in step_products(config, case.batch, case.seq):
        shape = (b,) if b > 1 else ()
        x = rng.standard_normal((*shape, M, K), dtype=np.float32)
        w = rng.standard_normal((*shape, K, N), dtype=np.float32)
        out = np.empty((*shape, M, N), np.float32)
        np.matmul(x, w, out=out)
        times = []
        for _ in range(PRODUCT_REPEATS):
            start = time.perf_counter()
            np.matmul(x, w, out=out)
            times.append(time.perf_counter() - start)
        one = measure.median(times)
        flops += 2 * b * M * K * N * count
        seconds += one * count
        parts.append({"product": what, "batch": b, "M": M, "K": K, "N": N, "count": count, "seconds_each": one})
    result = {"step_flops": flops, "products_alone_seconds": seconds, "products_alone_flops_per_s": flops / seconds,
              "numpy_step_seconds": numpy_seconds, "products": parts}
    if torch_seconds is not None:
        result["torch_step_seconds"] = torch_seconds
        result["ratio_bound"] = torch_seconds / seconds
    return result


# ---- reporting -----------------------------------------------------------------------------

def judge(results: dict) -> None:
    """Ratios to torch and, on a full run, PASS or MISS (a MISS too where the losses differ)."""
    full = not results["settings"]["quick"]
    for case in results["cases"]:
        engines = case["engines"]
        if not set(ENGINE_ORDER) <= set(engines):
            continue
        case["ratio_to_torch"] = engines["numpy"]["median"] / engines["torch"]["median"]
        if full and case["target"] is not None:
            met = case["ratio_to_torch"] >= case["target"] and case["loss_agreement"]["agree"]
            case["status"] = run._status(met)
    rss = results.get("rss")
    if rss and set(ENGINE_ORDER) <= set(rss["engines"]):
        rss["ratio_to_torch"] = rss["engines"]["numpy"]["bytes"] / rss["engines"]["torch"]["bytes"]
        if full:
            rss["status"] = run._status(rss["ratio_to_torch"] <= rss["target"])


def markdown_table(results: dict) -> str:
    """The results as a table (row | numpy-gpt2 | torch | ratio | target | PASS/MISS), the losses,
    the bound and the machine under it."""
    rows = []
    for case in results["cases"]:
        cells = [case["label"] + " (tokens/s)"]
        cells += [run._rate(case["engines"][e]["median"]) if e in case["engines"] else "n/a" for e in ENGINE_ORDER]
        ratio, target = case.get("ratio_to_torch"), case["target"]
        cells += [run._ratio(ratio, target) if ratio is not None else "–",
                  f"≥ {target:g}x" if target is not None and "status" in case else "", case.get("status", "")]
        rows.append(cells)
    rss = results.get("rss")
    if rss:
        cells = [rss["label"]]
        cells += [run._mib(rss["engines"][e]["bytes"]) if e in rss["engines"] else "n/a" for e in ENGINE_ORDER]
        ratio = rss.get("ratio_to_torch")
        cells += [f"{ratio:.2f}x" if ratio is not None else "–",
                  f"≤ {rss['target']:g}x torch" if "status" in rss else "", rss.get("status", "")]
        rows.append(cells)
    s = results["settings"]
    lines = [
        f"Training step (forward, backward, clipping at {MAX_NORM:g}, AdamW lr {LR:g} weight decay "
        f"{WEIGHT_DECAY:g}), float32; {s['threads']} threads; median of {s['repeats']} steps after "
        f"{WARMUP_STEPS} warm-up steps; {results['models']}" + ("; QUICK smoke run" if s["quick"] else ""),
        "",
        "| row | numpy-gpt2 | torch | ratio | target | PASS/MISS |",
        "|---|---:|---:|---:|---|---|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    for case in results["cases"]:
        agreement = case.get("loss_agreement")
        if agreement:
            verdict = ("agree", "the same model on the same batch") if agreement["agree"] else \
                ("DIFFER", "not the same work, so the row is a MISS")
            lines.append(f"- {case['label']}: first-step losses {agreement['numpy']:.6f} (numpy-gpt2) and "
                         f"{agreement['torch']:.6f} (torch) {verdict[0]}, relative difference "
                         f"{agreement['relative_difference']:.1e} (tolerance {LOSS_RTOL:g}): {verdict[1]}.")
    lines += [f"- {note}" for note in results["notes"]]
    lines += [_bound_note(case) for case in results["cases"] if "bound" in case]
    lines += ["", run.machine_line(results)]
    return "\n".join(lines) + "\n"


def _bound_note(case: dict) -> str:
    b = case["bound"]
    text = (f"- What bounds {case['label']}, measured in this run: numpy-gpt2's step takes "
            f"{b['numpy_step_seconds'] * 1e3:.0f} ms; its matrix products alone (the forward's, the "
            f"backward's two per linear and the head, attention's), {b['step_flops'] / 1e9:.1f} GFLOP, take "
            f"{b['products_alone_seconds'] * 1e3:.0f} ms ({b['products_alone_flops_per_s'] / 1e9:.0f} GFLOP/s "
            "with np.matmul)")
    if "ratio_bound" in b:
        text += (f"; torch's step takes {b['torch_step_seconds'] * 1e3:.0f} ms, so the bound is "
                 f"{b['torch_step_seconds'] * 1e3:.0f} / {b['products_alone_seconds'] * 1e3:.0f} = "
                 f"{b['ratio_bound']:.2f}x, the best ratio reachable unless the products get faster")
    return text + "."


def write_results(results: dict, out_dir: pathlib.Path, table: str) -> None:
    """train-latest.json and train-latest.md in `out_dir`, each written atomically."""
    from numpy_gpt2.fileio import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "train-latest.json", (json.dumps(results, indent=1) + "\n").encode("utf-8"))
    atomic_write_bytes(out_dir / "train-latest.md", table.encode("utf-8"))


# ---- the command -------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for both engines (default: all available cores)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per engine and case; the median is reported (default 5, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run on a 2-layer model, no PASS/MISS")
    parser.add_argument("--out", type=pathlib.Path, default=run.BENCH / "results",
                        help="where train-latest.json and train-latest.md go (default: bench/results)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rss-child"]:
        engine, path, *sizes = argv[1:]
        _child(engine, path, *map(int, sizes))
        return 0
    args = parse_args(argv)
    # BLAS and OpenMP read these once, when they load: set before NumPy or torch is imported.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    run._import_torch_first()
    from numpy_gpt2.errors import GPT2Error
    from numpy_gpt2.threads import choose_blas_kernels

    choose_blas_kernels()  # as the command line does
    try:
        return _run(args)
    except (GPT2Error, OSError, RuntimeError) as exc:  # RuntimeError: a subprocess that failed
        print(f"bench/train.py: error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from numpy_gpt2.weights import load_checkpoint

    names, notes = list(ENGINE_ORDER), []
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        names.remove("torch")
        notes.append(f"torch column skipped: {exc}")
    cases, rss_case = (QUICK_CASES, QUICK_RSS) if args.quick else (FULL_CASES, FULL_RSS)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {
        "date": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "settings": {"threads": args.threads, "repeats": args.repeats, "quick": args.quick,
                     "warmup_steps": WARMUP_STEPS, "lr": LR, "betas": BETAS, "weight_decay": WEIGHT_DECAY,
                     "max_norm": MAX_NORM, "dtype": "float32"},
        "engines": {name: {"label": LABELS[name]} for name in names},
        "load_average": {"start": os.getloadavg()},
        "notes": notes,
        "cases": [],
    }
    kinds = {}
    for case in cases:
        path, kinds[case.model] = model_path(case.model)
        config = load_checkpoint(path).config
        result, trainers = run_case(case, path, names, args.threads, args.repeats, config.vocab_size)
        result["model_path"] = run._shown_path(path)
        summary = ", ".join(f"{n} {run._rate(m['median'])}" for n, m in result["engines"].items())
        print(f"{case.label}: {summary} tokens/s", file=sys.stderr)
        if "loss_agreement" in result and not result["loss_agreement"]["agree"]:
            notes.append(f"{case.key}: the engines' first-step losses differ; they did not train the same model")
        if case.measure_bound and "numpy" in trainers:
            torch_seconds = result["engines"].get("torch", {}).get("median_seconds")
            result["bound"] = products_bound(config, case, result["engines"]["numpy"]["median_seconds"], torch_seconds)
            print(f"bound of {case.label} measured", file=sys.stderr)
        del trainers  # the next case's models need the memory
        results["cases"].append(result)
    print(f"{rss_case.label} (subprocesses)", file=sys.stderr)
    path, kinds[rss_case.model] = model_path(rss_case.model)
    vocab_size = load_checkpoint(path).config.vocab_size
    results["rss"] = {**measure_rss(rss_case, path, names, vocab_size, args.threads),
                      "model_path": run._shown_path(path)}
    results["models"] = "; ".join(f"{model} model: {kind}" for model, kind in kinds.items())
    judge(results)
    results["load_average"]["end"] = os.getloadavg()
    results["machine"] = run.machine_info(args.threads)
    table = markdown_table(results)
    write_results(results, args.out, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
