# Makes the repository root importable for tests (stem_megatron, tools).
