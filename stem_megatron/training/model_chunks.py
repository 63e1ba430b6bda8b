"""The pieces of the model this rank holds: one per virtual pipeline stage (one without
interleaving). Parameter names are global (layers keep their global numbers), so the chunks of
a rank together name their parameters exactly as the single-process model does."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from stem_megatron.config import RunConfig
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.parallel.dims import ParallelDims
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.storage import MmapFiles, check_host_fits, host_table_bytes
from stem_megatron.stem.table import is_stem_table


def build_model_chunks(
    config: RunConfig, parallel: ParallelState, vocab_size: int
) -> list[StemGPTModel]:
    """This rank's chunks, initialised from the seed (the same values as the matching
    parameters of the single-process model)."""
    dims = ParallelDims(config, parallel.world_size, vocab_size)
    if dims.grid != parallel.grid:
        raise ValueError(
            f"the process groups are TP {parallel.tp_size} x PP {parallel.pp_size}, the config "
            f"asks for TP {dims.tp_size} x PP {dims.pp_size}: initialise ParallelState with "
            f"the config's sizes"
        )
    specs = dims.rank_specs(parallel.coords)
    block = dims.table_rows(parallel.dp_rank)
    rows = vocab_size if block is None else block.end - block.start  # per table on this rank
    off_device = config.stem.storage in ("host", "mmap")
    files = table_files(config)
    if off_device:
        _check_tables_fit(config, parallel, rows, specs, files)
    chunks = []
    for spec in specs:
        chunk = StemGPTModel(spec)  # on the CPU: off-device tables never visit the device
        for table in chunk.stem_tables().values():
            table.dp_group = parallel.dp_group  # vocab-sharded lookups gather over it
            if off_device:
                table.move_to_host(parallel.device, files)
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


def table_files(config: RunConfig) -> MmapFiles | None:
    """Where `mmap`-tier tables and their optimizer state are mapped (None: other tiers)."""
    return MmapFiles(config.mmap_dir) if config.stem.storage == "mmap" else None


def _check_tables_fit(
    config: RunConfig,
    parallel: ParallelState,
    rows: int,
    specs: list[ModelSpec],
    files: MmapFiles | None,
) -> None:
    """Refuse host tables (with their optimizer state) of `rows` rows each larger than free
    host RAM, or mmap tables larger than the free disk, before any is allocated."""
    stem = set(config.stem_layers())
    tables = sum(1 for spec in specs for layer in spec.layers if layer in stem)
    width = config.model.ffn_hidden_size // parallel.tp_size
    exact = config.stem.optimizer.mode == "exact"
    what = (
        f"{tables} {config.stem.storage}-tier STEM tables of [{rows}, {width}] with their "
        f"optimizer state"
    )
    if files is None:
        check_host_fits(tables * host_table_bytes(rows, width, torch.float32, exact), what)
    else:  # exact mode's per-row steps stay in RAM; tables and moments are mapped
        files.check_fits(tables * host_table_bytes(rows, width, torch.float32, False), what)


def named_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for chunk in chunks:
        yield from chunk.named_parameters()


def named_modules(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Module]]:
    for chunk in chunks:
        yield from chunk.named_modules()
