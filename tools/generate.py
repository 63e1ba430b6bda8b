#!/usr/bin/env python
"""`stem-generate` from a checkout (the code: stem_megatron/cli/generate.py)."""

import sys

from stem_megatron.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
