"""`python -m numpy_gpt2`: the same as the `numpy-gpt2` command."""

import sys

from .cli import main

sys.exit(main())
