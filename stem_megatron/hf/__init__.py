"""Hugging Face import and export: config and weight-name mapping, our STEM modeling file.

Everything here works offline: HF_HUB_OFFLINE is set (unless the user set it) before any
module of this package imports transformers, so nothing asks the hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
