#!/usr/bin/env python
"""`stem-prepare-data` from a checkout (the code: stem_megatron/cli/prepare_corpus.py)."""

import sys

from stem_megatron.cli.prepare_corpus import main

if __name__ == "__main__":
    sys.exit(main())
