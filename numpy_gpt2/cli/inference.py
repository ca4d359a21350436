"""generate, tokenize, info, convert, download: the commands that run or describe a checkpoint."""

import os
import sys

import numpy as np

from ..errors import GPT2Error
from .common import (
    _PRESET_NAMES, _add_model_args, _check_context, _check_vocabulary, _model_and_tokenizer, _non_negative_int,
    _positive_int, _read_text, _resolve, _stop_text, _temperature, _top_p, _weights,
)


def add_commands(sub):
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


def _cmd_generate(args):
    prompt = _read_text(args.prompt, "prompt")
    if not prompt.strip():
        raise GPT2Error("the prompt is empty")
    if args.temperature == 0 and not args.greedy:
        raise GPT2Error("--temperature 0 samples nothing: for the most likely token at every step use --greedy")
    if args.threads is not None:
        from ..threads import set_threads

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
    from ..generate import stream_text

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


def _cmd_tokenize(args):
    from ..tokenizer import Tokenizer

    from ..weights.resolve import resolve_model

    text = _read_text(args.text, "text")
    tokenizer = Tokenizer.from_pretrained(None if args.model is None else resolve_model(args.model))
    ids = tokenizer.encode(text)
    if args.ids_only:
        print(" ".join(map(str, ids)))
        return
    for i, piece in zip(ids, tokenizer.pieces(ids)):
        print(f"{i}\t{piece!r}")


def _cmd_info(args):
    from ..model import GPT2
    from ..weights import load_checkpoint

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
    from ..convert import convert

    if args.weights == "int8" and args.dtype != "float32":
        raise GPT2Error(f"--weights int8 stores the matrices in int8 and the rest in float32; drop --dtype {args.dtype}")
    print(convert(_resolve(args.src, args.n_head), args.dst, dtype=args.dtype, n_head=args.n_head, force=args.force,
                  verify=args.verify, weights=args.weights))


def _cmd_download(args):
    from ..download import download, summary

    print(summary(download(args.name, args.dir, revision=args.revision, quiet=args.quiet)))


COMMANDS = {"generate": _cmd_generate, "tokenize": _cmd_tokenize, "info": _cmd_info, "convert": _cmd_convert, "download": _cmd_download}
