"""``python -m benchmarks``: the benchmark suite (see benchmarks/cli.py)."""

import sys

from .cli import main

sys.exit(main())
