"""The parallel layout of a run, as one pure object: built from the config, the world size and
the vocab, it checks the layout once (before anything is allocated; every error names the
numbers involved) and then answers, for any rank and without processes, what that rank is and
holds: sizes, coordinates, pipeline stages and model chunks, micro-batches, the STEM table
rows of a DP rank, and the ModelSpec of each of its chunks. Training builds its process groups
on its RankGrid (parallel/state.py) and its chunks from it (training/model_chunks.py); the dry run
(planning/dry_run.py) builds every rank's shard from it on the meta device; checkpoints take
their device meshes from its rank grid (checkpoint/model_state.py).

Ranks are numbered as megatron-core numbers them: `initialize_model_parallel(order=RANK_ORDER)`,
its default, lists the dimensions fastest first; context and expert parallelism are 1 here. So
global rank r = tp_rank + tp x (dp_rank + dp x pp_rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stem_megatron.config import ConfigError, RunConfig
from stem_megatron.model.transformer import ModelSpec, padded_vocab_size
from stem_megatron.modes import TableLayout
from stem_megatron.pipeline_split import (
    PipelineStage,
    chunk_stages,
    pipeline_stages,
    virtual_pipeline_size,
)
from stem_megatron.sharding import RowBlock

RANK_ORDER = "tp-cp-ep-dp-pp"  # megatron-core's order, fastest first (parallel/state.py)


@dataclass(frozen=True)
class RankCoords:
    tp: int
    pp: int
    dp: int


@dataclass(frozen=True)
class RankGrid:
    """`world_size` ranks as TP x DP x PP in megatron-core's order: the part of the layout the
    process groups need (the rest needs the model, parallel/state.py starts before it)."""

    world_size: int
    tp: int
    pp: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {self.world_size}")
        if self.world_size % (self.tp * self.pp):
            n = self.tp * self.pp
            raise ConfigError(
                f"world size {self.world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tp}) x pipeline_model_parallel_size ({self.pp}) = {n}; the "
                f"data-parallel size must be a whole number: use a multiple of {n} ranks"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def coords(self, rank: int) -> RankCoords:
        return RankCoords(
            tp=rank % self.tp, pp=rank // (self.tp * self.dp), dp=rank // self.tp % self.dp
        )

    def rank(self, coords: RankCoords) -> int:
        return coords.tp + self.tp * (coords.dp + self.dp * coords.pp)

    def stage_ranks(self, pp_rank: int) -> list[list[int]]:
        """The global ranks of pipeline stage `pp_rank` as a [dp][tp] grid."""
        return [
            [self.rank(RankCoords(tp, pp_rank, dp)) for tp in range(self.tp)]
            for dp in range(self.dp)
        ]


class GridSizes:
    """TP, PP and DP sizes read from `grid`: the layout and the process groups share them."""

    grid: RankGrid

    @property
    def tp_size(self) -> int:
        return self.grid.tp

    @property
    def pp_size(self) -> int:
        return self.grid.pp

    @property
    def dp_size(self) -> int:
        return self.grid.dp


@dataclass(frozen=True, eq=False)
class ParallelDims(GridSizes):
    """The layout of `config` on `world_size` ranks for a tokenizer of `vocab_size` tokens;
    raises ConfigError when it does not fit."""

    config: RunConfig
    world_size: int
    vocab_size: int
    grid: RankGrid = field(init=False)
    stages: tuple[PipelineStage, ...] = field(init=False)  # the pipeline stages
    num_microbatches: int = field(init=False)  # per rank and step: global / (micro x DP)
    _chunks: tuple[tuple[PipelineStage, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        m, p, t = self.config.model, self.config.parallel, self.config.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        grid = RankGrid(self.world_size, tp, pp)
        padded = padded_vocab_size(self.vocab_size, m.make_vocab_size_divisible_by)
        # Megatron's TP splits heads, KV groups and d_ff (STEM tables with it) and the padded
        # vocab of embedding and head; each must split evenly.
        for name, value in (
            ("model.num_attention_heads", m.num_attention_heads),
            ("model.num_query_groups", m.num_query_groups),
            ("model.ffn_hidden_size", m.ffn_hidden_size),
            ("the padded vocab size", padded),
        ):
            if value % tp:
                detail = (
                    f" (vocab {self.vocab_size} rounded up to a multiple of "
                    f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by})"
                    if value is padded
                    else ""
                )
                raise ConfigError(
                    f"tensor_model_parallel_size ({tp}) does not divide {name} ({value}){detail}"
                )
        stages = pipeline_stages(m.num_layers, pp, p.pipeline_layers)
        chunks = chunk_stages(self.config)
        dp = grid.dp
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
            )
        microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        if p.virtual_pipeline_model_parallel_size and microbatches % pp:
            # megatron-core's interleaved schedule runs micro-batches in groups of PP.
            raise ConfigError(
                f"the interleaved schedule (virtual_pipeline_model_parallel_size="
                f"{p.virtual_pipeline_model_parallel_size}) needs the micro-batches per step "
                f"({microbatches} = global_batch_size {t.global_batch_size} / (micro_batch_size "
                f"{t.micro_batch_size} x data-parallel size {dp})) to be a multiple of "
                f"pipeline_model_parallel_size ({pp})"
            )
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "stages", tuple(stages))
        object.__setattr__(self, "num_microbatches", microbatches)
        object.__setattr__(self, "_chunks", tuple(tuple(c) for c in chunks))

    @property
    def vp_size(self) -> int:
        """Model chunks per pipeline rank (1: no interleaving)."""
        return virtual_pipeline_size(self.config)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.config.model.make_vocab_size_divisible_by)

    @property
    def vocab_sharded(self) -> bool:
        """STEM tables split by rows over the DP ranks (a DP size of 1 holds every row)."""
        return self.config.stem.dp_layout == TableLayout.VOCAB_SHARDED and self.dp_size > 1

    @property
    def runs_whole_model(self) -> bool:
        """Neither TP nor PP splits the model: each rank runs the whole forward."""
        return self.tp_size == 1 and self.pp_size == 1

    def coords(self, rank: int) -> RankCoords:
        return self.grid.coords(rank)

    def chunk_stages(self, pp_rank: int) -> tuple[PipelineStage, ...]:
        """The stages of pipeline rank `pp_rank`'s model chunks, in chunk order."""
        return self._chunks[pp_rank]

    def table_rows(self, dp_rank: int) -> RowBlock | None:
        """The rows of each STEM table DP rank `dp_rank` holds (None: every row)."""
        return RowBlock.of(self.vocab_size, dp_rank, self.dp_size) if self.vocab_sharded else None

    def model_spec(self, stage: PipelineStage, tp_rank: int, dp_rank: int = 0) -> ModelSpec:
        """The chunk for `stage` as TP rank `tp_rank` and DP rank `dp_rank` build it."""
        c = self.config
        return ModelSpec(
            model=c.model,
            vocab_size=self.vocab_size,
            stem_layers=tuple(c.stem_layers()),
            tp_size=self.tp_size,
            tp_rank=tp_rank,
            pp_size=self.pp_size,
            vp_size=self.vp_size if self.vp_size > 1 else None,
            layers=stage.layers,
            vocab_shard=(dp_rank, self.dp_size) if self.vocab_sharded else None,
            pre_process=stage.pre_process,
            post_process=stage.post_process,
            bf16=c.train.bf16,
            sequence_parallel=c.parallel.sequence_parallel,
        )

    def rank_specs(self, coords: RankCoords) -> list[ModelSpec]:
        """One ModelSpec per model chunk of the rank at `coords`."""
        return [self.model_spec(s, coords.tp, coords.dp) for s in self.chunk_stages(coords.pp)]
