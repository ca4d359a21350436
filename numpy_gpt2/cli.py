"""The `numpy-gpt2` command line: generate, tokenize, info, convert, download, prepare, train,
score, attention.

Every known error (GPT2Error, OSError, a bad flag) becomes one line on stderr and a non-zero
exit; anything else is a bug and keeps its traceback. One module for all nine subcommands
(about 600 lines): their flags, and the checks that must speak in flags rather than in the
Python parameters behind them, read best side by side; what a command does is in its module.
"""

import argparse
import concurrent.futures
import os
import sys

import numpy as np

from .errors import GPT2Error

_PRESET_NAMES = "gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, not usage text plus the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, found {text}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, found {text}")
    return value


def _temperature(text):
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, found {text}")
    return value


def _top_p(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], found {text}")
    return value


def _stop_text(text):
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (an empty TEXT would stop at once)")
    return text


for _f, _name in ((_positive_int, "positive integer"), (_non_negative_int, "integer >= 0"),
                  (_temperature, "temperature"), (_top_p, "top-p"), (_stop_text, "stop text")):
    _f.__name__ = _name  # argparse names the type in its "invalid ... value" message


def _add_model_args(parser):
    parser.add_argument("--model", default=None,
                        help="a directory (config.json + model.safetensors, or OpenAI's "
                             "hparams.json + model.ckpt.*), a .safetensors file, or a name "
                             f"({_PRESET_NAMES}) found in weights/NAME/ or the Hugging Face "
                             "cache, or fortunes, the small model installed with numpy-gpt2 "
                             "(default: gpt2 if found, else fortunes)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="compute dtype (default: float32)")
    parser.add_argument("--weights", choices=("float32", "bfloat16", "int8"), default=None,
                        help="how the weight matrices are kept: float32, bfloat16 (half the bytes, faster "
                             "decoding) or int8 (a quarter of the bytes, fastest); computing stays float32 "
                             "(default: a bfloat16 or int8 file's own, else float32)")
    parser.add_argument("--n-head", type=_positive_int, default=None,
                        help="number of heads, for a bare .safetensors file of no preset size")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="numpy-gpt2", description="GPT-2 inference in plain NumPy.")
    parser.add_argument("--version", action="version", version=f"numpy-gpt2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="continue a prompt",
                         description="Continue PROMPT (or standard input) with GPT-2.")
    gen.add_argument("prompt", nargs="?", help="the prompt (UTF-8); read from stdin when omitted, less one "
                                                "trailing newline, the one `echo` adds")
    _add_model_args(gen)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=50, help="default: 50")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--temperature", type=_temperature, default=1.0, help="default: 1.0")
    gen.add_argument("--top-k", type=_non_negative_int, default=50, help="default: 50; 0 disables")
    gen.add_argument("--top-p", type=_top_p, default=None, help="nucleus sampling, in (0, 1]")
    gen.add_argument("--seed", type=_non_negative_int, default=None,
                     help="seed for sampling, an integer >= 0 (same seed, same text)")
    gen.add_argument("--stop", action="append", type=_stop_text, default=None, metavar="TEXT",
                     help="stop once the generated text contains TEXT (repeatable)")
    gen.add_argument("--no-eos", action="store_true", help="do not stop at <|endoftext|>")
    gen.add_argument("--threads", type=_positive_int, default=None,
                     help="threads for the matrix products (default: one per core)")
    stream = gen.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="print tokens as they come (default on a terminal)")
    stream.add_argument("--no-stream", dest="stream", action="store_false",
                        help="print the text once it is complete")

    tok = sub.add_parser("tokenize", help="print the token ids of a text",
                         description="Print the GPT-2 token ids of TEXT (or standard input), "
                                     "one per line with its piece.")
    tok.add_argument("text", nargs="?", help="the text (UTF-8); read from stdin when omitted, less one "
                                             "trailing newline, as generate reads its prompt")
    tok.add_argument("--model", default=None, help="a model directory with its own vocab.json + merges.txt")
    tok.add_argument("--ids-only", action="store_true", help="print only the ids, space-separated")

    info = sub.add_parser("info", help="describe a checkpoint",
                          description="Describe the checkpoint MODEL: its file and size, parameter count, "
                                      "dtype and config (vocab_size, n_positions, n_embd, n_layer, n_head, "
                                      "...).")
    _add_model_args(info)
    info.add_argument("--verify", action="store_true",
                      help="also check every tensor's checksum (TensorFlow's crc32c; the other formats "
                           "store none, and their sizes are always checked)")

    conv = sub.add_parser("convert", help="write a checkpoint as a Hugging Face directory or llm.c .bin",
                          description="Convert SRC (a Hugging Face directory, .safetensors file, OpenAI "
                                      "TensorFlow directory, llm.c .bin, PyTorch .bin/.pt state dict, or "
                                      "a name) to DST: a Hugging Face directory (config.json, "
                                      "model.safetensors, vocab.json, merges.txt), or an llm.c "
                                      "checkpoint when DST ends in .bin.")
    conv.add_argument("src", help="the checkpoint to read")
    conv.add_argument("dst", help="the directory to write, or a .bin path for llm.c")
    conv.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                      help="stored dtype (default: float32; float16 halves the file; llm.c: float32 or bfloat16)")
    conv.add_argument("--weights", choices=("int8",), default=None,
                      help="int8: the matrices quantized once (groups of 32, llama.cpp's q8_0) into a file a "
                           "quarter the size that numpy-gpt2 loads as int8 weights; transformers cannot load it")
    conv.add_argument("--n-head", type=_positive_int, default=None,
                      help="number of heads, for a bare weight file of no preset size")
    conv.add_argument("--force", action="store_true", help="overwrite a model already at DST")
    conv.add_argument("--verify", action="store_true",
                      help="check every tensor of SRC against its checksum first (TensorFlow's crc32c)")

    dl = sub.add_parser("download", help="fetch a checkpoint from the Hugging Face hub",
                        description="Download NAME (a published name or a hub repo id such as "
                                    "user/my-gpt2) into weights/NAME/: config.json, model.safetensors "
                                    "and the tokenizer files, each checked against the hub's checksum. "
                                    "Needs huggingface_hub; honours HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE.")
    dl.add_argument("name", help=f"{_PRESET_NAMES}, or a hub repo id")
    dl.add_argument("--dir", default=None, help="where to put the files (default: weights/NAME, NAME "
                                                "being the last part of the repo id)")
    dl.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    dl.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_training_commands(sub)
    _add_score_command(sub)
    _add_attention_command(sub)
    _add_serve_command(sub)
    return parser


def _add_serve_command(sub):
    srv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                         description="Serve GPT-2 over HTTP: /v1/completions, /v1/chat/completions, "
                                     "/v1/models, /health, and a page to try it at /.")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=_non_negative_int, default=8000, help="default: 8000; 0 picks a free port")
    srv.add_argument("--max-batch", type=_positive_int, default=4,
                     help="requests decoded together in one step (default: 4)")
    srv.add_argument("--max-queue", type=_positive_int, default=16,
                     help="requests waiting for a place before new ones get 429 (default: 16)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    srv.add_argument("--threads", type=_positive_int, default=None,
                     help="threads for the matrix products (default: one per core)")


def _cmd_serve(args):
    from .serve import serve

    if args.threads is not None:
        from .threads import set_threads

        set_threads(args.threads)
    path, weights = _resolve(args.model, args.n_head), _weights(args)

    def load():
        from .model import GPT2
        from .tokenizer import Tokenizer

        model = GPT2.from_pretrained(path, dtype=args.dtype, n_head=args.n_head, weights=weights)
        name = args.model or os.path.basename(os.path.normpath(path))
        return model, Tokenizer.from_pretrained(path), name

    serve(load, args.host, args.port, args.api_key, args.max_batch, args.max_queue)


def _fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), found {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, found {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, found {text}")
    return value


for _f, _name in ((_fraction, "fraction"), (_non_negative_float, "number >= 0"), (_positive_float, "number > 0")):
    _f.__name__ = _name


def _add_training_commands(sub):
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


def _read_text(arg, what):
    """The argument, else standard input less one trailing newline (the one `echo` adds); UTF-8 only."""
    if arg is not None:
        return _utf8(os.fsencode(arg), f"the {what}")
    if sys.stdin is None or sys.stdin.isatty():
        raise GPT2Error(f"no {what}: give it as an argument or on standard input")
    stdin = getattr(sys.stdin, "buffer", None)
    text = sys.stdin.read() if stdin is None else _utf8(stdin.read(), f"the {what} on standard input")
    return text.removesuffix("\n")


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GPT2Error(f"{what} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None


def _resolve(model, n_head):
    """--model as a path; refuses --n-head where the checkpoint's own config sets the heads."""
    from .weights.resolve import default_model, resolve_model

    if model is None:
        path, note = default_model()
        if note:
            print(f"numpy-gpt2: {note}", file=sys.stderr)
    else:
        path = resolve_model(model)
    if os.path.isfile(path) and path.endswith(".json"):
        raise GPT2Error(f"{path}: --model takes the model's directory (config.json + model.safetensors) or its "
                        f".safetensors file, not a .json file; give --model {os.path.dirname(path) or '.'}")
    if n_head is not None:
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        for name in ("config.json", "hparams.json"):
            config = os.path.join(directory, name)
            if os.path.isfile(config):
                raise GPT2Error(f"--n-head: {config} sets the number of heads; --n-head is only for a "
                                "bare weight file with no config beside it")
    return path


def _check_vocabulary(ids, vocab_size, what):
    if max(ids) >= vocab_size:
        raise GPT2Error(f"{what} has token {max(ids)}, outside the model's vocabulary of {vocab_size}")


def _cmd_generate(args):
    prompt = _read_text(args.prompt, "prompt")
    if not prompt.strip():
        raise GPT2Error("the prompt is empty")
    if args.temperature == 0 and not args.greedy:
        raise GPT2Error("--temperature 0 samples nothing: for the most likely token at every step use --greedy")
    if args.threads is not None:
        from .threads import set_threads

        set_threads(args.threads)
    model, tokenizer = _model_and_tokenizer(args)
    ids = tokenizer.encode(prompt)
    _check_vocabulary(ids, model.config.vocab_size, "the prompt")
    _check_context(len(ids), args.max_new_tokens, model.config.n_positions)
    options = dict(
        max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=args.stop,
    )
    if args.no_eos:
        options["eos_token_id"] = None
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    from .generate import stream_text

    pieces = stream_text(model, tokenizer, np.array(ids), **options)
    sys.stdout.write(prompt)
    if stream:
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    else:
        sys.stdout.write("".join(pieces))
    sys.stdout.write("\n")


def _model_and_tokenizer(args, kernels=True):
    """--model, --n-head, --dtype, --weights -> the GPT2 and its Tokenizer. kernels: whether the command
    runs the compiled kernels (the first run then says it compiles them), not only `trace`."""
    from .model import GPT2
    from .tokenizer import Tokenizer

    path = _resolve(args.model, args.n_head)
    if kernels:
        _say_if_compiling()
    # The tokenizer's files are parsed while the weights are copied, mostly outside the GIL.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tokenizer = pool.submit(Tokenizer.from_pretrained, path)
        model = GPT2.from_pretrained(path, dtype=args.dtype, n_head=args.n_head, weights=_weights(args))
        return model, tokenizer.result()


def _weights(args):
    """--weights, checked against --dtype in the CLI's own terms."""
    weights = getattr(args, "weights", None)  # the commands without the flag load as the file stores
    if args.dtype == "float64" and weights not in (None, "float32"):
        raise GPT2Error(f"--weights {weights} computes in float32: --dtype float64 needs --weights float32")
    return weights


def _say_if_compiling():
    """On a terminal, one stderr line when no kernel has a Numba cache yet: the first run compiles them."""
    if not sys.stderr.isatty():
        return
    from numba.core.dispatcher import Dispatcher

    # Numba keeps where each function's cache index goes on its dispatcher (cache=True sets it).
    indexes = [getattr(getattr(getattr(f, "_cache", None), "_cache_file", None), "_index_path", None)
               for name, module in list(sys.modules.items()) if name.startswith("numpy_gpt2.")
               for f in vars(module).values() if isinstance(f, Dispatcher)]
    indexes = [path for path in indexes if path]
    if indexes and not any(os.path.exists(path) for path in indexes):
        print("numpy-gpt2: compiling kernels, first run only", file=sys.stderr, flush=True)


def _check_context(T, max_new_tokens, P):
    """generate's context check, in the CLI's flags: T prompt tokens, P = n_positions."""
    if T >= P:
        raise GPT2Error(f"prompt of {T} tokens is too long for the model's context of n_positions={P}; "
                        f"shorten it to at most {P - 1} tokens")
    if T + max_new_tokens > P:
        raise GPT2Error(f"prompt of {T} tokens + --max-new-tokens {max_new_tokens} exceeds the model's context of "
                        f"n_positions={P}; shorten the prompt or ask for at most {P - T} new tokens")


def _cmd_tokenize(args):
    from .tokenizer import Tokenizer

    from .weights.resolve import resolve_model

    text = _read_text(args.text, "text")
    tokenizer = Tokenizer.from_pretrained(None if args.model is None else resolve_model(args.model))
    ids = tokenizer.encode(text)
    if args.ids_only:
        print(" ".join(map(str, ids)))
        return
    for i, piece in zip(ids, tokenizer.pieces(ids)):
        print(f"{i}\t{piece!r}")


def _cmd_info(args):
    from .model import GPT2
    from .weights import load_checkpoint

    checkpoint = load_checkpoint(_resolve(args.model, args.n_head), n_head=args.n_head, verify=args.verify)
    if args.verify:
        print(f"verified {len(checkpoint.tensors)} tensors")
    model = GPT2.from_checkpoint(checkpoint, dtype=args.dtype, weights=_weights(args))
    c = model.config
    size = os.path.getsize(model.path) if os.path.isfile(model.path) else None
    lines = [
        ("file", model.path + (f" ({size / 2**20:.1f} MiB)" if size else "")),
        ("parameters", f"{model.num_parameters():,}"),
        ("dtype", str(model.dtype)),
        ("weights", f"{model.weights} ({_matrix_bytes(model) / 2**20:.1f} MiB of matrices in memory)"),
        ("vocab_size", c.vocab_size), ("n_positions", c.n_positions), ("n_embd", c.n_embd),
        ("n_layer", c.n_layer), ("n_head", c.n_head), ("n_inner", c.inner_dim),
        ("layer_norm_epsilon", c.layer_norm_epsilon), ("activation_function", c.activation_function),
    ]
    for key, value in lines:
        print(f"{key:20} {value}")


def _matrix_bytes(model) -> int:
    """Bytes of the weight matrices the model holds: the blocks' and the tied head."""
    matrices = [model.wte] + [lin.weight for b in model.h
                              for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    return sum(m.nbytes for m in matrices)


def _cmd_convert(args):
    from .convert import convert

    if args.weights == "int8" and args.dtype != "float32":
        raise GPT2Error(f"--weights int8 stores the matrices in int8 and the rest in float32; drop --dtype {args.dtype}")
    print(convert(_resolve(args.src, args.n_head), args.dst, dtype=args.dtype, n_head=args.n_head, force=args.force,
                  verify=args.verify, weights=args.weights))


def _cmd_download(args):
    from .download import download, summary

    print(summary(download(args.name, args.dir, revision=args.revision, quiet=args.quiet)))


def _cmd_prepare(args):
    from .data import prepare

    meta = prepare(args.files, args.out, val_fraction=args.val_fraction, progress=not args.quiet)
    print(f"{args.out}: train.bin {meta['train_tokens']:,} tokens, val.bin {meta['val_tokens']:,} tokens")


def _cmd_train(args):
    from .train import TrainingInterrupted, train

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


def _cmd_score(args):
    from . import score

    if args.threads is not None:
        from .threads import set_threads

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
            from .plots import check_png_path, require_matplotlib

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
            from .plots import plot_token_logprobs

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
        from .cluster import score_on_dask

        if args.weights is not None:
            raise GPT2Error("--weights is not passed to Dask's workers, which load the file as it is stored; "
                            "convert it first (numpy-gpt2 convert SRC DST --weights int8) and give --model DST")
        from .weights import load_checkpoint

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
    from .plots import check_png_path, plot_attention, require_matplotlib

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


_COMMANDS = {"generate": _cmd_generate, "tokenize": _cmd_tokenize, "info": _cmd_info, "convert": _cmd_convert,
             "download": _cmd_download, "prepare": _cmd_prepare, "train": _cmd_train, "score": _cmd_score,
             "attention": _cmd_attention, "serve": _cmd_serve}


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    from .threads import choose_blas_kernels

    choose_blas_kernels()  # this process is the command's own: the BLAS kernels that fit this CPU
    try:
        _COMMANDS[args.command](args)
    except (GPT2Error, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            # The reader went away (`| head`): stop quietly, as other Unix tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        print(f"numpy-gpt2: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("numpy-gpt2: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
