"""prepare, train: tokenizing text for training, and the training run."""

import sys

from .common import _PRESET_NAMES, _fraction, _non_negative_float, _non_negative_int, _positive_float, _positive_int


def add_commands(sub):
    prep = sub.add_parser("prepare", help="tokenize text files for training",
                          description="Tokenize FILE... (UTF-8 text) into DIR/train.bin and DIR/val.bin "
                                      "(uint16 GPT-2 token ids, nanoGPT's format; <|endoftext|> between "
                                      "files) and DIR/meta.json. val.bin is the last --val-fraction of the "
                                      "tokens, train.bin the rest.")
    prep.add_argument("files", nargs="+", metavar="FILE", help="text files, in order")
    prep.add_argument("--out", required=True, metavar="DIR", help="the directory to write (new, empty, or "
                                                                  "written by prepare before)")
    prep.add_argument("--val-fraction", type=_fraction, default=0.05, help="default: 0.05")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")

    tr = sub.add_parser("train", help="train or fine-tune GPT-2 on prepared data",
                        description="Train a GPT-2 on --data (from `numpy-gpt2 prepare`) into --out: from "
                                    "scratch (--config) or from a checkpoint (--init). --out holds the run "
                                    "and its latest checkpoint, which --model and transformers load; "
                                    "--resume continues it exactly. Ctrl-C saves and stops.")
    tr.add_argument("--data", metavar="DIR", help="the prepared data (default on --resume: the run's)")
    tr.add_argument("--out", required=True, metavar="DIR", help="the run's directory")
    start = tr.add_mutually_exclusive_group()
    start.add_argument("--init", metavar="MODEL", help=f"fine-tune this checkpoint: a path or a name ({_PRESET_NAMES})")
    start.add_argument("--config", metavar="PRESET_OR_JSON",
                       help=f"train from scratch a model of this shape: {_PRESET_NAMES}, or a config.json")
    tr.add_argument("--steps", type=_positive_int, help="optimizer steps in the run")
    tr.add_argument("--batch-size", type=_positive_int, help="rows per step (default: 8)")
    tr.add_argument("--seq-len", type=_positive_int, help="tokens per row (default: 256, or the model's "
                                                          "n_positions if less)")
    tr.add_argument("--lr", type=_positive_float, help="peak learning rate (default: 6e-4, or 3e-5 with --init)")
    tr.add_argument("--min-lr", type=_non_negative_float, help="learning rate at the end (default: lr / 10)")
    tr.add_argument("--warmup", type=_non_negative_int, help="linear warmup steps (default: steps / 10)")
    tr.add_argument("--weight-decay", type=_non_negative_float, help="on matrices and embeddings (default: 0.1)")
    tr.add_argument("--grad-clip", type=_non_negative_float, help="max global gradient norm, 0 for none (default: 1)")
    tr.add_argument("--eval-every", type=_positive_int, help="steps between validation losses and checkpoints "
                                                             "(default: steps / 10)")
    tr.add_argument("--eval-batches", type=_positive_int, help="batches of val.bin per validation (default: 20)")
    tr.add_argument("--seed", type=int, help="of the initialisation and the batches (default: 1337)")
    tr.add_argument("--threads", type=_positive_int, help="threads for the matrix products (default: one per core)")
    tr.add_argument("--dtype", choices=("float32", "float64"), help="compute dtype (default: float32)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--quiet", action="store_true", help="no progress line")

def _cmd_prepare(args):
    from ..data import prepare

    meta = prepare(args.files, args.out, val_fraction=args.val_fraction, progress=not args.quiet)
    print(f"{args.out}: train.bin {meta['train_tokens']:,} tokens, val.bin {meta['val_tokens']:,} tokens")


def _cmd_train(args):
    from ..train import TrainingInterrupted, train

    options = {key: getattr(args, key) for key in (
        "data", "out", "init", "config", "steps", "batch_size", "seq_len", "lr", "min_lr", "warmup", "weight_decay",
        "grad_clip", "eval_every", "eval_batches", "seed", "threads", "resume", "dtype")}
    try:
        history = train(**options, progress=not args.quiet)
    except TrainingInterrupted as exc:
        print(f"numpy-gpt2: {exc}", file=sys.stderr)
        raise SystemExit(130) from None
    last = history[-1]
    val = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
    loss = f"train loss {last['loss']:.4f}, " if "loss" in last else ""
    print(f"step {last['step']}: {loss}val loss {val:.4f}; saved to {args.out}")


COMMANDS = {"prepare": _cmd_prepare, "train": _cmd_train}
