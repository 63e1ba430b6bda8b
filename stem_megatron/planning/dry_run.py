"""Plan a run without running it: build every rank's shard of the real model on the meta device
(no memory allocated) for the config's TP/PP(/VP) layout on `world_size` ranks, in one
process, and report parameters and memory per rank type.

A rank's shard is what training builds for it: the ModelSpecs the layout (parallel/dims.py)
gives its coordinates, one model chunk per virtual pipeline stage, and under
`stem.dp_layout=vocab_sharded` STEM tables of only the rows its DP rank owns. DP ranks whose
blocks have the same number of rows hold shards of the same size, so one of them is built per
block size.

How one process builds rank r of a TP group of size t: megatron-core's parallel layers size
their shards from `get_pg_size(tp_group)` / `get_pg_rank(tp_group)` (megatron/core/utils.py),
which only call `tp_group.size()` and `tp_group.rank()`, and use the group as given as long as
torch.distributed is initialised (otherwise they fall back to size 1). So the dry run
initialises a world of one process and hands the model a `LayoutGroup` that answers those two
questions. It never communicates: a meta model is never run. `use_cpu_initialization=True`
makes megatron allocate with `torch.empty(...)` without a device argument, which the
`torch.device("meta")` context captures, and `perform_initialization=False` skips its CPU
initialiser; so every parameter lands on meta.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from stem_megatron.atomic_file import write_text_atomically
from stem_megatron.config import ConfigError, RunConfig
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.model.attention import cuda_plan
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.modes import TableOptimizerMode
from stem_megatron.parallel.dims import ParallelDims, RankCoords, RankGrid
from stem_megatron.planning.accounting import count_model
from stem_megatron.planning.activation_memory import ActivationSetup
from stem_megatron.planning.dense_memory import DenseSetup
from stem_megatron.planning.dry_run_format import format_report, report_json
from stem_megatron.planning.memory import ShardParams, count_shard, estimate_rank_memory
from stem_megatron.planning.report import DryRunReport, RankShard
from stem_megatron.planning.table_memory import TableSetup


@dataclass(frozen=True)
class LayoutGroup:
    """Rank `tp_rank` of a TP group of `tp_size`, as megatron's layer constructors see it."""

    tp_rank: int
    tp_size: int

    def rank(self) -> int:
        return self.tp_rank

    def size(self) -> int:
        return self.tp_size


@contextlib.contextmanager
def _one_process_world() -> Iterator[None]:
    """torch.distributed initialised for a world of one (in-memory store, no network), unless
    it already is; megatron reads an explicit tp_group only when it is."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_rank_shard(spec: ModelSpec) -> StemGPTModel:
    """The real model chunk of `spec` (a rank's, from ParallelDims.model_spec), all tensors on
    meta."""
    with _one_process_world(), torch.device("meta"):
        return StemGPTModel(spec, tp_group=LayoutGroup(spec.tp_rank, spec.tp_size))


def resolve_vocab_size(config: RunConfig) -> int:
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if not Path(config.data.tokenizer).exists():
        raise ConfigError(
            f"model.vocab_size is unset and the tokenizer "
            f"'{config.data.tokenizer}' does not exist: set model.vocab_size"
        )
    return load_tokenizer(config.data.tokenizer).vocab_size


def dp_ranks_by_block(dims: ParallelDims) -> list[tuple[int, ...]]:
    """DP ranks grouped by the number of table rows they hold, in rank order."""
    groups: dict[int, list[int]] = {}
    for rank in range(dims.dp_size):
        block = dims.table_rows(rank)
        rows = dims.vocab_size if block is None else block.end - block.start
        groups.setdefault(rows, []).append(rank)
    return [tuple(ranks) for ranks in groups.values()]


def _rank_params(specs: list[ModelSpec]) -> ShardParams:
    """Parameters of every chunk of one rank, each chunk built on meta and dropped in turn."""
    params = ShardParams(0, 0, 0, ())
    for spec in specs:
        params += count_shard(build_rank_shard(spec))
    return params


def dry_run(config: RunConfig, world_size: int | None = None) -> DryRunReport:
    """Validate the layout and build every distinct rank's shard on meta.
    `world_size` None: one model replica (TP x PP ranks)."""
    p, o, t, s = config.parallel, config.optim, config.train, config.stem
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world_size is not None:  # 0 is not "unset": refuse it before reading the tokenizer
        RankGrid(world_size, tp, pp)
    dims = ParallelDims(
        config, tp * pp if world_size is None else world_size, resolve_vocab_size(config)
    )
    dp, stem_layers = dims.dp_size, tuple(config.stem_layers())
    tables = TableSetup(
        vocab=dims.vocab_size,
        dp_size=dp,
        vocab_sharded=dims.vocab_sharded,
        storage=s.storage,
        exact=s.optimizer.mode == TableOptimizerMode.EXACT,
        cache_rows=s.cache_rows,
        ids_per_microbatch=t.micro_batch_size * config.model.seq_length,
        num_microbatches=dims.num_microbatches,
    )
    dense = DenseSetup(
        bf16=t.bf16,
        dp_size=dp,
        distributed_optimizer=o.use_distributed_optimizer,
        grad_reduce_in_fp32=p.grad_reduce_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        bucket_size=p.ddp_bucket_size,
        offload_fraction=o.optimizer_offload_fraction if o.optimizer_cpu_offload else 0.0,
    )
    # as attention runs on CUDA (model/attention.py)
    math_attention, repeated_kv = cuda_plan(
        t.bf16, config.model.hidden_size // config.model.num_attention_heads
    )
    activations = ActivationSetup(
        tp_size=tp,
        sequence_parallel=p.sequence_parallel,
        micro_batch_size=t.micro_batch_size,
        bf16=t.bf16,
        math_attention=math_attention,
        repeated_kv=repeated_kv,
    )
    ranks = []
    with _one_process_world():
        for pp_rank in range(pp):
            stages = dims.chunk_stages(pp_rank)
            for tp_rank in range(tp):
                for dp_ranks in dp_ranks_by_block(dims):
                    shard = _rank_params(dims.rank_specs(RankCoords(tp_rank, pp_rank, dp_ranks[0])))
                    memory = estimate_rank_memory(
                        shard,
                        config.model,
                        chunk_layers=tuple(len(c.layers) for c in stages),
                        post_process=stages[-1].post_process,
                        padded_vocab=dims.padded_vocab_size,
                        pp_rank=pp_rank,
                        pp_size=pp,
                        vp_size=dims.vp_size,
                        num_microbatches=dims.num_microbatches,
                        dense=dense,
                        activations=activations,
                        tables=tables,
                    )
                    ranks.append(
                        RankShard(
                            pp_rank,
                            tp_rank,
                            dp_ranks,
                            tuple(c.layers for c in stages),
                            tuple(i for c in stages for i in c.layers if i in stem_layers),
                            shard,
                            memory,
                        )
                    )
    counts = count_model(config.model, dims.vocab_size, stem_layers)
    return DryRunReport(name=config.name, layout=dims, counts=counts, ranks=tuple(ranks))


def run_dry_run(
    config: RunConfig, world_size: int | None = None, json_path: str | Path | None = None
) -> int:
    """Print the report (and write it as JSON to a new file); 2 with a message on a bad
    layout or an existing JSON path."""
    if json_path is not None and Path(json_path).exists():
        print(
            f"error: {json_path} already exists; choose a new --json path (it is never "
            f"overwritten)",
            file=sys.stderr,
        )
        return 2
    try:
        report = dry_run(config, world_size)
    except ConfigError as exc:
        print(f"layout error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report, config), flush=True)
    if json_path is not None:  # complete or absent
        write_text_atomically(json_path, json.dumps(report_json(report), indent=1) + "\n")
    return 0
