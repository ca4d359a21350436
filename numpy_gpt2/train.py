"""The training loop: GPT-2 trained from scratch or fine-tuned on data `prepare` wrote.

One step: a batch of B rows of T tokens at random offsets of train.bin (`data.sample_batch`),
the loss and every gradient by hand (`GPT2.loss_and_grads`, labels = inputs, shifted inside:
each row predicts its T - 1 next tokens), clipping by global norm, AdamW with the learning rate
of `optim.get_lr` (warmup, then cosine decay to min_lr over the run's steps).

The output directory is the run and its latest checkpoint:

    config.json, model.safetensors  the model as `GPT2.from_pretrained` and transformers load it
    vocab.json, merges.txt          the tokenizer, so `--model DIR` needs nothing else
    optimizer.safetensors           AdamW's m and v
    training_state.json             the step, the batch generator's state, the run's settings
    log.jsonl                       one JSON object per step
    loss.png                        train and validation loss (when matplotlib is installed)

A checkpoint is written whole into DIR/.checkpoint.tmp/, marked complete, and only then moved
into place file by file, training_state.json last; a start finds a save that stopped half way
and completes it (or, unmarked, drops it), so DIR always holds one step's files. `resume=True`
restores the weights, m, v, the step and the generator, so the run ends with the weights an
uninterrupted one would have, bit for bit.
"""

import contextlib
import hashlib
import math
import os
import pathlib
import signal
import sys
import threading
import time

import numpy as np

from . import runs
from .config import PRESETS, GPT2Config
from .data import Progress, load_tokens, sample_batch
from .errors import GPT2Error
from .model import DTYPES, GPT2
from .optim import AdamW, clip_grad_norm, get_lr
from .threads import set_threads
from .weights import expected_shapes

# nanoGPT's AdamW for GPT-2.
BETAS, EPS = (0.9, 0.95), 1e-8
DEFAULTS = dict(batch_size=8, weight_decay=0.1, grad_clip=1.0, eval_batches=20, seed=1337, dtype="float32")
# Settings a resumed run must keep: with any other, its weights would be those of no single run.
_KEPT_ON_RESUME = ("init", "config", "batch_size", "seq_len", "lr", "min_lr", "warmup", "weight_decay",
                   "grad_clip", "seed", "dtype")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a callback's KeyboardInterrupt) stopped `train`; `step` is the step saved in
    `out` (None: none was)."""

    def __init__(self, step: int | None, out: pathlib.Path, during_update: bool = False):
        if during_update and step is None:
            message = f"interrupted during an update, before the first checkpoint: {out} holds nothing to resume"
        elif during_update:
            message = f"interrupted during an update; {out} holds step {step}, resume with --resume"
        else:
            message = f"interrupted at step {step}; saved to {out}, resume with --resume"
        super().__init__(message)
        self.step, self.out = step, out


def init_parameters(config: GPT2Config, seed: int, dtype="float32") -> dict:
    """GPT-2's initialisation -> official name -> array (the file's shapes, [in, out] matrices).

    Matrices and embeddings ~ N(0, 0.02), the residual projections `attn.c_proj.weight` and
    `mlp.c_proj.weight` ~ N(0, 0.02 / sqrt(2 * n_layer)), biases 0, layernorm weight 1 and
    bias 0 (as GPT-2's paper, nanoGPT and transformers' `_init_weights`). Drawn in float64 from
    `np.random.default_rng(seed)`, tensor by tensor in the file's order, then cast: the same
    seed gives the same model in either dtype.
    """
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 2:
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            tensors[name] = (rng.standard_normal(shape) * std).astype(dtype)
        elif name.endswith("weight"):
            tensors[name] = np.ones(shape, dtype)
        else:
            tensors[name] = np.zeros(shape, dtype)
    return tensors


def train(data=None, out=None, init=None, config=None, steps=None, batch_size=None, seq_len=None, lr=None,
          min_lr=None, warmup=None, weight_decay=None, grad_clip=None, eval_every=None, eval_batches=None,
          seed=None, threads=None, resume=False, dtype=None, progress=True, plot=None, callback=None) -> list:
    """Train a GPT-2 on `data` (a directory `prepare` wrote) into the run directory `out`.

    init: a checkpoint to fine-tune (a name such as "gpt2", or a path); config: for a model
    trained from scratch, a preset name or a config.json path (or a GPT2Config). One of the two,
    unless resuming.
    steps: optimizer steps in the run; batch_size B, seq_len T (default 256, or the model's
    n_positions if less): tokens per step B * T.
    lr, min_lr, warmup: the schedule (defaults: lr 6e-4 from scratch and 3e-5 fine-tuning,
    nanoGPT's; min_lr lr / 10; warmup steps // 10). weight_decay (on 2-D parameters), grad_clip
    (max global norm, 0 for none). eval_every: steps between validation losses, each the mean
    over eval_batches batches of val.bin, the same batches each time (default: steps // 10; and
    always after the last step); a checkpoint is saved with each.
    seed: of the initialisation and the batches. threads: for the matrix products.
    resume: continue the run in `out` (settings left None are the run's). dtype: "float32" or
    "float64". progress: the progress line on stderr. plot: loss.png at each evaluation (None:
    when matplotlib is installed). callback(record): called after each step (a test hook;
    raising KeyboardInterrupt there stops as Ctrl-C does).
    -> the history: one dict per step (step, loss, lr, grad_norm, tokens_per_s, val_loss on
    evaluation steps), the run's earlier steps included; the first, step 0, holds the
    validation loss before training. Ctrl-C saves the last finished step and raises
    `TrainingInterrupted`.
    """
    if out is None:
        raise GPT2Error("--out (out) is needed: the directory of the run")
    out = pathlib.Path(out)
    given = dict(init=init, config=config, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, min_lr=min_lr,
                 warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every,
                 eval_batches=eval_batches, seed=seed, dtype=dtype)
    model, settings, previous, (train_tokens, val_tokens) = _open_run(out, data, given, resume)
    if threads is not None:
        set_threads(threads)
    draw = runs.plotter(plot)
    optimizer = AdamW(model.parameters(), lr=settings["lr"], betas=BETAS, eps=EPS,
                      weight_decay=settings["weight_decay"])
    rng = np.random.default_rng(settings["seed"])
    if previous is None:
        out.mkdir(parents=True, exist_ok=True)
        runs.write_tokenizer(out, settings["init"])
        history, start = [], 0
    else:
        optimizer.load(out / runs.OPTIMIZER_FILE)
        rng.bit_generator.state = previous["rng"]
        history, start = runs.read_log(out / runs.LOG_FILE, previous["step"]), previous["step"]
        if optimizer.step_count != start:
            raise GPT2Error(f"{out / runs.OPTIMIZER_FILE}: holds step {optimizer.step_count}, {runs.STATE_FILE} step {start}")
    run = {"data": _data_identity(train_tokens, val_tokens, settings["data"]), "settings": settings}

    B, T, steps = settings["batch_size"], settings["seq_len"], settings["steps"]
    val_batches = _validation_batches(val_tokens, settings)
    bar = Progress(steps, enabled=progress)
    log = open(out / runs.LOG_FILE, "a", encoding="utf-8")
    saved, updating, grads = None if previous is None else start, False, None
    with log, _deferred_interrupts() as interrupted:
        try:
            if not history:
                history.append({"step": 0, "val_loss": _evaluate(model, val_batches)})
                runs.append(log, history[-1])
            for step in range(start, steps):
                began = time.perf_counter()
                lr_now = get_lr(step, settings["lr"], settings["min_lr"], settings["warmup"], steps)
                # The last step's gradient arrays, overwritten: no model-sized allocation per step.
                loss, grads = model.loss_and_grads(sample_batch(train_tokens, B, T, rng), grads=grads)
                grad_norm = clip_grad_norm(grads, settings["grad_clip"])
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise GPT2Error(f"step {step + 1}: the loss is {loss} and the gradient norm {grad_norm}: "
                                    "training diverged; try a lower --lr")
                updating = True
                optimizer.step(grads, lr=lr_now)
                updating = False
                record = {"step": step + 1, "loss": loss, "lr": lr_now, "grad_norm": grad_norm,
                          "tokens_per_s": B * T / (time.perf_counter() - began)}
                last = step + 1 == steps
                if last or (step + 1) % settings["eval_every"] == 0:
                    record["val_loss"] = _evaluate(model, val_batches)
                history.append(record)
                runs.append(log, record)
                bar.update(step + 1, _describe(record, history, steps))
                if "val_loss" in record:
                    runs.save(out, model, optimizer, rng, step + 1, run)
                    saved = step + 1
                    draw(out / runs.PLOT_FILE, history)
                if callback is not None:
                    callback(record)
                if interrupted.is_set():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if updating:
                # A second Ctrl-C inside AdamW's update: the weights are of no step; keep the last checkpoint.
                raise TrainingInterrupted(saved, out, during_update=True) from None
            step_done = optimizer.step_count
            if saved != step_done:
                runs.save(out, model, optimizer, rng, step_done, run)
                draw(out / runs.PLOT_FILE, history)
            raise TrainingInterrupted(step_done, out) from None
    bar.close()
    return history


# ---- settings and checks ----------------------------------------------------------------

def _open_run(out: pathlib.Path, data, given: dict, resume: bool):
    """-> (model, settings, the saved training state or None, (train, val) tokens): the run
    in `out` to resume, or a new one, each setting and the data checked."""
    runs.finish_interrupted_save(out)
    if resume:
        previous = runs.read_state(out)
        settings = _resumed_settings(previous["settings"], given, out)
        data = settings["data"] if data is None else data
    else:
        previous = None
        _check_new_run(out)
        if data is None:
            raise GPT2Error("--data (data) is needed: a directory made by `numpy-gpt2 prepare`")
    train_tokens, val_tokens, meta = load_tokens(data)
    if resume and _data_identity(train_tokens, val_tokens, data) != previous["data"]:
        raise GPT2Error(f"--resume: --data {data} is not the data the run in {out} was trained on "
                        f"({previous['data']['train_tokens']} + {previous['data']['val_tokens']} tokens)")
    if resume:
        model = GPT2.from_pretrained(out, dtype=settings["dtype"], weights="float32")
    else:
        model, settings = _new_model(given)
    settings["data"] = str(pathlib.Path(data).resolve())
    _check_fits(model.config, settings, train_tokens, val_tokens, meta)
    return model, settings, previous, (train_tokens, val_tokens)


def _new_model(given: dict):
    """-> (model, settings) for a new run: the checkpoint to fine-tune, or GPT-2's
    initialisation of the config; settings left None take their defaults."""
    settings = {key: (DEFAULTS.get(key) if value is None else value) for key, value in given.items()}
    if settings["steps"] is None:
        raise GPT2Error("--steps (steps) is needed for a new run")
    if settings["dtype"] not in DTYPES:
        raise GPT2Error(f"--dtype (dtype) must be one of {', '.join(DTYPES)}, found {settings['dtype']!r}")
    if (given["init"] is None) == (given["config"] is None):
        raise GPT2Error("give one of --init MODEL (fine-tune a checkpoint) and --config PRESET_OR_JSON "
                        "(train from scratch)" + (", not both" if given["init"] is not None else ""))
    if given["init"] is not None:
        model = GPT2.from_pretrained(given["init"], dtype=settings["dtype"], weights="float32")  # trains float32 weights
        settings["init"], settings["config"] = str(given["init"]), None
        fine_tuning = True
    else:
        config = _config_from(given["config"])
        model = GPT2(config, init_parameters(config, settings["seed"], settings["dtype"]), settings["dtype"])
        settings["config"] = config.to_dict()
        fine_tuning = False
    steps, lr = settings["steps"], settings["lr"] or (3e-5 if fine_tuning else 6e-4)
    derived = dict(seq_len=min(256, model.config.n_positions), lr=lr, min_lr=lr / 10, warmup=steps // 10,
                   eval_every=max(1, steps // 10))
    settings.update({key: value for key, value in derived.items() if settings[key] is None})
    return model, settings


def _config_from(config) -> GPT2Config:
    if isinstance(config, GPT2Config):
        return config
    if os.path.isfile(config):
        return GPT2Config.from_json(config)
    if str(config).removeprefix("openai-community/").removeprefix("distilbert/") in PRESETS:
        return GPT2Config.from_preset(config)
    raise GPT2Error(f"--config {config}: neither a preset ({', '.join(PRESETS)}) nor a config.json file")


def _resumed_settings(saved: dict, given: dict, out: pathlib.Path) -> dict:
    settings = dict(saved)
    for key, value in given.items():
        if value is None:
            continue
        if key == "config":
            value = _config_from(value).to_dict()
        elif key == "init":
            value = str(value)
        if key in _KEPT_ON_RESUME and value != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise GPT2Error(f"--resume: {flag} {given[key]} differs from the run's {saved[key]} in {out}; "
                            "a resumed run keeps its settings (leave the flag out)")
        settings[key] = value
    return settings


def _check_new_run(out: pathlib.Path) -> None:
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"--out {out}: is a file, expected a directory")
    if (out / runs.STATE_FILE).is_file():
        state = runs.read_state(out)
        raise GPT2Error(f"--out {out}: holds a training run (step {state['step']} of "
                        f"{state['settings']['steps']}); add --resume to continue it, or choose another --out")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present:
        raise GPT2Error(f"--out {out}: is not empty ({', '.join(present[:3])}{', ...' if present[3:] else ''}); "
                        "a new run needs a new or empty directory")


def _check_fits(config: GPT2Config, settings: dict, train_tokens, val_tokens, meta) -> None:
    T = settings["seq_len"]
    if T > config.n_positions:
        raise GPT2Error(f"--seq-len {T} exceeds the model's n_positions={config.n_positions}")
    if T < 2:
        raise GPT2Error(f"--seq-len {T}: a row needs at least 2 tokens, one to predict the other")
    for name, tokens in (("train.bin", train_tokens), ("val.bin", val_tokens)):
        if tokens.size < T:
            raise GPT2Error(f"--data: {name} holds {tokens.size} tokens, fewer than --seq-len {T}")
        top = int(tokens.max())
        if top >= config.vocab_size:
            raise GPT2Error(f"--data: {name} holds token id {top}, outside the model's vocabulary of "
                            f"{config.vocab_size} (ids 0..{config.vocab_size - 1})")
    if meta is not None and meta.get("tokenizer") not in (None, "gpt2"):
        raise GPT2Error(f"--data: tokenized with {meta['tokenizer']!r}, not GPT-2's tokenizer")


def _data_identity(train_tokens, val_tokens, directory) -> dict:
    """What tells one data set from another: the token counts and meta.json's hash (the sources')."""
    meta_path = pathlib.Path(directory) / "meta.json"
    meta_hash = hashlib.sha256(meta_path.read_bytes()).hexdigest() if meta_path.is_file() else None
    return {"train_tokens": int(train_tokens.size), "val_tokens": int(val_tokens.size), "meta_sha256": meta_hash}


# ---- steps, evaluation, logging ---------------------------------------------------------------

def _validation_batches(val_tokens, settings) -> list:
    """The evaluation's batches, the same at every evaluation and in a resumed run."""
    rng = np.random.default_rng([settings["seed"], 1])
    return [sample_batch(val_tokens, settings["batch_size"], settings["seq_len"], rng)
            for _ in range(settings["eval_batches"])]


def _evaluate(model: GPT2, batches) -> float:
    return float(np.mean([model.loss(ids) for ids in batches]))


def _describe(record: dict, history: list, steps: int) -> str:
    val = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
    text = f"step {record['step']}/{steps} | loss {record['loss']:.4f}"
    if val is not None:
        text += f" | val {val:.4f}"
    return text + f" | {record['tokens_per_s']:,.0f} tok/s"


@contextlib.contextmanager
def _deferred_interrupts():
    """Ctrl-C sets the yielded event instead of raising, so the loop stops between steps with
    the weights and m, v of one step; a second Ctrl-C raises at once. (Only the main thread
    receives signals; elsewhere nothing changes.)"""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)
