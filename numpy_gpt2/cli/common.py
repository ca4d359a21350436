"""What the subcommands share: the argument parser that fails in one line, the flags' value
types, --model and the model it names, the text of an argument or standard input, and the
checks that must speak in flags."""

import argparse
import concurrent.futures
import os
import sys

from ..errors import GPT2Error

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


def _add_model_args(parser):
    parser.add_argument("--model", default=None,
                        help="a directory (config.json + model.safetensors, or OpenAI's "
                             "hparams.json + model.ckpt.*), a .safetensors file, or a name "
                             f"({_PRESET_NAMES}) found in weights/NAME/ or the Hugging Face "
                             "cache, or fortunes, the small model installed with numpy-gpt2 "
                             "(default: gpt2 if found, else fortunes)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="compute dtype (default: float32)")
    parser.add_argument("--weights", choices=("float32", "bfloat16", "float16", "int8"), default=None,
                        help="how the weight matrices are kept: float32, bfloat16 or float16 (half the "
                             "bytes, faster decoding) or int8 (a quarter of the bytes, fastest); computing "
                             "stays float32 (default: a bfloat16, float16 or int8 file's own, else float32)")
    parser.add_argument("--n-head", type=_positive_int, default=None,
                        help="number of heads, for a bare .safetensors file of no preset size")


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
    from ..weights.resolve import default_model, resolve_model

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


def _model_and_tokenizer(args, kernels=True):
    """--model, --n-head, --dtype, --weights -> the GPT2 and its Tokenizer. kernels: whether the command
    runs the compiled kernels (the first run then says it compiles them), not only `trace`."""
    from ..model import GPT2
    from ..tokenizer import Tokenizer

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
