"""The command lines, one module each, installed as console scripts by pyproject.toml:

    stem-train         stem_megatron.train          train (also `python -m stem_megatron.train`)
    stem-estimate      estimate_memory              parameters and memory per rank, no GPU
    stem-generate      generate                     text from a checkpoint
    stem-convert       convert_checkpoint           reshard, to/from safetensors
    stem-inspect       inspect_checkpoint           a checkpoint's layout and table statistics
    stem-edit          edit_knowledge               swap/copy/average/inject table rows
    stem-hf            hf_checkpoint                Hugging Face import and export
    stem-preprocess    preprocess_data              text -> indexed train/val datasets
    stem-prepare-data  prepare_corpus               the bundled corpus, ready for `make train`

`tools/<module>.py` runs the same main() from a checkout, as the docs' commands do.
"""
