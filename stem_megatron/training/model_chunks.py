"""The pieces of the model this rank holds: one per virtual pipeline stage (one without
interleaving). Parameter names are global (layers keep their global numbers), so the chunks of
a rank together name their parameters exactly as the single-process model does."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from stem_megatron.model.transformer import StemGPTModel
from stem_megatron.parallel.dims import ParallelDims
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.placement import TablePlacement
from stem_megatron.stem.table import is_stem_table


def build_model_chunks(dims: ParallelDims, parallel: ParallelState) -> list[StemGPTModel]:
    """This rank's chunks of the layout `dims`, initialised from the seed (the same values as
    the matching parameters of the single-process model)."""
    config, vocab_size = dims.config, dims.vocab_size
    if dims.grid != parallel.grid:
        raise ValueError(
            f"the process groups are TP {parallel.tp_size} x PP {parallel.pp_size}, the config "
            f"asks for TP {dims.tp_size} x PP {dims.pp_size}: initialise ParallelState with "
            f"the config's sizes"
        )
    specs = dims.rank_specs(parallel.coords)
    block = dims.table_rows(parallel.dp_rank)
    rows = vocab_size if block is None else block.end - block.start  # per table on this rank
    placement = TablePlacement.of(config, parallel.device)
    stem = set(config.stem_layers())
    tables = sum(1 for spec in specs for layer in spec.layers if layer in stem)
    placement.check_fits(tables, rows, config.model.ffn_hidden_size // parallel.tp_size)
    chunks = []
    for spec in specs:
        chunk = StemGPTModel(spec)  # on the CPU: off-device tables never visit the device
        placement.place(chunk)
        chunk = chunk.to(parallel.device)
        chunk.init_parameters(config.train.seed)  # in place, wherever each tensor lives
        if config.train.bf16:
            _cast_dense_parameters(chunk, torch.bfloat16)
        chunks.append(chunk)
    return chunks


def _cast_dense_parameters(chunk: torch.nn.Module, dtype: torch.dtype) -> None:
    """Megatron's bf16: dense weights (initialised in fp32) in `dtype`; the optimizer keeps
    fp32 main copies. STEM tables keep fp32 rows: each row's update is its own."""
    for param in chunk.parameters():
        if not is_stem_table(param):
            param.data = param.data.to(dtype)


def named_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for chunk in chunks:
        yield from chunk.named_parameters()


def named_modules(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Module]]:
    for chunk in chunks:
        yield from chunk.named_modules()
