"""Plan a run without running it: build every rank's shard of the real model on the meta device
(no memory allocated) for the config's TP/PP(/VP) layout on `world_size` ranks, in one
process, and report parameters and memory per rank type.

A rank's shard is what training builds for it (training/model_chunks.py): one model chunk per
virtual pipeline stage (pipeline_split.py), and under `stem.dp_layout=vocab_sharded`
STEM tables of only the rows its DP rank owns. DP ranks whose blocks have the same number of
rows hold shards of the same size, so one of them is built per block size.

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
from stem_megatron.model.transformer import ModelSpec, StemGPTModel, padded_vocab_size
from stem_megatron.parallel.layout import ParallelLayout, validate_layout
from stem_megatron.pipeline_split import PipelineStage, chunk_stages, virtual_pipeline_size
from stem_megatron.planning.accounting import ModelCounts, count_model
from stem_megatron.planning.activation_memory import ActivationSetup
from stem_megatron.planning.dense_memory import DenseSetup
from stem_megatron.planning.dry_run_format import format_report, report_json
from stem_megatron.planning.memory import RankMemory, ShardParams, count_shard, estimate_rank_memory
from stem_megatron.planning.table_memory import TableSetup
from stem_megatron.sharding import RowBlock


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


def build_rank_shard(
    config: RunConfig,
    vocab_size: int,
    stage: PipelineStage,
    tp_rank: int,
    tp_size: int,
    vocab_shard: tuple[int, int] | None = None,
) -> StemGPTModel:
    """The real model chunk of TP rank `tp_rank` for pipeline (or virtual) `stage`, all
    tensors on meta; `vocab_shard` (dp_rank, dp_size): vocab-sharded STEM tables."""
    vp = virtual_pipeline_size(config)
    spec = ModelSpec(
        model=config.model,
        vocab_size=vocab_size,
        stem_layers=tuple(config.stem_layers()),
        tp_size=tp_size,
        tp_rank=tp_rank,
        pp_size=config.parallel.pipeline_model_parallel_size,
        vp_size=vp if vp > 1 else None,
        layers=stage.layers,
        vocab_shard=vocab_shard,
        pre_process=stage.pre_process,
        post_process=stage.post_process,
    )
    with _one_process_world(), torch.device("meta"):
        return StemGPTModel(spec, tp_group=LayoutGroup(tp_rank, tp_size))


@dataclass(frozen=True)
class RankShard:
    stage: int  # pipeline rank
    tp_rank: int
    dp_ranks: tuple[int, ...]  # the DP ranks whose shard this is (all of them unless sharded)
    chunks: tuple[tuple[int, ...], ...]  # global layers of each model chunk
    stem_layers: tuple[int, ...]
    params: ShardParams  # all chunks together
    memory: RankMemory

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(layer for chunk in self.chunks for layer in chunk))


@dataclass(frozen=True)
class DryRunReport:
    name: str
    layout: ParallelLayout
    vp_size: int
    vocab_size: int
    padded_vocab_size: int
    counts: ModelCounts
    stem_layers: tuple[int, ...]
    num_microbatches: int
    vocab_sharded: bool  # tables split by rows over DP ranks
    storage: str
    ranks: tuple[RankShard, ...]  # one per (stage, tp rank, table block size)

    def rank_types(self) -> list[list[RankShard]]:
        """Shards grouped by stage and by identical numbers (TP ranks usually agree)."""
        groups: dict[tuple, list[RankShard]] = {}
        for r in self.ranks:
            groups.setdefault((r.stage, r.params, r.memory), []).append(r)
        return list(groups.values())

    def replica_sums(self) -> tuple[int, int]:
        """(dense over one replica, each TP-replicated parameter once and a tied embedding's
        copy not at all; tables over the ranks that together hold each table once: one
        replica, or every DP rank when sharded)."""
        tp = self.layout.tp_size
        one_block = [r for r in self.ranks if 0 in r.dp_ranks]
        dense = sum(r.params.dense - r.params.replicated - r.params.tied_copy for r in one_block)
        dense += sum(r.params.replicated for r in one_block) // tp
        if self.vocab_sharded:
            return dense, sum(r.params.tables * len(r.dp_ranks) for r in self.ranks)
        return dense, sum(r.params.tables for r in self.ranks)


def resolve_vocab_size(config: RunConfig) -> int:
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if not Path(config.data.tokenizer).exists():
        raise ConfigError(
            f"model.vocab_size is unset and the tokenizer "
            f"'{config.data.tokenizer}' does not exist: set model.vocab_size"
        )
    from stem_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(config.data.tokenizer).vocab_size


def dp_ranks_by_block(rows: int, dp_size: int) -> list[tuple[int, ...]]:
    """DP ranks grouped by the size of their RowBlock of `rows` rows, in rank order."""
    groups: dict[int, list[int]] = {}
    for rank in range(dp_size):
        block = RowBlock.of(rows, rank, dp_size)
        groups.setdefault(block.end - block.start, []).append(rank)
    return [tuple(ranks) for ranks in groups.values()]


def _rank_params(
    config: RunConfig,
    vocab: int,
    stages: list[PipelineStage],
    tp_rank: int,
    tp: int,
    vocab_shard: tuple[int, int] | None,
) -> ShardParams:
    """Parameters of every chunk of one rank, each chunk built on meta and dropped in turn."""
    params = ShardParams(0, 0, 0, ())
    for stage in stages:
        params += count_shard(build_rank_shard(config, vocab, stage, tp_rank, tp, vocab_shard))
    return params


def dry_run(config: RunConfig, world_size: int | None = None) -> DryRunReport:
    """Validate the layout and build every distinct rank's shard on meta.
    `world_size` None: one model replica (TP x PP ranks)."""
    p, o, t, s = config.parallel, config.optim, config.train, config.stem
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world_size is not None and world_size < 1:  # 0 is not "unset": say so, plan nothing
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    vocab = resolve_vocab_size(config)
    layout = validate_layout(config, tp * pp if world_size is None else world_size, vocab)
    per_rank_stages = chunk_stages(config)
    vp, dp = virtual_pipeline_size(config), layout.dp_size
    stem_layers = tuple(config.stem_layers())
    padded = padded_vocab_size(vocab, config.model.make_vocab_size_divisible_by)
    num_microbatches = layout.num_microbatches
    sharded = s.dp_layout == "vocab_sharded" and dp > 1  # as training/model_chunks.py
    tables = TableSetup(
        vocab=vocab,
        dp_size=dp,
        vocab_sharded=sharded,
        storage=s.storage,
        exact=s.optimizer.mode == "exact",
        cache_rows=s.cache_rows,
        ids_per_microbatch=t.micro_batch_size * config.model.seq_length,
        num_microbatches=num_microbatches,
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
    activations = ActivationSetup(
        tp_size=tp,
        sequence_parallel=p.sequence_parallel,
        micro_batch_size=t.micro_batch_size,
        bf16=t.bf16,
    )
    dp_groups = dp_ranks_by_block(vocab, dp) if sharded else [tuple(range(dp))]
    ranks = []
    with _one_process_world():
        for pp_rank, stages in enumerate(per_rank_stages):
            for tp_rank in range(tp):
                for dp_ranks in dp_groups:
                    shard = _rank_params(
                        config, vocab, stages, tp_rank, tp, (dp_ranks[0], dp) if sharded else None
                    )
                    memory = estimate_rank_memory(
                        shard,
                        config.model,
                        chunk_layers=tuple(len(c.layers) for c in stages),
                        post_process=stages[-1].post_process,
                        padded_vocab=padded,
                        pp_rank=pp_rank,
                        pp_size=pp,
                        vp_size=vp,
                        num_microbatches=num_microbatches,
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
    return DryRunReport(
        name=config.name,
        layout=layout,
        vp_size=vp,
        vocab_size=vocab,
        padded_vocab_size=padded,
        counts=count_model(config.model, vocab, stem_layers),
        stem_layers=stem_layers,
        num_microbatches=num_microbatches,
        vocab_sharded=sharded,
        storage=s.storage,
        ranks=tuple(ranks),
    )


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
