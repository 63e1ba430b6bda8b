#!/usr/bin/env python
"""`stem-estimate` from a checkout (the code: stem_megatron/cli/estimate_memory.py)."""

import sys

from stem_megatron.cli.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
