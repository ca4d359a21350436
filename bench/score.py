"""Scoring speed: numpy-gpt2's `score_many` against transformers on torch, on the same documents.

    python bench/score.py                 # 200 documents of 50-1000 tokens, GPT-2 124M
    python bench/score.py --quick --model DIR   # a smoke run: 8 short documents, no PASS/MISS

The documents are random token ids of random lengths (a fixed seed), each shorter than the
model's context, so both engines score each in one window. Both run the same batches: the
documents sorted by length, longest first, as many a batch as fit in `MAX_BATCH_TOKENS`
positions, padded on the right (numpy-gpt2's own grouping, `score.score_many`). torch
computes what transformers' `labels` loss computes, per document: GPT2LMHeadModel's logits
for every position (its attention mask marking the pads), then the shifted cross-entropy with
the pads' labels -100 (F.cross_entropy, reduction "none", summed per document); float32,
no_grad, the same threads. The batches are timed in turn, the engine that goes first
alternating, so a change of load on the machine falls on both. Each document's NLL from the
two engines is compared, to show it is the same work. What bounds the ratio, the matrix
products numpy-gpt2 makes timed alone (as bench/bound.py does), is measured in the same run.
The table goes to stdout and `score-latest.md`, every raw time to `score-latest.json`.
"""

import argparse
import collections
import datetime
import json
import os
import pathlib
import sys
import time

import measure  # standard library only, as is importing run: both safe before the thread settings
import run

TARGET = 1.5
NLL_RTOL = 1e-4  # float32 NLLs of the same model on the same document
ENGINE_ORDER = ("numpy", "torch")
LABELS = {"numpy": "numpy-gpt2", "torch": "torch"}
FULL = dict(documents=200, min_tokens=50, max_tokens=1000)
QUICK = dict(documents=8, min_tokens=5, max_tokens=60)


def documents(count: int, min_tokens: int, max_tokens: int, vocab_size: int, seed: int = 0) -> list:
    """count random token-id documents of min_tokens..max_tokens tokens each (uniform)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n) for n in rng.integers(min_tokens, max_tokens + 1, count)]


def batches(docs: list, max_batch_tokens: int) -> list:
    """The indices of the documents in each batch, as `score.score_many` groups one window per
    document: longest first, as many a batch as fit in max_batch_tokens padded positions."""
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]), reverse=True)
    out, start = [], 0
    while start < len(order):
        stop = start + max(1, min(len(order) - start, max_batch_tokens // len(docs[order[start]])))
        out.append(order[start:stop])
        start = stop
    return out


class NumpyScorer:
    """numpy-gpt2: `score.score_many` on one batch's documents (they are one batch to it too)."""

    def __init__(self, path, threads):
        from numpy_gpt2 import GPT2
        from numpy_gpt2.threads import set_threads

        set_threads(threads)
        self.model = GPT2.from_pretrained(path)

    def score(self, docs) -> tuple:
        """-> (seconds, each document's NLL)."""
        from numpy_gpt2.score import score_many

        with measure.quiet_gc():
            start = time.perf_counter()
            # The documents are one batch: B rows padded to the longest.
            scores = score_many(self.model, docs, max_batch_tokens=len(docs) * max(map(len, docs)))
            return time.perf_counter() - start, [s.nll for s in scores]


class TorchScorer:
    """transformers' GPT2LMHeadModel, float32, sdpa attention, no cache, no_grad: logits for every
    position, then `labels`' loss per document (see the module's docstring)."""

    def __init__(self, path, threads):
        import torch
        import transformers

        torch.set_num_threads(threads)
        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        self.model = transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32,
                                                                  attn_implementation="sdpa").eval()

    def score(self, docs) -> tuple:
        import numpy as np

        torch = self.torch
        T = max(map(len, docs))
        ids = np.zeros((len(docs), T), np.int64)
        mask = np.zeros((len(docs), T), np.int64)
        for row, doc in enumerate(docs):
            ids[row, :len(doc)], mask[row, :len(doc)] = doc, 1
        labels = np.where(mask == 1, ids, -100)
        ids, mask, labels = map(torch.from_numpy, (ids, mask, labels))
        with torch.no_grad(), measure.quiet_gc():
            start = time.perf_counter()
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # transformers' ForCausalLMLoss, per document: logits upcast to float, labels shifted.
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                                       ignore_index=-100, reduction="none").sum(dim=1)
            return time.perf_counter() - start, losses.tolist()


SCORERS = {"numpy": NumpyScorer, "torch": TorchScorer}


# ---- measuring -----------------------------------------------------------------------------

def run_all(docs, groups, scorers: dict) -> dict:
    """Each batch scored by each engine in turn, the first engine alternating; one warm-up batch
    (the longest and the shortest) each first. -> per engine: seconds per batch, NLL per doc;
    and the dense products numpy-gpt2 made in the timed batches (for the bound)."""
    names = list(scorers)
    for name in names:
        for group in (groups[0], groups[-1]):
            scorers[name].score([docs[i] for i in group])
    from numpy_gpt2 import kernels

    seconds = {name: [] for name in names}
    nll = {name: [None] * len(docs) for name in names}
    with kernels.recorded_products() as calls:  # a list append a product: nothing beside the products' time
        for b, group in enumerate(groups):
            for name in names[b % len(names):] + names[:b % len(names)]:
                time.sleep(run.SETTLE_SECONDS)  # let the other engine's idle workers stop spinning
                took, values = scorers[name].score([docs[i] for i in group])
                seconds[name].append(took)
                for i, value in zip(group, values):
                    nll[name][i] = value
    return {"seconds": seconds, "nll": nll, "products": calls}


def products_bound(model, calls, numpy_seconds: float, torch_seconds: float | None, repeats: int = 3) -> dict:
    """What the dense products numpy-gpt2 made while it was timed (`calls`: (M rows, weight_t)
    from `kernels.recorded_products`) take alone: work no engine on this BLAS skips.

    Timing each of them again (bench/bound.py's `_products_alone`: the faster of numpy-gpt2's
    path and one NumPy matmul) would take several times the run; instead each weight shape's
    FLOP rate is timed at that shape's most common row count and its products' FLOPs divided by
    it (the rate barely moves over the row counts a batch gives, a few hundred and up).
    """
    import numpy as np

    import bound

    by_shape = collections.defaultdict(list)
    for M, weight_t in calls:
        by_shape[weight_t.shape].append((M, weight_t))
    flops, seconds, head, parts = 0, 0.0, 0.0, []
    for shape, made in by_shape.items():
        M, weight_t = collections.Counter(made_M for made_M, _ in made).most_common(1)[0][0], made[0][1]
        [alone] = bound._products_alone([(M, weight_t)], model.dtype, repeats, np.random.default_rng(0))
        rate = 2 * M * weight_t.size / alone
        shape_flops = sum(2 * m * weight_t.size for m, _ in made)
        flops += shape_flops
        seconds += shape_flops / rate
        if np.may_share_memory(weight_t, model.wte):
            head += shape_flops / rate
        parts.append({"weight_shape": list(shape), "products": len(made), "timed_rows": M, "flops_per_s": rate})
    result = {"dense_products": len(calls), "dense_product_flops": flops, "products_alone_seconds": seconds,
              "head_alone_seconds": head, "products_alone_flops_per_s": flops / seconds, "numpy_seconds": numpy_seconds,
              "by_weight_shape": parts}
    if torch_seconds is not None:
        result["torch_seconds"] = torch_seconds
        result["ratio_bound"] = torch_seconds / seconds
    return result


# ---- reporting -----------------------------------------------------------------------------

def markdown_table(results: dict) -> str:
    s, d = results["settings"], results["documents"]
    engines = results["engines"]
    cells = [f"score {d['count']} documents of {d['min_tokens']}-{d['max_tokens']} tokens ({d['tokens']:,} "
             "tokens, tokens/s)"]
    cells += [run._rate(engines[e]["tokens_per_s"]) if e in engines else "n/a" for e in ENGINE_ORDER]
    ratio = results.get("ratio_to_torch")
    cells += [run._ratio(ratio, TARGET) if ratio is not None else "–",
              f"≥ {TARGET:g}x" if "status" in results else "", results.get("status", "")]
    lines = [
        f"Scoring (per-document NLL), float32; {s['threads']} threads; {results['model']['kind']} "
        f"({results['model']['shown_path']}); batches of up to {s['max_batch_tokens']} padded positions, "
        f"{d['batches']} batches, one pass, engines taking turns per batch"
        + ("; QUICK smoke run" if s["quick"] else ""),
        "",
        "| row | numpy-gpt2 | torch | ratio | target | PASS/MISS |",
        "|---|---:|---:|---:|---|---|",
        "| " + " | ".join(cells) + " |",
        "",
    ]
    agreement = results.get("nll_agreement")
    if agreement:
        lines.append(f"- Per-document NLL of the two engines: largest relative difference "
                     f"{agreement['max_relative_difference']:.1e} (tolerance {NLL_RTOL:g}): "
                     + ("the same work." if agreement["agree"] else "DIFFER, not the same work: a MISS."))
    b = results.get("bound")
    if b:
        text = (f"- What bounds it, measured in this run: numpy-gpt2 takes {b['numpy_seconds']:.1f} s; its dense "
                f"products alone ({b['dense_product_flops'] / 1e9:,.0f} GFLOP, of which the head "
                f"{b['head_alone_seconds']:.1f} s) take {b['products_alone_seconds']:.1f} s "
                f"({b['products_alone_flops_per_s'] / 1e9:.0f} GFLOP/s)")
        if "ratio_bound" in b:
            text += (f"; torch takes {b['torch_seconds']:.1f} s, so the bound is {b['ratio_bound']:.2f}x, the best "
                     "ratio reachable with numpy-gpt2 doing nothing but those products")
        lines.append(text + ".")
    lines += [f"- {note}" for note in results["notes"]]
    lines += ["", run.machine_line(results)]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: pathlib.Path, table: str) -> None:
    """score-latest.json and score-latest.md in `out_dir`, each written atomically."""
    from numpy_gpt2.fileio import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("score-latest.json", json.dumps(results, indent=1) + "\n"), ("score-latest.md", table)):
        atomic_write_bytes(out_dir / name, text.encode("utf-8"))


# ---- the command -------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench/score.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for both engines (default: all available cores)")
    parser.add_argument("--quick", action="store_true", help="a smoke run on 8 short documents, no PASS/MISS")
    parser.add_argument("--model", default=None, help="a checkpoint directory or name (default: gpt2 if found, "
                                                      "else the random 124M-shaped checkpoint of bench/run.py)")
    parser.add_argument("--out", type=pathlib.Path, default=run.BENCH / "results",
                        help="where score-latest.json and score-latest.md go (default: bench/results)")
    parser.add_argument("--no-bound", action="store_true", help="leave out timing the products alone")
    parser.add_argument("--documents", type=int, default=None,
                        help=f"how many documents (default {FULL['documents']}, {QUICK['documents']} with --quick; "
                             "a run of another number is not judged)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.documents is not None and args.documents < 1:
        parser.error("--documents must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run.set_up_threads(args.threads)
    from numpy_gpt2.errors import GPT2Error

    try:
        return _run(args)
    except (GPT2Error, OSError) as exc:
        print(f"bench/score.py: error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from numpy_gpt2.weights import load_checkpoint

    path, kind = run.find_model(args.model)
    config = load_checkpoint(path).config
    sizes = dict(QUICK if args.quick else FULL)
    judged = not args.quick and args.documents in (None, sizes["documents"])
    sizes["documents"] = args.documents or sizes["documents"]
    sizes["max_tokens"] = min(sizes["max_tokens"], config.n_positions)
    docs = documents(sizes["documents"], sizes["min_tokens"], sizes["max_tokens"], config.vocab_size)
    max_batch_tokens = config.n_positions  # numpy-gpt2's default (`score.score_many`)
    groups = batches(docs, max_batch_tokens)
    scorers, notes = {}, []
    for name in ENGINE_ORDER:
        try:
            scorers[name] = SCORERS[name](path, args.threads)
        except ImportError as exc:
            notes.append(f"{name} column skipped: {exc}")
    started = datetime.datetime.now(datetime.timezone.utc)
    tokens = sum(map(len, docs))
    results = {
        "stamp": started.strftime("%Y%m%dT%H%M%SZ"), "date": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "settings": {"threads": args.threads, "quick": args.quick, "judged": judged,
                     "max_batch_tokens": max_batch_tokens},
        "model": {"path": str(path), "shown_path": run._shown_path(path), "kind": kind, "n_layer": config.n_layer,
                  "n_embd": config.n_embd},
        "documents": {"count": len(docs), "min_tokens": sizes["min_tokens"], "max_tokens": sizes["max_tokens"],
                      "tokens": tokens, "lengths": [len(d) for d in docs], "batches": len(groups),
                      "batch_sizes": [len(g) for g in groups]},
        "load_average": {"start": os.getloadavg()},
        "notes": notes,
    }
    measured = run_all(docs, groups, scorers)
    results["engines"] = {name: {"label": LABELS[name], "batch_seconds": measured["seconds"][name],
                                 "seconds": sum(measured["seconds"][name]),
                                 "tokens_per_s": tokens / sum(measured["seconds"][name]),
                                 "nll": measured["nll"][name]} for name in scorers}
    if set(ENGINE_ORDER) <= set(scorers):
        e = results["engines"]
        results["ratio_to_torch"] = e["numpy"]["tokens_per_s"] / e["torch"]["tokens_per_s"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(e["numpy"]["nll"], e["torch"]["nll"]))
        results["nll_agreement"] = {"max_relative_difference": worst, "rtol": NLL_RTOL, "agree": worst <= NLL_RTOL}
        if judged:
            results["status"] = run._status(results["ratio_to_torch"] >= TARGET and worst <= NLL_RTOL)
    if not args.no_bound and "numpy" in scorers:
        torch_seconds = results["engines"]["torch"]["seconds"] if "torch" in scorers else None
        results["bound"] = products_bound(scorers["numpy"].model, measured["products"],
                                          results["engines"]["numpy"]["seconds"], torch_seconds)
    results["load_average"]["end"] = os.getloadavg()
    results["machine"] = run.machine_info(args.threads)  # after the runs: Numba's threading layer is known
    table = markdown_table(results)
    write_results(results, args.out, table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
