#!/usr/bin/env python
"""`stem-inspect` from a checkout (the code: stem_megatron/cli/inspect_checkpoint.py)."""

import sys

from stem_megatron.cli.inspect_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
