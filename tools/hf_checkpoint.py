#!/usr/bin/env python
"""`stem-hf` from a checkout (the code: stem_megatron/cli/hf_checkpoint.py)."""

import sys

from stem_megatron.cli.hf_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
