"""What the dry run found: every distinct rank's shard with its parameters and memory, and the
layout it was planned for (planning/dry_run.py builds it, planning/dry_run_format.py prints it)."""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.parallel.dims import ParallelDims
from stem_megatron.planning.accounting import ModelCounts
from stem_megatron.planning.memory import RankMemory, ShardParams


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
    layout: ParallelDims
    counts: ModelCounts
    ranks: tuple[RankShard, ...]  # one per (stage, tp rank, table block size)

    @property
    def vp_size(self) -> int:
        return self.layout.vp_size

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.layout.padded_vocab_size

    @property
    def num_microbatches(self) -> int:
        return self.layout.num_microbatches

    @property
    def vocab_sharded(self) -> bool:
        return self.layout.vocab_sharded

    @property
    def stem_layers(self) -> tuple[int, ...]:
        return tuple(self.layout.config.stem_layers())

    @property
    def storage(self) -> str:
        return self.layout.config.stem.storage

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
