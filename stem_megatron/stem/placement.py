"""Where a run's STEM tables live (`stem.storage`): the one place that branches on the tier.

Decided when the model is built: tables are placed before the chunk moves to the compute
device, so host and mmap tables never pass through device memory, and the placement is
refused before anything is allocated when the tables (with their optimizer state) would not
fit in host RAM or on the mmap disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stem_megatron.config import RunConfig
from stem_megatron.modes import TableOptimizerMode, TableStorage
from stem_megatron.stem.storage import MmapFiles, check_host_fits, host_table_bytes
from stem_megatron.stem.table import StemTable


@dataclass(frozen=True)
class TablePlacement:
    storage: TableStorage
    compute_device: torch.device
    files: MmapFiles | None  # the mmap tier's files: tables and their moments
    exact: bool  # exact mode keeps a per-row step counter beside each table

    @classmethod
    def of(cls, config: RunConfig, compute_device: torch.device) -> TablePlacement:
        storage = TableStorage(config.stem.storage)
        files = MmapFiles(config.mmap_dir) if storage is TableStorage.MMAP else None
        exact = config.stem.optimizer.mode == TableOptimizerMode.EXACT
        return cls(storage, torch.device(compute_device), files, exact)

    def check_fits(self, tables: int, rows: int, width: int) -> None:
        """Refuse `tables` off-device tables of [rows, width] (with their optimizer state)
        larger than the free host RAM, or mmap tables larger than the free disk."""
        if not self.storage.off_device or not tables:
            return
        what = (
            f"{tables} {self.storage}-tier STEM tables of [{rows}, {width}] with their "
            f"optimizer state"
        )
        if self.files is None:
            check_host_fits(tables * host_table_bytes(rows, width, torch.float32, self.exact), what)
        else:  # exact mode's per-row steps stay in RAM; tables and moments are mapped
            mapped = host_table_bytes(rows, width, torch.float32, exact=False)
            self.files.check_fits(tables * mapped, what)

    def place(self, chunk: torch.nn.Module) -> None:
        """Put a freshly built chunk's tables on their tier (before `chunk.to(device)`)."""
        if not self.storage.off_device:
            return
        for module in chunk.modules():
            if isinstance(module, StemTable):
                module.move_to_host(self.compute_device, self.files)

    @property
    def state_allocator(self):
        """How the table optimizer allocates its zero state: in mapped files beside the
        tables on the mmap tier; None elsewhere (on each table's own device)."""
        return self.files.zeros if self.files is not None else None
