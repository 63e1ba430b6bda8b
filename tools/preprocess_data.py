#!/usr/bin/env python
"""`stem-preprocess` from a checkout (the code: stem_megatron/cli/preprocess_data.py)."""

import sys

from stem_megatron.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
