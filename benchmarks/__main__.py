"""`python -m benchmarks [options]`: run the benchmark suite; see `--help`."""

import sys

from .runner import main

sys.exit(main())
