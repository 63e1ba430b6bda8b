"""Memory of one rank's dense parameters under megatron-core 0.16.1's DistributedDataParallel
and its optimizers: what they allocate, element for element.

DDP (distributed/distributed_data_parallel.py, param_and_grad_buffer.py) wraps each model
chunk and gives it one contiguous buffer per (param dtype, grad dtype): every dense parameter's
gradient lives there (`main_grad`), in the parameter's dtype, or fp32 with
`parallel.grad_reduce_in_fp32`. STEM tables stay outside (row-sparse, stem/). The buffer
lays the parameters out in reverse `parameters()` order, cut into buckets of about
`bucket_size` elements; `bucket_size` is `parallel.ddp_bucket_size` (default
max(40M, 1M x DP)) with `overlap_grad_reduce` only, and never on pipeline ranks after the
first or for model chunks after the first (Megatron-LM's disable_bucketing): one bucket there.
Under the distributed optimizer each parameter starts at a multiple of 64 elements and each
bucket is padded to a multiple of lcm(DP, 128) so it splits evenly over DP, and a second
buffer of the parameter dtype holds the parameters themselves (param.data is re-pointed into
it: it replaces their storage, it is not a copy); a tied embedding (`shared_embedding`) gets a
bucket of its own.

The optimizer (optimizer/optimizer.py, distrib_optimizer.py) keeps, for each element it
steps: Adam's exp_avg and exp_avg_sq (fp32); under bf16 an fp32 main parameter, and during the
step an fp32 copy of a bf16 gradient (`main_grad.float()`; none when it is already fp32). Without
the distributed optimizer every DP rank steps all of its elements; with it, its 1/DP shard of
each buffer. `optim.optimizer_cpu_offload` (HybridDeviceOptimizer) steps
`optimizer_offload_fraction` of those elements on the host: there they have a pinned fp32
copy of the main parameter and of its gradient and their moments; the device keeps its fp32
main shard (the host result is copied back into it) and the fp32 gradient copies (made before
the host copy), and loses the moments of the offloaded part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

FP32 = 4
BF16 = 2
PARAM_ALIGN = 64  # elements: 128-byte aligned starts under the distributed optimizer
BUCKET_ALIGN = 128  # elements: bucket ends a multiple of lcm(DP, 128) under it


@dataclass(frozen=True)
class DenseSetup:
    bf16: bool  # bf16 parameters, fp32 main parameters in the optimizer
    dp_size: int
    distributed_optimizer: bool
    grad_reduce_in_fp32: bool
    overlap_grad_reduce: bool
    bucket_size: int | None  # parallel.ddp_bucket_size; None: megatron-core's default
    offload_fraction: float  # of the optimizer's elements stepped on the host; 0: none

    @property
    def param_bytes(self) -> int:
        return BF16 if self.bf16 else FP32

    @property
    def grad_bytes(self) -> int:
        return FP32 if self.grad_reduce_in_fp32 or not self.bf16 else BF16

    def chunk_bucket_size(self, pp_rank: int, chunk: int) -> int | None:
        """Elements per bucket of model chunk `chunk` on pipeline rank `pp_rank`; None: one."""
        if not self.overlap_grad_reduce or pp_rank > 0 or chunk > 0:
            return None
        return self.bucket_size or max(40_000_000, 1_000_000 * self.dp_size)


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def buffer_numel(
    numels: Sequence[int],
    shared: Sequence[bool],
    dp_size: int,
    distributed_optimizer: bool,
    bucket_size: int | None,
) -> int:
    """Elements of the buffer _ParamAndGradBuffer allocates for parameters of `numels` (in
    `parameters()` order; `shared`: a tied embedding's flag `shared_embedding`)."""
    bucket_end = math.lcm(dp_size, BUCKET_ALIGN) if distributed_optimizer else 1
    start = bucket_start = end = 0
    open_bucket = False
    for numel, own_bucket in zip(reversed(numels), reversed(shared)):
        own_bucket = own_bucket and distributed_optimizer
        if distributed_optimizer:
            start = _pad(start, PARAM_ALIGN)
        if own_bucket and open_bucket:  # close the bucket before it
            start = bucket_start = _pad(start, bucket_end)
        end, open_bucket = start + numel, True
        if own_bucket or (bucket_size is not None and end - bucket_start >= bucket_size):
            start = bucket_start = _pad(end, bucket_end)
            open_bucket = False
        else:
            start = end
    return _pad(end, bucket_end) if open_bucket else bucket_start


@dataclass(frozen=True)
class DenseMemory:
    """Bytes of one rank's dense parameters, gradients and optimizer state."""

    weights: int  # bf16 or fp32 parameters (in DDP's param buffer under the dist. optimizer)
    grads: int  # DDP's grad buffers
    main_params: int  # fp32 main parameters (bf16 only), device
    optimizer: int  # Adam moments on the device
    # fp32 copies of bf16 gradients the device optimizer steps on: made by its step, freed by
    # the next step's zero_grad, so never beside the activations
    main_grads: int
    host: int  # offloaded: main parameter, gradient and moment copies in host RAM

    @property
    def resident(self) -> int:
        """On the device through the whole step."""
        return self.weights + self.grads + self.main_params + self.optimizer


def dense_memory(
    chunks: Sequence[tuple[Sequence[int], Sequence[bool]]], pp_rank: int, s: DenseSetup
) -> DenseMemory:
    """`chunks`: each model chunk's dense parameter sizes and `shared_embedding` flags."""
    buffered = sum(
        buffer_numel(
            numels, shared, s.dp_size, s.distributed_optimizer, s.chunk_bucket_size(pp_rank, i)
        )
        for i, (numels, shared) in enumerate(chunks)
    )
    params = sum(sum(numels) for numels, _ in chunks)  # = buffered without the dist. optimizer
    # A DP rank's shard is 1/DP of each buffer; main params exist for its parameter elements
    # only, not the padding (an upper bound by less than the padding of one shard).
    stepped = min(buffered // s.dp_size, params) if s.distributed_optimizer else params
    on_host = round(stepped * s.offload_fraction)
    on_device = stepped - on_host
    grad_copy = FP32 if s.bf16 and not s.grad_reduce_in_fp32 else 0
    return DenseMemory(
        weights=buffered * s.param_bytes,
        grads=buffered * s.grad_bytes,
        main_params=stepped * FP32 if s.bf16 else 0,
        optimizer=on_device * 2 * FP32,
        main_grads=stepped * grad_copy,
        host=on_host * (FP32 + FP32 + 2 * FP32),
    )
