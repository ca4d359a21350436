"""`python -m numpy_gpt2` and the `numpy-gpt2` command: the command line, Ctrl-C one line at any time."""

import sys


def main() -> int:
    """Import and run the command line; Ctrl-C while its modules load (Numba's, NumPy's) exits 130 quietly."""
    try:
        from .cli import main as run

        return run()
    except KeyboardInterrupt:
        print("numpy-gpt2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
