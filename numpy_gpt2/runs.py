"""The files of a training run's directory (see `train`): the checkpoint, staged and then moved
in so that the directory always holds one step's files; the training state; log.jsonl; loss.png.
"""

import contextlib
import json
import os
import pathlib
import shutil
import sys

from . import plots
from .errors import GPT2Error
from .fileio import atomic_write_bytes
from .tokenizer import find_tokenizer_files, packaged_files
from .weights.resolve import resolve_model
from .weights.safetensors_file import write_arrays

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
# The files of one checkpoint, in the order they are moved into place: the state file last,
# since the step it names is the step of the checkpoint.
CHECKPOINT_FILES = ("model.safetensors", OPTIMIZER_FILE, "config.json", STATE_FILE)
_STAGING, _COMPLETE = ".checkpoint.tmp", "COMPLETE"


def append(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


def read_log(path: pathlib.Path, step: int) -> list:
    """The log's records up to `step` (a run stopped after its last checkpoint logged more),
    rewritten so that the log goes on from there."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record["step"] <= step:
                    records.append(record)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    return records


def save(out: pathlib.Path, model, optimizer, rng, step: int, run: dict) -> None:
    """Write the checkpoint of `step` into the staging directory, mark it complete, move it in.
    run: what the state file records besides the step and the generator (settings, data)."""
    staging = out / _STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write_arrays(staging / "model.safetensors", model.parameters(), metadata={"format": "pt", "step": str(step)})
    optimizer.save(staging / OPTIMIZER_FILE)
    model.config.save_json(staging / "config.json")
    record = {**run, "step": step, "rng": rng.bit_generator.state}
    atomic_write_bytes(staging / STATE_FILE, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    atomic_write_bytes(staging / _COMPLETE, b"")
    finish_interrupted_save(out)


def finish_interrupted_save(out: pathlib.Path) -> None:
    """Move a complete staged checkpoint into `out` (the rest of one, if a move stopped half
    way); drop one never marked complete."""
    staging = out / _STAGING
    if not staging.is_dir():
        return
    if (staging / _COMPLETE).is_file():
        for name in CHECKPOINT_FILES:
            if (staging / name).is_file():
                os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


def read_state(out: pathlib.Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        raise GPT2Error(f"--resume: {out} holds no training run to resume (no {STATE_FILE})")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        state = None
    if not isinstance(state, dict) or {"step", "settings", "rng", "data"} - state.keys():
        raise GPT2Error(f"{path}: not a training state numpy-gpt2 wrote")
    return state


def write_tokenizer(out: pathlib.Path, init) -> None:
    """The BPE files of the model fine-tuned (or GPT-2's), as vocab.json and merges.txt."""
    found = None
    if init is not None:
        source = pathlib.Path(resolve_model(init))
        found = find_tokenizer_files(source if source.is_dir() else source.parent)
    for source, name in zip(found or packaged_files(), ("vocab.json", "merges.txt")):
        atomic_write_bytes(out / name, pathlib.Path(source).read_bytes())


# ---- the plot -------------------------------------------------------------------------------

def plotter(plot):
    """-> draw(path, history): loss.png when matplotlib is there (and `plot` is not False)."""
    if plot is False:
        return lambda path, history: None
    try:
        plots.require_matplotlib("plot=True")
    except GPT2Error:
        if plot:
            raise
        print("numpy-gpt2: matplotlib is not installed, so no loss.png (pip install matplotlib)",
              file=sys.stderr)
        return lambda path, history: None

    def draw(path, history):
        figure = plots.new_figure(7, 4, "loss.png")
        axes = figure.add_subplot()
        train = [(r["step"], r["loss"]) for r in history if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
        if train:
            axes.plot(*zip(*train), lw=1, label="train")
        axes.plot(*zip(*val), "o-", ms=3, label="validation")
        axes.set_xlabel("step")
        axes.set_ylabel("cross-entropy (nats per token)")
        axes.grid(alpha=0.3)
        axes.legend()
        plots.save_png(figure, path)

    return draw
