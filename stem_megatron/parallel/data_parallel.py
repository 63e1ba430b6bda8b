"""Data parallelism for the dense parameters: torch's DistributedDataParallel over the
data-parallel group. STEM tables are excluded: their gradients are row-sparse and are
synchronised by stem/sync.py, never as dense buffers."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from stem_megatron.stem.table import is_stem_table


def wrap_data_parallel(model: torch.nn.Module, dp_group, dp_size: int) -> torch.nn.Module:
    """DDP-wrapped `model` when dp_size > 1 (gradients averaged over the group), else `model`.
    Gradient accumulation over micro-batches syncs only on the last one (megatron-core's
    schedules call `config.no_sync_func` for the others)."""
    if dp_size == 1:
        return model
    tables = [name for name, p in model.named_parameters() if is_stem_table(p)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, tables)
    ddp = DistributedDataParallel(model, process_group=dp_group, broadcast_buffers=False)
    model.config.no_sync_func = ddp.no_sync
    return ddp
