#!/usr/bin/env python
"""`stem-edit` from a checkout (the code: stem_megatron/cli/edit_knowledge.py)."""

import sys

from stem_megatron.cli.edit_knowledge import main

if __name__ == "__main__":
    sys.exit(main())
