"""Host reads of tensor values in the table step's hot path: each one is a device-to-host
sync on a GPU (issue 12, defect 3). Counted on CPU through torch's function overrides, which
see every read of a tensor's value into Python (bool, int, item, tolist) on any device."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from stem_megatron.config import ModelConfig
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.parallel.state import ParallelState
from stem_megatron.stem.sparse_adam import SparseRowAdamW
from stem_megatron.stem.sync import gather_union_ids

_READS = {
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.item,
    torch.Tensor.tolist,
}


class HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in _READS
        return func(*args, **(kwargs or {}))


def _grads(tables: int, rows: int = 8, width: int = 4) -> dict:
    ids = torch.tensor([1, 3, 4, 7])
    return {f"t{i}": (ids, torch.randn(ids.numel(), width)) for i in range(tables)}


def test_a_table_step_reads_one_value_per_table_to_validate_it() -> None:
    tables = {f"t{i}": torch.nn.Parameter(torch.randn(8, 4)) for i in range(3)}
    optimizer = SparseRowAdamW(tables, kernel="torch")
    grads = _grads(3)
    with HostReads() as reads:
        optimizer.step(grads, lr=1e-3)
    assert reads.count == 3  # the one combined check per table; nothing in the update


def test_the_union_of_ids_over_dp_reads_the_counts_once(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with HostReads() as reads:
            union = gather_union_ids(torch.tensor([5, 2, 9]), dist.group.WORLD)
        assert union.tolist() == [2, 5, 9]
        assert reads.count == 1
    finally:
        dist.destroy_process_group()


class Uniques(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.unique
        return func(*args, **(kwargs or {}))


def test_a_forward_finds_the_distinct_ids_once_for_all_its_stem_layers() -> None:
    """torch.unique waits for a GPU (data-dependent size): once per forward, not per layer."""
    parallel = ParallelState.initialize()
    try:
        config = ModelConfig(
            num_layers=4,
            hidden_size=32,
            ffn_hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            seq_length=16,
        )
        model = StemGPTModel(ModelSpec(config, vocab_size=100, stem_layers=(0, 1, 3)))
        model.init_parameters(seed=0)
        ids = torch.randint(0, 100, (2, 16))
        with Uniques() as uniques:
            model(ids, labels=ids).sum().backward()
        assert uniques.count == 1
        assert all(not t.grad_accumulator.is_empty for t in model.stem_tables().values())
    finally:
        parallel.destroy()
