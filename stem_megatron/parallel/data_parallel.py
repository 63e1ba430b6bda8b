"""Data parallelism for the dense parameters: torch's DistributedDataParallel over the
data-parallel group. STEM tables are excluded: their gradients are row-sparse and are
synchronised by stem/sync.py, never as dense buffers."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from stem_megatron.stem.table import is_stem_table


def wrap_data_parallel(chunks: list[torch.nn.Module], dp_group, dp_size: int,
                       comm_hook=None) -> list[torch.nn.Module]:
    """Each model chunk DDP-wrapped when dp_size > 1 (gradients averaged over the group).
    Gradient accumulation over micro-batches syncs only on the last one: megatron-core's
    schedules call `config.no_sync_func` (one per chunk when interleaved) for the others.
    `comm_hook`: DDP's bucket all-reduce (e.g. CommMeter.ddp_comm_hook, which counts it)."""
    if dp_size == 1:
        return list(chunks)
    wrapped = []
    for chunk in chunks:
        tables = [name for name, p in chunk.named_parameters() if is_stem_table(p)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(chunk, tables)
        ddp = DistributedDataParallel(chunk, process_group=dp_group, broadcast_buffers=False)
        if comm_hook is not None:
            ddp.register_comm_hook(dp_group, comm_hook)
        wrapped.append(ddp)
    no_sync = [w.no_sync for w in wrapped]
    chunks[0].config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
    return wrapped
