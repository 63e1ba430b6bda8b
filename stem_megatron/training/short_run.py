"""A short training run on one rank of a local job, reporting what layouts are compared by:
per-step losses, communication, the full (gathered) parameters and the layout it ran. Runs
inside processes started by stem_megatron.parallel.local_workers."""

from __future__ import annotations

import torch
import torch.distributed as dist

from stem_megatron.modes import TableLayout


def full_parameters(trainer) -> dict[str, torch.Tensor]:
    """This rank's parameters as full logical tensors (TP slices gathered)."""
    from stem_megatron.sharding import gather_full, get_row_block, get_tp_shard
    from stem_megatron.training.model_chunks import named_parameters

    parallel = trainer.parallel
    out = {}
    for name, param in named_parameters(trainer.chunks):
        shard = get_tp_shard(param)
        local = param.detach().contiguous()
        if shard is not None and parallel.tp_size > 1:
            slices = [torch.empty_like(local) for _ in range(parallel.tp_size)]
            dist.all_gather(slices, local, group=parallel.tp_group)
            local = gather_full(slices, shard)
        block = get_row_block(param)
        if block is not None:  # vocab-sharded table: rows live on the DP ranks
            longest = -(-block.rows // parallel.dp_size)
            padded = local.new_zeros(longest, local.shape[1])
            padded[: local.shape[0]] = local
            pieces = [torch.empty_like(padded) for _ in range(parallel.dp_size)]
            dist.all_gather(pieces, padded, group=parallel.dp_group)
            local = torch.cat(pieces)[: block.rows]
        out[name] = local.clone()
    return out


def built_layout(trainer) -> dict:
    """The layout this rank really runs, read from what was built (process groups, model
    chunks, tables), not from the config: a test comparing layouts checks it got the one it
    asked for."""
    parallel = trainer.parallel
    chunk_layers = [
        sorted(
            {
                int(name.split(".")[2])
                for name, _ in chunk.named_parameters()
                if name.startswith("decoder.layers.")
            }
        )
        for chunk in trainer.chunks
    ]
    return {
        "tp_rank": parallel.tp_rank,
        "tp_size": dist.get_world_size(parallel.tp_group),
        "pp_rank": parallel.pp_rank,
        "pp_size": dist.get_world_size(parallel.pp_group),
        "dp_rank": parallel.dp_rank,
        "dp_size": dist.get_world_size(parallel.dp_group),
        "vp_size": len(trainer.chunks),
        "chunk_layers": chunk_layers,
        "dp_layout": str(
            TableLayout.VOCAB_SHARDED if trainer.tables.vocab_sharded else TableLayout.REPLICATED
        ),
    }


def train_steps(overrides: list[str], steps: int, save_at: int | None = None) -> dict:
    """Build a Trainer from overrides, run `steps` optimizer steps (saving a checkpoint after
    step `save_at`), and report losses, comm metrics, full parameters and the layout built."""
    from stem_megatron.config_loader import load_config
    from stem_megatron.parallel.state import ParallelState
    from stem_megatron.training.trainer import Trainer

    config = load_config(None, overrides)
    parallel = ParallelState.initialize(
        config.parallel.tensor_model_parallel_size,
        config.parallel.pipeline_model_parallel_size,
        config.parallel.virtual_pipeline_model_parallel_size,
    )
    try:
        trainer = Trainer(config, parallel)
        start = trainer.step
        losses, comm, unique_rows = [], {}, 0
        for _ in range(steps):
            metrics = trainer.train_step()
            losses.append(metrics["loss/train"])
            comm = {k: v for k, v in metrics.items() if k.startswith("comm/")}
            unique_rows = metrics["stem/unique_rows"]
            if save_at is not None and trainer.step == save_at:
                trainer.state.save(trainer.checkpointer, trainer.step, config)
        tables = sum(t.weight.numel() for t in trainer.tables.tables.values())
        dense = sum(p.numel() for p in trainer.optimizer.params)
        return {
            "start": start,
            "losses": losses,
            "params": full_parameters(trainer),
            "comm": comm,
            "unique_rows": unique_rows,
            "counts": {"table_params": tables, "dense_params": dense},
            "layout": built_layout(trainer),
        }
    finally:
        parallel.destroy()
