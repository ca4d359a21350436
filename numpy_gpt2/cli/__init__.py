"""The `numpy-gpt2` command line: generate, tokenize, info, convert, download (`inference`),
prepare, train (`training`), score, attention (`scoring`), serve (`serving`).

Every known error (GPT2Error, OSError, a bad flag) becomes one line on stderr and a non-zero
exit; anything else is a bug and keeps its traceback. Each module holds its commands' flags
beside the checks that must speak in those flags rather than in the Python parameters behind
them; what a command does is in the package module it calls.
"""

import os
import sys

from ..errors import GPT2Error
from . import inference, scoring, serving, training
from .common import _Parser

COMMANDS = {**inference.COMMANDS, **training.COMMANDS, **scoring.COMMANDS, **serving.COMMANDS}


def build_parser():
    from .. import __version__

    parser = _Parser(prog="numpy-gpt2", description="GPT-2 inference in plain NumPy.")
    parser.add_argument("--version", action="version", version=f"numpy-gpt2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for commands in (inference, training, scoring, serving):
        commands.add_commands(sub)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    from ..threads import choose_blas_kernels

    choose_blas_kernels()  # this process is the command's own: the BLAS kernels that fit this CPU
    try:
        COMMANDS[args.command](args)
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
