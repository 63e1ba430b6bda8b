"""Host-resident tensors (host and mmap tables, their moments) in checkpoints on a GPU rank:
their views must stay on the host, sharing the tensor's memory, so a save reads them where
they live (no copy to the GPU) and a load writes into them (issue 12, defect 1). On this CPU
machine the meshes are built as a GPU rank builds them, with device type "cuda" (a mesh over
gloo groups does not touch a GPU until a tensor is placed on it)."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from stem_megatron.checkpoint.model_state import CheckpointMeshes, checkpoint_view
from stem_megatron.parallel.state import ParallelState
from stem_megatron.sharding import TPShard, set_tp_shard


def test_host_tables_load_in_place_when_the_compute_device_is_a_gpu(tmp_path) -> None:
    parallel = ParallelState.initialize()
    try:
        meshes = CheckpointMeshes.build(parallel, device_type="cuda")
        table = torch.randn(16, 8)
        set_tp_shard(table, TPShard(dim=1))  # sharded like the gate: a DTensor view
        saved = table.clone()
        view = checkpoint_view(table, table, meshes)
        assert view.device_mesh.device_type == "cpu"
        assert view.to_local().data_ptr() == table.data_ptr()  # no copy on the way out
        dcp.save({"table": view}, checkpoint_id=tmp_path)
        table.zero_()
        dcp.load({"table": checkpoint_view(table, table, meshes)}, checkpoint_id=tmp_path)
        assert torch.equal(table, saved)  # loaded into the table itself
    finally:
        parallel.destroy()
