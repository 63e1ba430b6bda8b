"""stem_megatron: training STEM language models (arXiv 2601.10639) at scale."""

__version__ = "0.1.0"
