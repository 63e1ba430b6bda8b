"""Initialisation by row blocks (model/init.py): the old values where a tensor is one block,
the same model in every layout, and never more than one block drawn at a time, whatever tier
the parameter lives in."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stem_megatron.config import ModelConfig
from stem_megatron.model import init
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.parallel.state import ParallelState
from stem_megatron.sharding import (
    RowBlock,
    TPShard,
    full_shape,
    gather_full,
    get_row_block,
    get_tp_shard,
    set_row_block,
    set_tp_shard,
)
from stem_megatron.stem.storage import MmapFiles

VOCAB = 300


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    parallel = ParallelState.initialize()
    yield parallel
    parallel.destroy()


@dataclass(frozen=True)
class Group:
    """TP rank `r` of `n`, as megatron's layers ask when they size their shards."""

    r: int
    n: int

    def rank(self) -> int:
        return self.r

    def size(self) -> int:
        return self.n


def model_config() -> ModelConfig:
    return ModelConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=48,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=16,
        make_vocab_size_divisible_by=64,
        untie_embeddings_and_output_weights=True,
    )


def build(tp_rank=0, tp_size=1, vocab_shard=None, seed=5) -> StemGPTModel:
    spec = ModelSpec(
        model=model_config(),
        vocab_size=VOCAB,
        stem_layers=(1,),
        tp_size=tp_size,
        tp_rank=tp_rank,
        vocab_shard=vocab_shard,
    )
    model = StemGPTModel(spec, tp_group=Group(tp_rank, tp_size))
    model.init_parameters(seed)
    return model


def old_full_draw(shape, std, seed, name) -> torch.Tensor:
    """How every parameter was drawn before blocks: the whole tensor from (seed, name)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def whole_by_blocks(shape, std, seed, name, block_elements) -> torch.Tensor:
    """The full tensor in one process: every block, in order."""
    count = -(-shape[0] // init.rows_per_block(shape, block_elements))
    return torch.cat(
        [init.draw_block(shape, std, seed, name, k, block_elements) for k in range(count)]
    )


def old_local_slice(full, shard, tp_rank, tp_size, row_block=None) -> torch.Tensor:
    """The slicing the old init did on the full tensor: each chunk split over TP, then the row
    block of the result."""
    local = full
    if shard is not None and tp_size > 1:
        blocks = full.chunk(shard.chunks, dim=shard.dim)
        pieces = [b.chunk(tp_size, dim=shard.dim)[tp_rank] for b in blocks]
        local = torch.cat(pieces, dim=shard.dim)
    return local if row_block is None else local[row_block.start : row_block.end]


def test_one_block_tensors_keep_the_old_values():
    model = build()
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        std = init.init_std(name, tuple(param.shape), model.spec.model)
        assert torch.equal(param, old_full_draw(param.shape, std, 5, name)), name


def test_the_largest_one_block_tensor_keeps_the_old_values():
    shape = (2**12, 2**12)  # exactly BLOCK_ELEMENTS: still one block
    param = torch.empty(shape)
    init.fill_normal_(param, "w", 0.02, 3, 0, 1)
    assert torch.equal(param, old_full_draw(shape, 0.02, 3, "w"))


def _fill(shape, shard, tp_rank, tp_size, row_block, block_elements):
    full_rows = shape[0]
    local_shape = list(shape)
    if shard is not None:
        local_shape[shard.dim] //= tp_size
    if row_block is not None:
        local_shape[0] = row_block.end - row_block.start
    param = torch.nn.Parameter(torch.full(local_shape, float("nan")))
    set_tp_shard(param, shard)
    set_row_block(param, row_block)
    assert full_shape(param, tp_size)[0] == full_rows
    init.fill_normal_(param, "t", 0.5, 9, tp_rank, tp_size, block_elements)
    return param.detach()


@pytest.mark.parametrize(
    "shard,vocab_shards",
    [
        (TPShard(dim=1), 1),  # a column-parallel table
        (TPShard(dim=1), 3),  # vocab-sharded over 3 DP ranks, columns over TP
        (TPShard(dim=0), 1),  # a row-parallel weight
        (TPShard(dim=0, chunks=2), 1),  # megatron's fused [gate; up]
        (None, 4),  # replicated over TP, vocab-sharded
    ],
)
def test_every_layout_holds_slices_of_one_tensor(shard, vocab_shards):
    shape, blocks = (60, 12), 5 * 12  # 12 blocks of 5 rows
    full = whole_by_blocks(shape, 0.5, 9, "t", blocks)
    assert not torch.equal(full[:5], full[5:10])  # blocks are drawn from their own generators
    for tp_rank in range(2):
        slices = []
        for dp_rank in range(vocab_shards):
            rows = shape[0] // (2 if shard is not None and shard.dim == 0 else 1)
            block = RowBlock.of(rows, dp_rank, vocab_shards) if vocab_shards > 1 else None
            local = _fill(shape, shard, tp_rank, 2, block, blocks)
            assert torch.equal(local, old_local_slice(full, shard, tp_rank, 2, block))
            slices.append(local)
        if shard is not None:  # the TP slices gather back into the whole tensor
            this = torch.cat(slices)
            peer = _fill(shape, shard, 1 - tp_rank, 2, None, blocks)
            pair = [this, peer] if tp_rank == 0 else [peer, this]
            assert torch.equal(gather_full(pair, shard), full)


def test_models_of_every_layout_hold_slices_of_the_one_process_model(monkeypatch):
    monkeypatch.setattr(init, "BLOCK_ELEMENTS", 256)  # every matrix is many blocks
    whole = dict(build().named_parameters())
    for tp_rank in range(2):
        for dp_rank in range(2):
            model = build(tp_rank, 2, vocab_shard=(dp_rank, 2))
            for name, param in model.named_parameters():
                shard, block = get_tp_shard(param), get_row_block(param)
                expected = old_local_slice(whole[name], shard, tp_rank, 2, block)
                assert torch.equal(param, expected), (name, tp_rank, dp_rank)


class Allocations(TorchDispatchMode):
    """The bytes of every new tensor storage an op makes (views and in-place ops make none);
    `limit`: refuse any larger allocation as it happens."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.largest, self.limit = 0, limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.largest = max(self.largest, nbytes)
                if self.limit is not None and nbytes > self.limit:
                    raise MemoryError(f"{func} allocated {nbytes:,} bytes (limit {self.limit:,})")
        return out


def _table_model(tmp_path, tier: str) -> StemGPTModel:
    spec = ModelSpec(model=model_config(), vocab_size=4096, stem_layers=(0, 1))
    model = StemGPTModel(spec, tp_group=Group(0, 1))
    for table in model.stem_tables().values():
        if tier != "device":
            table.move_to_host("cpu", MmapFiles(tmp_path) if tier == "mmap" else None)
    return model


@pytest.mark.parametrize("tier", ["device", "host", "mmap"])
def test_init_draws_one_block_at_a_time(monkeypatch, tmp_path, tier):
    """Tables of 4096 x 48 fp32 (768 KiB) drawn in blocks of 4 KiB: nothing near a table."""
    monkeypatch.setattr(init, "BLOCK_ELEMENTS", 1024)
    model = _table_model(tmp_path, tier)
    with Allocations() as seen:
        model.init_parameters(5)
    assert seen.largest <= 1024 * 4
    table = model.stem_tables()["decoder.layers.1.mlp.stem_table"].weight
    name = "decoder.layers.1.mlp.stem_table.weight"
    std = init.init_std(name, tuple(table.shape), model.spec.model)
    assert torch.equal(table, whole_by_blocks(tuple(table.shape), std, 5, name, 1024))


def test_an_mmap_table_is_never_whole_in_memory(monkeypatch, tmp_path):
    """An mmap table of 768 KiB under a 64 KiB limit on any allocation: it is written in place,
    block by block, into the file mapping it was given."""
    monkeypatch.setattr(init, "BLOCK_ELEMENTS", 4096)
    model = _table_model(tmp_path, "mmap")
    tables = [t.weight for t in model.stem_tables().values()]
    mapped = [t.data_ptr() for t in tables]
    assert all(t.numel() * 4 >= 12 * 2**16 for t in tables)
    with Allocations(limit=2**16):
        model.init_parameters(5)
    assert [t.data_ptr() for t in tables] == mapped
    assert all(t.std() > 0 for t in tables)
