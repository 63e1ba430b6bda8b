"""The dry run's activation estimate (planning/activation_memory.py) against what autograd really
keeps: a tiny model's forward and backward on CPU, every tensor saved for the backward counted
once per storage (parameters and buffers are not activations) while it is alive, and the peak
of that sum compared with the estimate, in fp32 and bf16, without and with recomputation."""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter

import pytest
import torch
from torch.nn.attention import SDPBackend

from stem_megatron.config import ModelConfig
from stem_megatron.model import attention
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.parallel.state import ParallelState
from stem_megatron.planning.activation_memory import ActivationSetup, chunk_activations, head_bytes
from stem_megatron.training.model_chunks import _cast_dense_parameters

# megatron-core warns that a fused attention needs no selective recomputation; ours is torch's
pytestmark = pytest.mark.filterwarnings("ignore:If you are using transformer_engine")

VOCAB, BATCH = 100, 2
TOLERANCE = 0.02  # relative; measured below 1% (token ids are not counted)
MODEL = ModelConfig(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    seq_length=64,
    make_vocab_size_divisible_by=64,
)
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full-uniform-2": {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 2,
    },
    "full-uniform-4": {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 4,
    },
    "full-block-3": {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": 3,
    },
    "full-block-4": {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": 4,
    },
}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    parallel = ParallelState.initialize()
    yield parallel
    parallel.destroy()


class SavedBytes:
    """Peak bytes of the distinct storages autograd holds for the backward, as a
    saved_tensors_hooks pair: a storage counts from the first pack that saves it until the
    last saved reference to it is released (the graph node freed after its backward)."""

    def __init__(self, excluded: set[int]):
        self.excluded = excluded  # storage pointers of parameters and buffers
        self.refs: Counter[int] = Counter()
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        holder = _Held(tensor)
        if key in self.excluded:
            return holder
        if self.refs[key] == 0:
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(holder, self._release, key, storage.nbytes())
        return holder

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= nbytes

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.tensor)


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def measured_peak(m: ModelConfig, bf16: bool, tp: int = 1, sp: bool = False) -> int:
    """This rank's peak (TP rank `dist.get_rank()` of `tp`, sequence parallel or not)."""
    tp_rank = torch.distributed.get_rank() % tp
    model = StemGPTModel(
        ModelSpec(
            model=m,
            vocab_size=VOCAB,
            stem_layers=(1, 3),
            tp_size=tp,
            tp_rank=tp_rank,
            sequence_parallel=sp,
        )
    )
    model.init_parameters(3)
    if bf16:
        _cast_dense_parameters(model, torch.bfloat16)
    model.train()
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = SavedBytes(excluded)
    ids = torch.randint(0, VOCAB, (BATCH, m.seq_length), generator=torch.Generator().manual_seed(0))
    with saved.hooks():  # the backward too: recomputation saves again while it runs
        model(ids, torch.roll(ids, -1, dims=1)).float().mean().backward()
    assert saved.live == 0  # everything saved was released by the backward
    return saved.peak


def estimated_peak(
    m: ModelConfig,
    bf16: bool,
    tp: int = 1,
    sp: bool = False,
    math: bool = False,
    repeated_kv: bool = False,
) -> int:
    setup = ActivationSetup(
        tp_size=tp,
        sequence_parallel=sp,
        micro_batch_size=BATCH,
        bf16=bf16,
        fused_norm=False,  # torch's RMSNorm on CPU: composite
        math_attention=math,
        repeated_kv=repeated_kv,
    )
    chunk = chunk_activations(m, m.num_layers, setup)
    padded = -(-VOCAB // m.make_vocab_size_divisible_by) * m.make_vocab_size_divisible_by
    return chunk.stored + max(int(head_bytes(m, padded, setup)), chunk.rebuilt)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_activation_estimate_matches_what_autograd_keeps(bf16, recompute):
    m = dataclasses.replace(MODEL, **RECOMPUTE[recompute])
    measured, estimate = measured_peak(m, bf16), estimated_peak(m, bf16)
    assert abs(estimate / measured - 1) < TOLERANCE, (measured, estimate)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recompute", ["none", "selective"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_math_attention_scores_are_counted(monkeypatch, bf16, recompute, kv_heads):
    """torch's math attention backend, forced where the model picks its backend
    (model/attention.py): the s x s probabilities and fp32 copies it keeps are estimated, with
    grouped KV heads (V repeated) and without (fp32: V kept as the view of qkv it is)."""
    monkeypatch.setattr(attention, "backends_for", lambda *_: ([SDPBackend.MATH], False))
    m = dataclasses.replace(MODEL, num_query_groups=kv_heads, **RECOMPUTE[recompute])
    measured, estimate = measured_peak(m, bf16), estimated_peak(m, bf16, math=True)
    assert abs(estimate / measured - 1) < TOLERANCE, (measured, estimate)


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_repeated_kv_heads_are_counted(monkeypatch, recompute):
    """A fused kernel given K and V repeated to the query heads: CUDA fp32's path in
    model/attention.py, run on the CPU, whose kernel keeps what CUDA's memory-efficient one
    does (q, k, v, the output and the log-sum-exp)."""
    monkeypatch.setattr(attention, "backends_for", lambda *_: (None, True))
    m = dataclasses.replace(MODEL, **RECOMPUTE[recompute])
    measured, estimate = measured_peak(m, False), estimated_peak(m, False, repeated_kv=True)
    assert abs(estimate / measured - 1) < TOLERANCE, (measured, estimate)


# (sequence parallel, bf16, recomputation); every combination measured within 1% too
TP_CASES = [
    (False, True, "none"),
    (True, True, "none"),
    (True, True, "full-uniform-2"),
    (True, False, "none"),
]


def _tp_worker() -> list[int]:
    parallel = ParallelState.initialize(tp_size=2)
    try:
        return [
            measured_peak(dataclasses.replace(MODEL, **RECOMPUTE[recompute]), bf16, 2, sp)
            for sp, bf16, recompute in TP_CASES
        ]
    finally:
        parallel.destroy()


@pytest.mark.slow  # two processes: about 30 s on 2 shared cores
def test_tensor_and_sequence_parallel_estimate_matches_each_rank():
    """TP 2 on two processes: what TP splits (attention, FFN, the head's logits) and, under
    sequence parallelism, what SP splits too (norms, the linears' saved inputs, a recomputed
    region's input), rank by rank."""
    for rank, peaks in enumerate(run_local_workers(2, _tp_worker, timeout=240)):
        for (sp, bf16, recompute), measured in zip(TP_CASES, peaks):
            m = dataclasses.replace(MODEL, **RECOMPUTE[recompute])
            estimate = estimated_peak(m, bf16, 2, sp)
            assert abs(estimate / measured - 1) < TOLERANCE, (
                rank,
                sp,
                bf16,
                recompute,
                measured,
                estimate,
            )
