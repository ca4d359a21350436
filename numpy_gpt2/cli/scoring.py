"""score, attention: how likely a text is, one or many documents, and pictures of the inside."""

import os
import sys

import numpy as np

from ..errors import GPT2Error
from .common import (
    _add_model_args, _check_vocabulary, _model_and_tokenizer, _non_negative_int, _positive_int, _read_text,
    _resolve, _utf8,
)


def add_commands(sub):
    _add_score_command(sub)
    _add_attention_command(sub)


def _add_score_command(sub):
    sc = sub.add_parser("score", help="how likely a text is: log-probabilities, perplexity",
                        description="Score one text: print its tokens, negative log-likelihood (nats), perplexity "
                                    "and bits per byte. With --out DIR, score every document of JSON Lines files "
                                    "instead, one row each in input order, into DIR (one file per partition; a "
                                    "rerun skips the partitions already written). Texts longer than the model's "
                                    "context are read through a sliding window.")
    sc.add_argument("inputs", nargs="*", metavar="INPUT",
                    help="one text: a FILE (UTF-8), - or nothing for standard input (less one trailing newline), "
                         "or the text itself; with --out: JSON Lines files or quoted globs ('data/*.jsonl')")
    _add_model_args(sc)
    sc.add_argument("--stride", type=_positive_int, default=None,
                    help="how far the window moves on a text longer than the model's context, less than the "
                         "context (default: 512, or half the context if that is less)")
    sc.add_argument("--threads", type=_positive_int, default=None,
                    help="threads for the matrix products (default: one per core)")
    one = sc.add_argument_group("one text")
    one.add_argument("--per-token", action="store_true",
                     help="a table of every scored token: position, id, piece, log-prob")
    one.add_argument("--top-k", type=_positive_int, metavar="K",
                     help="with each token the K most likely ones and their log-probs (implies --per-token)")
    one.add_argument("--json", action="store_true", help="print one JSON object")
    one.add_argument("--plot", metavar="FILE.png", help="draw each token's log-prob (needs matplotlib)")
    many = sc.add_argument_group("many documents")
    many.add_argument("--out", metavar="DIR", help="score the documents of the JSON Lines INPUTs into DIR")
    many.add_argument("--id-field", metavar="NAME", help="each line's id field (default: id; missing: FILE:LINE)")
    many.add_argument("--text-field", metavar="NAME", help="each line's text field (default: text)")
    many.add_argument("--on-error", choices=("skip", "fail"),
                      help="a bad line: skip writes an error row and goes on, fail stops (default: skip)")
    many.add_argument("--format", choices=("jsonl", "parquet"), help="output files (default: jsonl; parquet "
                                                                      "needs pyarrow)")
    many.add_argument("--partition-size", type=_positive_int, metavar="N",
                      help="input lines per output file (default: 1000)")
    many.add_argument("--dask", metavar="ADDRESS", help="score on a Dask cluster: tcp://HOST:PORT of its "
                                                         "scheduler, or local:N for N worker processes here")
    many.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_attention_command(sub):
    att = sub.add_parser("attention", help="draw a layer's attention weights over a text (needs matplotlib)",
                         description="Draw the attention weights of --layer over TEXT (or standard input) as a "
                                     "heat map, the tokens on both axes (rows: queries, columns: keys), into "
                                     "a PNG file: one head, or all heads as a grid. Needs matplotlib.")
    att.add_argument("text", nargs="?", help="the text (UTF-8); read from stdin when omitted, less one "
                                             "trailing newline, as generate reads its prompt")
    att.add_argument("--layer", type=_non_negative_int, required=True, help="the layer, counting from 0")
    att.add_argument("--head", type=_non_negative_int, default=None,
                     help="the head, counting from 0 (default: all heads, as a grid)")
    att.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write")
    _add_model_args(att)

def _cmd_score(args):
    from .. import score

    if args.threads is not None:
        from ..threads import set_threads

        set_threads(args.threads)
    one, many = ("per_token", "top_k", "json", "plot"), ("id_field", "text_field", "on_error", "format",
                                                         "partition_size", "dask")
    misplaced = [name for name in (many if args.out is None else one) if getattr(args, name) not in (None, False)]
    if misplaced:
        flag = "--" + misplaced[0].replace("_", "-")
        raise GPT2Error(f"{flag} is for many documents: give --out DIR" if args.out is None
                        else f"{flag} is for one text; with --out each document gets one row")
    if args.out is None:
        if len(args.inputs) > 1:
            raise GPT2Error("give one text (a FILE, - or the text itself), or JSON Lines files with --out DIR")
        if args.plot:
            from ..plots import check_png_path, require_matplotlib

            # Before the scoring, in the flag's name.
            check_png_path(args.plot, "--plot")
            require_matplotlib("--plot")
        text = _score_input(args.inputs[0] if args.inputs else None)
        model, tokenizer = _model_and_tokenizer(args)
        _check_stride(args.stride, model.config.n_positions)
        if args.top_k and args.top_k > model.config.vocab_size:
            raise GPT2Error(f"--top-k {args.top_k} exceeds the model's vocabulary of {model.config.vocab_size}")
        result = score.score_text(model, tokenizer, text, stride=args.stride, top_k=args.top_k or 0)
        print(score.report(result, tokenizer, per_token=args.per_token or bool(args.top_k), as_json=args.json))
        if args.plot:
            from ..plots import plot_token_logprobs

            if result.tokens == 0:
                raise GPT2Error(f"--plot: the text is {len(result.ids)} token{'s' * (len(result.ids) != 1)}, "
                                "so no token is scored and there is nothing to draw")
            plot_token_logprobs(tokenizer.pieces(result.ids[1:]), result.logprobs, args.plot)
        return
    if not args.inputs:
        raise GPT2Error("--out DIR needs the JSON Lines files to score")
    options = score.ScoreOptions(id_field=args.id_field or "id", text_field=args.text_field or "text",
                                 stride=args.stride, on_error=args.on_error or "skip", out_format=args.format or "jsonl",
                                 partition_size=args.partition_size or 1000, dtype=args.dtype)
    if args.dask is not None:
        from ..cluster import score_on_dask

        if args.weights is not None:
            raise GPT2Error("--weights is not passed to Dask's workers, which load the file as it is stored; "
                            "convert it first (numpy-gpt2 convert SRC DST --weights int8) and give --model DST")
        from ..weights import load_checkpoint

        path = _resolve(args.model, args.n_head)
        _check_stride(args.stride, load_checkpoint(path, n_head=args.n_head).config.n_positions)
        outputs = score_on_dask(args.inputs, args.out, args.dask, path, options, progress=not args.quiet)
    else:
        model, tokenizer = _model_and_tokenizer(args)
        _check_stride(args.stride, model.config.n_positions)
        outputs = score.score_files(model, tokenizer, args.inputs, args.out, options, progress=not args.quiet,
                                    bad_line=lambda error: print(f"numpy-gpt2: {error}", file=sys.stderr))
    print(f"{args.out}: {len(outputs)} partition file{'s' * (len(outputs) != 1)}, in input order")


def _score_input(arg):
    """score's one INPUT -> the text: standard input (no INPUT or -), a file's contents, or the
    argument itself; a JSON Lines file asks for --out."""
    if arg is None or arg == "-":
        return _read_text(None, "text")
    if os.path.isfile(arg):
        if arg.endswith(".jsonl"):
            raise GPT2Error(f"{arg} is JSON Lines: give --out DIR to score its documents, one row each")
        with open(arg, "rb") as f:
            return _utf8(f.read(), arg)
    return _read_text(arg, "text")


def _check_stride(stride, n_positions):
    if stride is not None and stride >= n_positions:
        raise GPT2Error(f"--stride {stride} must be less than the model's context, n_positions={n_positions} "
                        f"(each window keeps some of the last as context)")


def _cmd_attention(args):
    from ..plots import check_png_path, plot_attention, require_matplotlib

    check_png_path(args.out, "--out")
    require_matplotlib("numpy-gpt2 attention")
    text = _read_text(args.text, "text")
    if not text:
        raise GPT2Error("the text is empty")
    model, tokenizer = _model_and_tokenizer(args, kernels=False)  # trace is plain NumPy
    c = model.config
    if args.layer >= c.n_layer:
        raise GPT2Error(f"--layer {args.layer} is out of range: the model has {c.n_layer} layers, "
                        f"--layer 0 to {c.n_layer - 1}")
    if args.head is not None and args.head >= c.n_head:
        raise GPT2Error(f"--head {args.head} is out of range: the model has {c.n_head} heads per layer, "
                        f"--head 0 to {c.n_head - 1}")
    ids = tokenizer.encode(text)
    _check_vocabulary(ids, c.vocab_size, "the text")
    if len(ids) > c.n_positions:
        raise GPT2Error(f"the text is {len(ids)} tokens, more than the model's context of n_positions="
                        f"{c.n_positions}; shorten it to at most {c.n_positions} tokens")
    weights = model.trace(np.array(ids)).attentions[args.layer][0]
    plot_attention(weights, tokenizer.pieces(ids), args.out, args.layer, args.head)
    heads = f"head {args.head}" if args.head is not None else f"all {c.n_head} heads"
    print(f"{args.out}: attention weights of layer {args.layer}, {heads}, over {len(ids)} tokens")


COMMANDS = {"score": _cmd_score, "attention": _cmd_attention}
