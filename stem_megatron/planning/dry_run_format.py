"""The dry run's report as a table (one column per rank type) and as JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from stem_megatron.config import RunConfig
from stem_megatron.planning.report import DryRunReport, RankShard


def _n(x: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return str(x)


def _gib(x: int) -> str:
    """GiB, or MiB below 0.1 GiB (a small buffer should not read as 0.00 GiB)."""
    if 0 < x < 0.1 * 2**30:
        return f"{x / 2**20:.2f} MiB"
    return f"{x / 2**30:.2f} GiB"


def ranges(values: tuple[int, ...] | list[int]) -> str:
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


Row = tuple[str, Callable[["RankShard"], str]]


def _rows(report: DryRunReport, config: RunConfig) -> list[Row | str]:
    """Table rows (label, value of a rank type); a bare string is a section heading. Rows that
    do not apply to this config (e.g. staging buffers of device tables) are left out."""
    s, dp = config.stem, report.layout.dp_size
    interleaved = report.vp_size > 1
    off_device = s.storage != "device"
    counters = " + int64 step/row" if s.optimizer.mode == "exact" else ""
    full_recompute = config.model.recompute_granularity == "full"

    def t(r: RankShard):
        return r.memory.tables

    rows: list[Row | str] = [
        ("layers" + (" (all chunks)" if interleaved else ""), lambda r: ranges(r.layers)),
        ("STEM layers", lambda r: str(len(r.stem_layers))),
        ("dense params", lambda r: _n(r.params.dense)),
        ("  of which TP-replicated (norms)", lambda r: _n(r.params.replicated)),
        ("table params", lambda r: _n(r.params.tables)),
    ]
    if any(r.params.tied_copy for r in report.ranks):
        rows.insert(-1, ("  of which tied-embedding copy", lambda r: _n(r.params.tied_copy)))
    if report.vocab_sharded:
        rows.append(
            (
                "table rows held (of each table)",
                lambda r: str(r.params.table_shapes[0][0]) if r.params.table_shapes else "-",
            )
        )
    rows += ["on the device"] + _dense_rows(config, dp)
    resident = [
        ("STEM tables (fp32)", lambda r: _gib(t(r).weights)),
        (
            f"STEM AdamW state (2 x fp32{counters})",
            lambda r: _gib(t(r).optimizer + t(r).step_counters),
        ),
    ]
    if not off_device and report.stem_layers:
        rows += resident
    if report.stem_layers:
        rows += [
            ("STEM row grads (held, worst case)", lambda r: _gib(t(r).row_grads)),
            ("STEM row-grad peak (1 table, transient)", lambda r: _gib(t(r).grad_transient)),
        ]
    if off_device:
        rows.append(("STEM staging buffers (2 per table)", lambda r: _gib(t(r).staging_device)))
    if s.cache_rows:
        rows.append(
            (f"STEM hot-row cache ({s.cache_rows} rows)", lambda r: _gib(t(r).cache_device))
        )
    rows += [
        (
            "activations / chunk pass (largest)" if interleaved else "activations / micro-batch",
            lambda r: _gib(r.memory.activations_per_pass),
        ),
        (
            "chunk passes in flight (interleaved)"
            if interleaved
            else "micro-batches in flight (1F1B)",
            lambda r: str(r.memory.passes_in_flight),
        ),
        (
            "head" + (" or recomputed region" if full_recompute else "") + " (once)",
            lambda r: _gib(r.memory.activations_once),
        ),
        ("activations at the peak", lambda r: _gib(r.memory.activations)),
        ("device total", lambda r: _gib(r.memory.device_total)),
    ]
    if not off_device and not config.optim.optimizer_cpu_offload:
        return rows
    rows.append("in host RAM")
    if config.optim.optimizer_cpu_offload:
        rows.append(_offload_row(config))
    if s.storage == "host":
        rows += resident
    elif counters and off_device:
        rows.append(("STEM step counters (int64/row)", lambda r: _gib(t(r).step_counters)))
    if off_device:
        rows += [
            ("STEM staging buffers (host side)", lambda r: _gib(t(r).staging_host)),
            ("row grads copied for the update", lambda r: _gib(t(r).update_copy_host)),
        ]
    if s.cache_rows:
        rows.append(("hot-row cache id map", lambda r: _gib(t(r).cache_host)))
    rows.append(("host total", lambda r: _gib(r.memory.host_total)))
    if s.storage == "mmap":
        rows += [
            "in mmap files on disk",
            ("STEM tables (fp32)", lambda r: _gib(t(r).weights)),
            ("STEM AdamW state (2 x fp32)", lambda r: _gib(t(r).optimizer)),
            ("mmap total", lambda r: _gib(r.memory.mmap_total)),
        ]
    return rows


def _dense_rows(config: RunConfig, dp: int) -> list[Row]:
    """Dense parameters in megatron-core's DDP buffers and optimizer (planning/dense_memory.py)."""
    o, bf16 = config.optim, config.train.bf16
    dtype = "bf16" if bf16 else "fp32"
    grads = "fp32" if config.parallel.grad_reduce_in_fp32 or not bf16 else "bf16"
    shard = ", 1/DP shard" if o.use_distributed_optimizer and dp > 1 else ""
    offloaded = f", {1 - o.optimizer_offload_fraction:g} of it" if o.optimizer_cpu_offload else ""

    def d(r: RankShard):
        return r.memory.dense

    rows: list[Row] = [
        (
            f"dense weights ({dtype}"
            + (", DDP param buffer)" if o.use_distributed_optimizer else ")"),
            lambda r: _gib(d(r).weights),
        ),
        (f"dense grads (DDP grad buffer, {grads})", lambda r: _gib(d(r).grads)),
    ]
    if bf16:
        rows.append((f"fp32 main params{shard}", lambda r: _gib(d(r).main_params)))
    if bf16 and grads == "bf16":
        rows.append(
            (f"fp32 grad copies{shard} (in the step only)", lambda r: _gib(d(r).main_grads))
        )
    rows.append(
        (f"dense Adam moments (2 x fp32{shard}{offloaded})", lambda r: _gib(d(r).optimizer))
    )
    return rows


def _offload_row(config: RunConfig) -> Row:
    fraction = config.optim.optimizer_offload_fraction
    return (
        f"dense optimizer offload ({fraction:g}: fp32 param, grad, 2 moments)",
        lambda r: _gib(r.memory.dense.host),
    )


def _table(report: DryRunReport, config: RunConfig) -> list[str]:
    groups = report.rank_types()
    header = []
    for g in groups:
        name = f"pp {g[0].stage} / tp {ranges(sorted({r.tp_rank for r in g}))}"
        if report.vocab_sharded:
            name += f" / dp {ranges(sorted({d for r in g for d in r.dp_ranks}))}"
        header.append(name)
    # A heading is a row without values.
    rows = [
        (row, []) if isinstance(row, str) else (row[0], [row[1](g[0]) for g in groups])
        for row in _rows(report, config)
    ]
    width = max(len(label) for label, values in rows if values) + 2
    cols = [max(len(h), *(len(v[i]) for _, v in rows if v)) + 2 for i, h in enumerate(header)]
    lines = ["rank type".ljust(width) + "".join(h.rjust(w) for h, w in zip(header, cols))]
    for label, values in rows:
        lines.append(
            label.ljust(width) + "".join(v.rjust(w) for v, w in zip(values, cols))
            if values
            else f"-- {label} --"
        )
    return lines


def _notes(report: DryRunReport, config: RunConfig) -> list[str]:
    pp, vp = report.layout.pp_size, report.vp_size
    notes = [
        "Activations: Korthikanti et al. 2022 (arXiv 2205.05198) adapted to SwiGLU, GQA, "
        "fused attention and torch's fused RMSNorm (CUDA), with sequence parallelism and "
        "recomputation as configured; calibrated on CPU against the tensors autograd "
        "keeps (stem_megatron/planning/activation_memory.py). Dense: megatron-core's DDP "
        "buffers and optimizer, padding included (stem_megatron/planning/dense_memory.py)."
    ]
    if vp > 1:
        notes.append(
            f"Interleaved 1F1B: pipeline rank r holds megatron-core's 2(pp-r-1) + "
            f"(v-1)pp warmup chunk passes plus one; on rank 0 that is "
            f"L(1 + (pp-1)/(pp v)) = {1 + (pp - 1) / (pp * vp):.3f} L layers' "
            f"activations, Megatron's interleaving factor."
        )
    if report.stem_layers:
        exchange = (
            "the lookup's all-gather/reduce-scatter" if report.vocab_sharded else "the DP sync"
        )
        notes.append(
            f"STEM row grads: worst case, every id of a micro-batch distinct up to "
            f"the rows that exist; the accumulator merges the micro-batches' chunks "
            f"once they pass twice its last merge, so it holds at most about twice "
            f"the step's distinct rows. The "
            f"peak row is one table's reduce or {exchange}, one table at a time "
            f"(stem_megatron/planning/table_memory.py). The device total adds every "
            f"peak: an upper bound."
        )
    if report.storage == "device" and report.stem_layers:
        resident = max(
            r.memory.tables.weights + r.memory.tables.optimizer + r.memory.tables.step_counters
            for r in report.ranks
        )
        notes.append(
            f"stem.storage=host would move the tables and their AdamW state (up to "
            f"{_gib(resident)} per rank) to host RAM, leaving staging buffers on the "
            f"device (rerun with it to see them)."
        )
    return notes


def _precision(config: RunConfig) -> str:
    """The run's precision, optimizer, SP and recomputation, by Megatron's names."""
    m, p, o = config.model, config.parallel, config.optim
    parts = ["bf16 (fp32 main params)" if config.train.bf16 else "fp32"]
    if o.use_distributed_optimizer:
        parts.append(
            "distributed optimizer"
            + (f" offloading {o.optimizer_offload_fraction:g}" if o.optimizer_cpu_offload else "")
        )
    if p.sequence_parallel:
        parts.append("sequence parallel")
    if m.recompute_granularity == "full":
        parts.append(f"full recompute ({m.recompute_method}, {m.recompute_num_layers})")
    elif m.recompute_granularity == "selective":
        parts.append("selective recompute")
    return ", ".join(parts)


def format_report(report: DryRunReport, config: RunConfig) -> str:
    lay, c, t, s = report.layout, report.counts, config.train, config.stem
    dense_sum, table_sum = report.replica_sums()
    sums_ok = dense_sum + table_sum == c.total_params and table_sum == c.table_params
    tables = (
        f"{_n(c.table_params)} in {len(report.stem_layers)} STEM tables (layers "
        f"{ranges(report.stem_layers)} of {config.model.num_layers})"
        if report.stem_layers
        else "no STEM tables"
    )
    interleave = (
        f"; interleaved, {report.vp_size} chunks per pipeline rank" if report.vp_size > 1 else ""
    )
    lines = [
        f"{report.name}: world {lay.world_size} = TP {lay.tp_size} x PP {lay.pp_size} x "
        f"DP {lay.dp_size}{interleave}; vocab {report.vocab_size} (embedding/head padded to "
        f"{report.padded_vocab_size}); micro-batch {t.micro_batch_size} x seq "
        f"{config.model.seq_length}, {report.num_microbatches} micro-batches per step, "
        f"{_precision(config)}",
        f"model: {_n(c.total_params)} total / {_n(c.active_params)} active parameters, "
        f"{tables}; {c.flops_per_token / 1e9:.2f} GFLOPs/token",
    ]
    if report.stem_layers:
        sharding = (
            "vocab_sharded: each DP rank holds its block of rows"
            if report.vocab_sharded
            else "replicated: every DP rank holds all rows"
        )
        cache = f", hot-row cache {s.cache_rows} rows" if s.cache_rows else ""
        lines.append(
            f"STEM tables: {sharding}; storage {s.storage}{cache}; optimizer {s.optimizer.mode}"
        )
    over = (
        f": dense {_n(dense_sum)} over one replica + tables {_n(table_sum)} over every DP "
        f"rank's blocks"
        if report.vocab_sharded
        else f" over one replica: dense {_n(dense_sum)} + tables {_n(table_sum)}"
    )
    lines += [
        f"per-rank sums{over} = {_n(dense_sum + table_sum)} "
        f"({'equals' if sums_ok else 'DIFFERS FROM'} the model total)",
        "",
    ]
    return "\n".join(lines + _table(report, config) + [""] + _notes(report, config))


def report_json(report: DryRunReport) -> dict[str, Any]:
    lay = report.layout
    dense_sum, table_sum = report.replica_sums()
    return {
        "name": report.name,
        "layout": {
            "world_size": lay.world_size,
            "tp": lay.tp_size,
            "pp": lay.pp_size,
            "dp": lay.dp_size,
            "vp": report.vp_size,
            "stages": [list(s.layers) for s in lay.stages],
        },
        "stem": {"vocab_sharded": report.vocab_sharded, "storage": report.storage},
        "vocab_size": report.vocab_size,
        "padded_vocab_size": report.padded_vocab_size,
        "num_microbatches": report.num_microbatches,
        "counts": asdict(report.counts),
        "replica_sums": {"dense": dense_sum, "tables": table_sum},
        "ranks": [
            {
                "stage": r.stage,
                "tp_rank": r.tp_rank,
                "dp_ranks": list(r.dp_ranks),
                "chunks": [list(c) for c in r.chunks],
                "stem_layers": list(r.stem_layers),
                "params": {
                    "dense": r.params.dense,
                    "replicated": r.params.replicated,
                    "tables": r.params.tables,
                },
                "memory_bytes": asdict(r.memory)
                | {
                    "device_total": r.memory.device_total,
                    "host_total": r.memory.host_total,
                    "mmap_total": r.memory.mmap_total,
                },
            }
            for r in report.ranks
        ],
    }
