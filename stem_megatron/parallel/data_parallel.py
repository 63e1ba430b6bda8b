"""Data parallelism for the dense parameters: megatron-core's DistributedDataParallel.

It gives each model chunk contiguous grad buffers split into buckets, decides at backward time
whether a bucket reduces (so the pipeline schedules' "sync on the last micro-batch" holds under
PP x DP, which torch's DDP, deciding at forward time, broke), overlaps the reduction with the
backward when asked, and reduce-scatters instead for the distributed optimizer. Its
`finalize_model_grads`, run by the schedule after the last backward, also sums the tied
embedding's gradients over the first and last pipeline stages and, under sequence parallelism,
the norm weights' gradients over TP.

STEM tables stay outside: their gradients are row-sparse (stem/lookup.py) and synchronised by
stem/sync.py, so no [V, d_ff] buffer exists anywhere.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from stem_megatron.config import RunConfig
from stem_megatron.parallel.comm_meter import CommMeter
from stem_megatron.stem.table import is_stem_table


def ddp_config(config: RunConfig) -> DistributedDataParallelConfig:
    p = config.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=p.grad_reduce_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=config.optim.use_distributed_optimizer,
        bucket_size=p.ddp_bucket_size,
        check_for_nan_in_grad=True,
    )


@contextlib.contextmanager
def tables_hidden(modules: list[torch.nn.Module]):
    """megatron-core's DDP and optimizers take every parameter that requires grad; a STEM table
    must get neither a grad buffer nor dense optimizer state, so it does not require grad while
    they are built. It does again after: autograd must still record the lookup, whose backward
    hands rows to the table's accumulator."""
    tables = [p for module in modules for p in module.parameters() if is_stem_table(p)]
    for table in tables:
        table.requires_grad_(False)
    try:
        yield
    finally:
        for table in tables:
            table.requires_grad_(True)


def wrap_data_parallel(
    chunks: list[torch.nn.Module], config: RunConfig, meter: CommMeter | None = None
) -> list[DistributedDataParallel]:
    """Each model chunk in megatron-core's DDP over the data-parallel group (also at DP=1: the
    optimizers read its grad buffers), and the chunks' megatron config wired as Megatron-LM
    wires it for the schedules. `meter` counts the buckets' collectives as `dp-dense`."""
    settings = ddp_config(config)
    wrapped = []
    for index, chunk in enumerate(chunks):
        with tables_hidden([chunk]):
            # As Megatron-LM: only the first chunk's buckets overlap with the backward.
            ddp = DistributedDataParallel(
                chunk.config, settings, chunk, disable_bucketing=index > 0
            )
        if meter is not None:
            for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
                group.start_grad_sync = meter.attributed("dp-dense", group.start_grad_sync)
                group.start_param_sync = meter.attributed("dp-dense", group.start_param_sync)
        wrapped.append(ddp)
    megatron = chunks[0].config  # the one the schedules read
    if settings.overlap_grad_reduce:
        no_sync = [ddp.no_sync for ddp in wrapped]
        megatron.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        grad_sync = [ddp.start_grad_sync for ddp in wrapped]
        megatron.grad_sync_func = grad_sync if len(grad_sync) > 1 else grad_sync[0]
    megatron.finalize_model_grads_func = finalize_model_grads
    return wrapped


@contextlib.contextmanager
def nan_check_reported_as_divergence():
    """megatron-core DDP's `check_for_nan_in_grad` raises a RuntimeError naming the rank and
    the bucket whose local gradient is NaN or Inf; a run reports divergence as a
    FloatingPointError (one error line naming the fix), here with megatron's detail."""
    try:
        yield
    except RuntimeError as e:
        for kind in ("NaN", "Inf"):
            if f"found {kind} in local grad norm" in str(e):
                raise FloatingPointError(
                    f"gradient norm is {kind.lower()}: training diverged (lower optim.lr or "
                    f"check the data); megatron-core: {e}"
                ) from e
        raise


def zero_grad_buffers(wrapped: list[DistributedDataParallel]) -> None:
    for ddp in wrapped:
        ddp.zero_grad_buffer()
