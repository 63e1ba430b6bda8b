"""The dry run's dense memory (planning/dense_memory.py) against what megatron-core allocates:
a tiny model (sizes that are not multiples of 64, so the distributed optimizer pads) wrapped in
megatron-core's DDP and optimizer as training wraps it, in a world of one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from megatron.core.optimizer import get_megatron_optimizer

from stem_megatron.config_loader import load_config
from stem_megatron.parallel.data_parallel import tables_hidden, wrap_data_parallel
from stem_megatron.parallel.dims import ParallelDims
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.parallel.state import ParallelState
from stem_megatron.planning.dense_memory import DenseSetup, buffer_numel, dense_memory
from stem_megatron.planning.memory import count_shard
from stem_megatron.training.model_chunks import build_model_chunks
from stem_megatron.training.optimizer import dense_optimizer_config

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model.num_layers=3",
    "model.hidden_size=48",
    "model.ffn_hidden_size=72",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=16",
    "model.vocab_size=100",
    "model.make_vocab_size_divisible_by=64",
    "stem.layers=[1]",
]
CASES = {
    "fp32": [],
    "bf16": ["train.bf16=true"],
    "bf16-fp32-grads": ["train.bf16=true", "parallel.grad_reduce_in_fp32=true"],
    "distributed": ["optim.use_distributed_optimizer=true"],
    "bf16-distributed-buckets": [
        "train.bf16=true",
        "optim.use_distributed_optimizer=true",
        "parallel.overlap_grad_reduce=true",
        "parallel.ddp_bucket_size=5000",
    ],
    # all of it: on CPU megatron-core's HybridDeviceOptimizer offloads every parameter (cpu_compat)
    "bf16-distributed-offload": [
        "train.bf16=true",
        "optim.use_distributed_optimizer=true",
        "optim.optimizer_cpu_offload=true",
    ],
}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    parallel = ParallelState.initialize()
    yield parallel
    parallel.destroy()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _allocated(overrides: list[str], parallel: ParallelState) -> dict[str, int]:
    """Bytes megatron-core allocates for this rank's dense parameters, as training wraps them,
    and the dry run's figures for the same rank."""
    config = load_config(ROOT / "configs" / "tiny.yaml", SMALL + overrides)
    chunks = build_model_chunks(ParallelDims(config, parallel.world_size, 100), parallel)
    wrapped = wrap_data_parallel(chunks, config)
    with tables_hidden(chunks):
        optimizer = get_megatron_optimizer(dense_optimizer_config(config), wrapped)
    p, o = config.parallel, config.optim
    estimate = dense_memory(
        count_shard(chunks[0]).chunks,
        0,
        DenseSetup(
            bf16=config.train.bf16,
            dp_size=parallel.dp_size,
            distributed_optimizer=o.use_distributed_optimizer,
            grad_reduce_in_fp32=p.grad_reduce_in_fp32,
            overlap_grad_reduce=p.overlap_grad_reduce,
            bucket_size=p.ddp_bucket_size,
            offload_fraction=o.optimizer_offload_fraction if o.optimizer_cpu_offload else 0.0,
        ),
    )
    buffers = [b for ddp in wrapped for b in ddp.buffers]
    # Under the distributed optimizer the parameters live in the param buffer.
    weights = (
        [b.param_data for b in buffers]
        if o.use_distributed_optimizer
        else [q for q in chunks[0].parameters() if not getattr(q, "is_stem_table", False)]
    )
    # What the inner Adam steps: fp32 main copies under bf16, else the parameters themselves.
    stepped = [
        q
        for part in getattr(optimizer, "chained_optimizers", [optimizer])
        for group in part.optimizer.param_groups
        for q in group["params"]
    ]
    assert all(q.dtype == torch.float32 for q in stepped)
    # Offload: the fp32 host copies HybridDeviceOptimizer steps (each with a grad and 2 moments)
    host = [
        q
        for part in getattr(optimizer, "chained_optimizers", [optimizer])
        for group in getattr(part.optimizer, "cpu_param_groups", [])
        for q in group["params"]
    ]
    return {
        "grads": _bytes(b.grad_data for b in buffers),
        "weights": _bytes(weights),
        "host_copies": _bytes(host),
        "stepped": _bytes(stepped),
        "padding": sum(b.numel - b.numel_unpadded for b in buffers),
        "estimate": dataclasses.asdict(estimate),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_dense_memory_is_what_megatron_core_allocates(case, world_of_one):
    real = _allocated(CASES[case], world_of_one)
    estimate = real["estimate"]
    assert (estimate["grads"], estimate["weights"]) == (real["grads"], real["weights"])
    offloaded = "optim.optimizer_cpu_offload=true" in CASES[case]
    assert estimate["optimizer"] == (0 if offloaded else 2 * real["stepped"])
    assert estimate["host"] == (4 * real["host_copies"] if offloaded else 0)
    assert real["host_copies"] == (real["stepped"] if offloaded else 0)
    assert estimate["main_params"] == (real["stepped"] if "train.bf16=true" in CASES[case] else 0)
    if "optim.use_distributed_optimizer=true" in CASES[case]:
        assert real["padding"] > 0


def _dp_worker(overrides: list[str]) -> dict:
    parallel = ParallelState.initialize()
    try:
        return _allocated(overrides, parallel)
    finally:
        parallel.destroy()


@pytest.mark.slow  # two processes: about 30 s on 2 shared cores
def test_distributed_optimizer_shards_over_dp():
    """DP 2: each rank's buffers as above, its main params and moments a half of them (less
    the padding, which has no main params)."""
    for real in run_local_workers(2, _dp_worker, CASES["bf16-distributed-buckets"], timeout=240):
        estimate = real["estimate"]
        assert (estimate["grads"], estimate["weights"]) == (real["grads"], real["weights"])
        assert real["stepped"] <= estimate["main_params"] <= real["stepped"] + 4 * real["padding"]


def test_buffer_numel_follows_megatron_cores_padding():
    """By hand, DP 4 (lcm(4, 128) = 128): params start 64-aligned, buckets end 128-aligned."""
    # Reverse order: 100 at 0, 30 at 128 (ends 158: bucket 1 at 256), 10 at 256 -> 384.
    assert buffer_numel([10, 30, 100], [False] * 3, 4, True, 150) == 384
    assert buffer_numel([10, 30, 100], [False] * 3, 4, False, 150) == 140
    # A shared embedding gets a bucket of its own: 100 at 0 closes at 128; 30 at 128 -> 256.
    assert buffer_numel([30, 100], [False, True], 4, True, None) == 256
