#!/usr/bin/env python
"""`stem-convert` from a checkout (the code: stem_megatron/cli/convert_checkpoint.py)."""

import sys

from stem_megatron.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
