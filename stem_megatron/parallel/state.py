"""The running side of the parallel layout: this process's rank, its device and its process
groups, built on a RankGrid (parallel/dims.py) that gives the sizes and every rank's
coordinates.

megatron-core keeps its process groups in module globals (`parallel_state`); this is the
only module of ours that initialises or tears them down. Everything else receives a
`ParallelState` and asks it for ranks, sizes, groups and the device.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from stem_megatron.parallel import cpu_compat
from stem_megatron.parallel.dims import RANK_ORDER, GridSizes, RankCoords, RankGrid

DEVICE_VAR = "STEM_DEVICE"  # "cpu": gloo on the CPU even where CUDA is present


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def choose_device(local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK where CUDA is present, else the CPU. STEM_DEVICE=cpu asks for the CPU:
    the offline tools' local workers (parallel/local_workers.py), which may outnumber the GPUs."""
    wanted = os.environ.get(DEVICE_VAR, "")
    if wanted not in ("", "cpu"):
        raise ValueError(f"{DEVICE_VAR} must be 'cpu' or unset, got {wanted!r}")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:
        raise ValueError(
            f"local rank {local_rank} has no GPU: this node has {gpus}; start at most {gpus} "
            f"processes per node"
        )
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class ParallelState(GridSizes):
    rank: int
    grid: RankGrid
    device: torch.device

    @property
    def world_size(self) -> int:
        return self.grid.world_size

    @property
    def coords(self) -> RankCoords:
        """This rank's place in the grid: megatron-core's groups follow the same order."""
        return self.grid.coords(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def pp_last_rank(self) -> int:
        """Global rank of the last pipeline stage in this rank's pipeline."""
        return parallel_state.get_pipeline_model_parallel_last_rank()

    @property
    def embedding_group(self) -> dist.ProcessGroup:
        """The first and last pipeline stages: they share a tied embedding."""
        return parallel_state.get_embedding_group()

    @property
    def model_parallel_group(self) -> dist.ProcessGroup:
        """TP x PP: the ranks that together hold one replica of the model."""
        return parallel_state.get_model_parallel_group()

    @property
    def runs_whole_model(self) -> bool:
        """Each rank runs the whole model's forward: neither TP nor PP splits it. (Under the
        vocab-sharded table layout its STEM lookups still gather rows over the DP group.)"""
        return self.tp_size == 1 and self.pp_size == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def initialize(
        cls,
        tp_size: int = 1,
        pp_size: int = 1,
        vp_size: int | None = None,
        timeout_s: float = 600.0,
    ) -> ParallelState:
        """Join (or create) the process group from torchrun/SLURM variables, then build
        megatron-core's TP/PP/DP groups. Without launcher variables: a world of one."""
        rank = _env_int("RANK", "SLURM_PROCID", default=0)
        world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
        grid = RankGrid(world_size, tp_size, pp_size)  # a ConfigError if the world does not fit
        device = choose_device(local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            backend = "gloo"
        cpu_compat.apply(on_cpu=device.type == "cpu")
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            if world_size == 1 and "MASTER_ADDR" not in os.environ:
                dist.init_process_group(
                    backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
                )
            else:
                dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp_size,
            pipeline_model_parallel_size=pp_size,
            virtual_pipeline_model_parallel_size=vp_size,
            order=RANK_ORDER,
        )
        return cls(rank=rank, grid=grid, device=device)

    def barrier(self) -> None:
        dist.barrier()

    def destroy(self) -> None:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
