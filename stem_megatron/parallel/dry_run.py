"""Plan a run without running it: build every rank's shard of the real model on the meta device
(no memory allocated) for the config's TP/PP layout on `world_size` ranks, in one process, and
report parameters and memory per rank type.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from stem_megatron.config import ConfigError, RunConfig
from stem_megatron.model.accounting import ModelCounts, count_model
from stem_megatron.model.memory import (RankMemory, ShardParams, count_shard,
                                        estimate_rank_memory)
from stem_megatron.model.transformer import ModelSpec, StemGPTModel, padded_vocab_size
from stem_megatron.parallel.layout import ParallelLayout, validate_layout
from stem_megatron.parallel.pipeline_stages import PipelineStage


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


def build_rank_shard(config: RunConfig, vocab_size: int, stage: PipelineStage, tp_rank: int,
                     tp_size: int) -> StemGPTModel:
    """The real model of TP rank `tp_rank` on pipeline `stage`, all tensors on meta."""
    spec = ModelSpec(model=config.model, vocab_size=vocab_size,
                     stem_layers=tuple(config.stem_layers()), tp_size=tp_size, tp_rank=tp_rank,
                     layers=stage.layers, pre_process=stage.pre_process,
                     post_process=stage.post_process)
    with _one_process_world(), torch.device("meta"):
        return StemGPTModel(spec, tp_group=LayoutGroup(tp_rank, tp_size))


@dataclass(frozen=True)
class RankShard:
    stage: int
    tp_rank: int
    layers: tuple[int, ...]
    stem_layers: tuple[int, ...]
    params: ShardParams
    memory: RankMemory


@dataclass(frozen=True)
class DryRunReport:
    name: str
    layout: ParallelLayout
    vocab_size: int
    padded_vocab_size: int
    counts: ModelCounts
    stem_layers: tuple[int, ...]
    num_microbatches: int
    ranks: tuple[RankShard, ...]  # one per (stage, tp rank): every distinct model shard

    def rank_types(self) -> list[list[RankShard]]:
        """Shards grouped by stage and by identical numbers (TP ranks usually agree)."""
        groups: dict[tuple, list[RankShard]] = {}
        for r in self.ranks:
            groups.setdefault((r.stage, r.params, r.memory), []).append(r)
        return list(groups.values())


def resolve_vocab_size(config: RunConfig) -> int:
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if not Path(config.data.tokenizer).exists():
        raise ConfigError(f"model.vocab_size is unset and the tokenizer "
                          f"'{config.data.tokenizer}' does not exist: set model.vocab_size")
    from stem_megatron.data.tokenizer import load_tokenizer

    return load_tokenizer(config.data.tokenizer).vocab_size


def dry_run(config: RunConfig, world_size: int | None = None) -> DryRunReport:
    """Validate the layout and build every distinct rank's shard on meta.
    `world_size` None: one model replica (TP x PP ranks)."""
    p, t = config.parallel, config.train
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vocab = resolve_vocab_size(config)
    layout = validate_layout(config, world_size or tp * pp, vocab)
    stem_layers = tuple(config.stem_layers())
    padded = padded_vocab_size(vocab, config.model.make_vocab_size_divisible_by)
    ranks = []
    with _one_process_world():
        for stage in layout.stages:
            for tp_rank in range(tp):
                shard = count_shard(build_rank_shard(config, vocab, stage, tp_rank, tp))
                memory = estimate_rank_memory(
                    shard, config.model, num_layers=len(stage.layers),
                    post_process=stage.post_process, padded_vocab=padded, tp_size=tp,
                    pp_size=pp, dp_size=layout.dp_size, stage=stage.index,
                    micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                    bf16=t.bf16, table_mode=config.stem.optimizer.mode)
                ranks.append(RankShard(stage.index, tp_rank, stage.layers,
                                       tuple(i for i in stage.layers if i in stem_layers),
                                       shard, memory))
    return DryRunReport(
        name=config.name, layout=layout, vocab_size=vocab, padded_vocab_size=padded,
        counts=count_model(config.model, vocab, stem_layers), stem_layers=stem_layers,
        num_microbatches=t.global_batch_size // (t.micro_batch_size * layout.dp_size),
        ranks=tuple(ranks))


def replica_sums(report: DryRunReport) -> tuple[int, int]:
    """(dense, tables) over all shards of one replica, each TP-replicated parameter once."""
    tp = report.layout.tp_size
    dense = sum(r.params.dense - r.params.replicated for r in report.ranks)
    dense += sum(r.params.replicated for r in report.ranks) // tp
    return dense, sum(r.params.tables for r in report.ranks)


# -- output ----------------------------------------------------------------------------------

def _n(x: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(x)


def _gib(x: int) -> str:
    return f"{x / 2**30:.2f} GiB"


def _ranges(values: tuple[int, ...] | list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    out, values = [], list(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out) or "-"


def format_report(report: DryRunReport, config: RunConfig) -> str:
    lay, c, t = report.layout, report.counts, config.train
    dense_sum, table_sum = replica_sums(report)
    sums_ok = dense_sum + table_sum == c.total_params and table_sum == c.table_params
    tables = (f"{_n(c.table_params)} in {len(report.stem_layers)} STEM tables (layers "
              f"{_ranges(report.stem_layers)} of {config.model.num_layers})"
              if report.stem_layers else "no STEM tables")
    lines = [
        f"{report.name}: world {lay.world_size} = TP {lay.tp_size} x PP {lay.pp_size} x "
        f"DP {lay.dp_size}; vocab {report.vocab_size} (embedding/head padded to "
        f"{report.padded_vocab_size}); micro-batch {t.micro_batch_size} x seq "
        f"{config.model.seq_length}, {report.num_microbatches} micro-batches per step, "
        f"{'bf16 autocast' if t.bf16 else 'fp32'}",
        f"model: {_n(c.total_params)} total / {_n(c.active_params)} active parameters, "
        f"{tables}; {c.flops_per_token / 1e9:.2f} GFLOPs/token",
        f"per-rank sums over one replica: dense {_n(dense_sum)} + tables {_n(table_sum)} = "
        f"{_n(dense_sum + table_sum)} ({'equals' if sums_ok else 'DIFFERS FROM'} the model total)",
        "",
    ]
    groups = report.rank_types()
    header = [f"pp {g[0].stage} / tp {_ranges([r.tp_rank for r in g])}" for g in groups]
    rows: list[tuple[str, list[str]]] = [
        ("layers", [_ranges(g[0].layers) for g in groups]),
        ("STEM layers", [str(len(g[0].stem_layers)) for g in groups]),
        ("dense params", [_n(g[0].params.dense) for g in groups]),
        ("  of which TP-replicated (norms)", [_n(g[0].params.replicated) for g in groups]),
        ("table params", [_n(g[0].params.tables) for g in groups]),
        ("dense weights (fp32)", [_gib(g[0].memory.dense_weights) for g in groups]),
        ("dense grads (fp32" + (", + DDP buckets)" if lay.dp_size > 1 else ")"),
         [_gib(g[0].memory.dense_grads) for g in groups]),
        ("dense AdamW state (2 x fp32)", [_gib(g[0].memory.dense_optimizer) for g in groups]),
        ("STEM tables (fp32, tier device)", [_gib(g[0].memory.tables) for g in groups]),
        ("STEM AdamW state (2 x fp32, device)", [_gib(g[0].memory.table_optimizer)
                                                 for g in groups]),
        ("STEM row grads (worst case)", [_gib(g[0].memory.table_row_grads) for g in groups]),
        ("activations / micro-batch", [_gib(g[0].memory.activations_per_microbatch)
                                       for g in groups]),
        ("micro-batches in flight (1F1B)", [str(g[0].memory.microbatches_in_flight)
                                            for g in groups]),
        ("total", [_gib(g[0].memory.total) for g in groups]),
    ]
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(h), *(len(v[i]) for _, v in rows)) + 2 for i, h in enumerate(header)]
    lines.append("rank type".ljust(width) + "".join(h.rjust(w) for h, w in zip(header, cols)))
    for label, values in rows:
        lines.append(label.ljust(width) + "".join(v.rjust(w) for v, w in zip(values, cols)))
    lines += ["", "Activations: Korthikanti et al. 2022 (arXiv 2205.05198) adapted to SwiGLU/GQA, "
              "fused attention, no recomputation (stem_megatron/model/memory.py)."]
    host = max(g[0].memory.tables + g[0].memory.table_optimizer for g in groups)
    if host:
        lines.append(f"With stem.storage=host the tables and their AdamW state (up to "
                     f"{_gib(host)} per rank) move to pinned host RAM, leaving staging "
                     f"buffers of the rows a step reads on the device.")
    return "\n".join(lines)


def report_json(report: DryRunReport) -> dict[str, Any]:
    lay = report.layout
    dense_sum, table_sum = replica_sums(report)
    return {
        "name": report.name,
        "layout": {"world_size": lay.world_size, "tp": lay.tp_size, "pp": lay.pp_size,
                   "dp": lay.dp_size, "stages": [list(s.layers) for s in lay.stages]},
        "vocab_size": report.vocab_size, "padded_vocab_size": report.padded_vocab_size,
        "num_microbatches": report.num_microbatches,
        "counts": asdict(report.counts),
        "replica_sums": {"dense": dense_sum, "tables": table_sum},
        "ranks": [{"stage": r.stage, "tp_rank": r.tp_rank, "layers": list(r.layers),
                   "stem_layers": list(r.stem_layers),
                   "params": {"dense": r.params.dense, "replicated": r.params.replicated,
                              "tables": r.params.tables},
                   "memory_bytes": asdict(r.memory) | {"activations": r.memory.activations,
                                                       "total": r.memory.total}}
                  for r in report.ranks],
    }


def run_dry_run(config: RunConfig, world_size: int | None = None,
                json_path: str | Path | None = None) -> int:
    """Print the report (and write it as JSON); 2 with a message on a bad layout."""
    try:
        report = dry_run(config, world_size)
    except ConfigError as exc:
        print(f"layout error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report, config), flush=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report_json(report), indent=1) + "\n")
    return 0
