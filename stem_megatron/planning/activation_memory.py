"""Activation memory of one rank: what a micro-batch's forward leaves for its backward, with
sequence parallelism and Megatron's activation recomputation (model/recompute.py).

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (arXiv
2205.05198, Sec. 4) count s*b*h*(34 + 5*a*s/h) bytes per GPT layer (fp16, LayerNorm, GeLU MLP
of 4h, dropout); tensor parallelism divides it to sbh(10 + 24/t + 5as/(ht)), the 10 being the
parts along the whole sequence on every rank, which sequence parallelism divides too:
sbh(34/t + 5as/(ht)).
Full recomputation leaves 2sbh (the layer's input) per layer and selective recomputation drops
the 5as/h attention scores. The same accounting for this model (model/transformer.py), per
token of a layer, e bytes per activation (2 under train.bf16, else 4), t = TP, σ = t under SP
(else 1), g/a = KV heads / heads, a fused attention kernel (no s x s scores, no dropout):
  two RMSNorms                                                   2 N / σ
    N = e h + 4 with torch's fused kernel (CUDA: the input and the fp32 rstd);
    N = 8 h + 4 with its composite one (CPU: an fp32 copy of the input and of x * rstd)
  the inputs of linear_qkv and linear_fc1 (megatron's linears keep the s/t shard under SP)
                                                                 2 e h / σ
  qkv's output (v is a view of it)                               e h (1 + 2g/a) / t
  q and k after RoPE                                             e h (1 + g/a) / t
  the attention output (linear_proj's input) and its fp32 log-sum-exp
                                                                 e h / t + 4 a / t
  SwiGLU: gate and up (dense; STEM: the gate and the table rows looked up for the whole
  sequence, [s, b, d_ff/t] in e bytes), SiLU output, product (linear_fc2's input)
                                                                 4 e f / t
(torch's math attention backend, where it runs, keeps instead of q and k after RoPE and the
log-sum-exp: q scaled, K and V repeated to the query heads and the s x s probabilities per
head, all in fp32, 4 (3 h + a s) / t, while nothing keeps qkv's output; a fused kernel given
K and V repeated to the query heads keeps them, 2 e h / t, instead of k after RoPE and qkv's
output),
plus, under bf16, the four cos/sin casts of RoPE ([s, head_dim], per micro-batch). The last
stage adds the final norm (N / σ), the head's input (e h / σ) and the fp32 softmax that
vocab_parallel_cross_entropy keeps (4 V / t), and while the loss runs, the bf16 logits or their
gradient beside it (2 V / t, bf16 only; not saved, so not in the calibration). Token ids
(int64) are not counted.

Recomputation (megatron-core's CheckpointFunction keeps a region's inputs): full keeps the
residual input, e h / σ, of each uniform group or block-recomputed layer, and in the backward
rebuilds one group's activations (uniform: recompute_num_layers layers; block: one layer,
freed in place of a later layer's unless every layer is recomputed), less the input it already
holds where the first norm saves that very tensor; selective keeps
linear_qkv's output and rebuilds RoPE and attention, dropping q and k after RoPE, the
log-sum-exp and the cos/sin casts.
"""

from __future__ import annotations

from dataclasses import dataclass

from stem_megatron.config import ModelConfig

FP32 = 4


@dataclass(frozen=True)
class ActivationSetup:
    tp_size: int
    sequence_parallel: bool
    micro_batch_size: int
    bf16: bool
    # torch's RMSNorm: True, the fused kernel (CUDA, what a cluster runs); False, composite (CPU)
    fused_norm: bool = True
    # attention runs torch's math backend (model/attention.py), not a fused kernel
    math_attention: bool = False
    # a fused kernel given the KV heads repeated to the query heads (CUDA fp32: model/attention.py)
    repeated_kv: bool = False

    @property
    def e(self) -> int:
        return 2 if self.bf16 else FP32

    @property
    def sp(self) -> int:
        return self.tp_size if self.sequence_parallel else 1

    @property
    def norm_keeps_input(self) -> bool:
        """The norm saves its input tensor itself (the composite one upcasts bf16: a copy)."""
        return self.fused_norm or not self.bf16

    def norm_bytes(self, h: int) -> int:
        """Per token of one RMSNorm (before SP's split)."""
        return (self.e * h if self.fused_norm else 2 * FP32 * h) + FP32


@dataclass(frozen=True)
class LayerBytes:
    """One layer's activations for one micro-batch, in bytes."""

    full: float  # no recomputation
    selective_saving: float  # what selective recomputation drops
    checkpoint: float  # a recomputed region's input


def layer_bytes(m: ModelConfig, s: ActivationSetup) -> LayerBytes:
    h, f, t, e = m.hidden_size, m.ffn_hidden_size, s.tp_size, s.e
    gqa = m.num_query_groups / m.num_attention_heads
    tokens = m.seq_length * s.micro_batch_size
    rope_after = e * h * (1 + gqa) / t
    qkv_out = e * h * (1 + 2 * gqa) / t
    attention, qkv_kept = rope_after + FP32 * m.num_attention_heads / t, qkv_out
    if s.math_attention:
        # fp32 (it upcasts) q scaled, K and V repeated to the query heads, the s x s
        # probabilities; v as it is (a view of qkv's output) only unrepeated and in fp32
        v_copied = gqa < 1 or s.bf16
        attention = FP32 * ((2 + v_copied) * h + m.num_attention_heads * m.seq_length) / t
        qkv_kept = 0 if v_copied else qkv_out
    elif s.repeated_kv and gqa < 1:
        # the kernel keeps q after RoPE and the repeated K and V, not k after RoPE nor v (a
        # view of qkv's output)
        attention, qkv_kept = 3 * e * h / t + FP32 * m.num_attention_heads / t, 0
    per_token = (
        2 * (s.norm_bytes(h) + e * h) / s.sp + qkv_kept + attention + e * h / t + 4 * e * f / t
    )
    head_dim = h // m.num_attention_heads
    rope_casts = 4 * m.seq_length * head_dim * e if s.bf16 else 0
    return LayerBytes(
        full=per_token * tokens + rope_casts,
        # selective keeps qkv's output (the recomputed region's input) in any case
        selective_saving=(attention - (qkv_out - qkv_kept)) * tokens + rope_casts,
        checkpoint=e * h / s.sp * tokens,
    )


def head_bytes(m: ModelConfig, padded_vocab: int, s: ActivationSetup) -> float:
    """What the last stage adds per micro-batch: final norm, head input, fp32 softmax."""
    per_token = (
        s.norm_bytes(m.hidden_size) + s.e * m.hidden_size
    ) / s.sp + FP32 * padded_vocab / s.tp_size
    return per_token * m.seq_length * s.micro_batch_size


def head_transient_bytes(padded_vocab: int, m: ModelConfig, s: ActivationSetup) -> float:
    """Not saved, but beside the softmax while the loss runs forward and backward: the bf16
    logits (and their gradient) next to their fp32 copy; none in fp32 (the loss works in
    place on the head's own output)."""
    return 2 * padded_vocab / s.tp_size * m.seq_length * s.micro_batch_size if s.bf16 else 0


@dataclass(frozen=True)
class ChunkActivations:
    stored: int  # kept per micro-batch from its forward to its backward
    rebuilt: int  # on top, while the backward recomputes one region (full recomputation)


def chunk_activations(m: ModelConfig, layers: int, s: ActivationSetup) -> ChunkActivations:
    """One micro-batch through a model chunk of `layers` layers."""
    per = layer_bytes(m, s)
    n = m.recompute_num_layers or 0
    if m.recompute_granularity == "selective":
        return ChunkActivations(int(layers * (per.full - per.selective_saving)), 0)
    if m.recompute_granularity != "full" or layers == 0:
        return ChunkActivations(int(layers * per.full), 0)
    # A rebuilt region's first norm saves the region's input again, unless it copies it.
    rebuilt = per.full - (per.checkpoint if s.norm_keeps_input else 0)
    if m.recompute_method == "uniform":
        groups = -(-layers // n)
        return ChunkActivations(
            int(groups * per.checkpoint), int(rebuilt + (min(n, layers) - 1) * per.full)
        )
    kept = min(n, layers)  # block: the first n layers recomputed one by one
    stored = kept * per.checkpoint + (layers - kept) * per.full
    return ChunkActivations(int(stored), int(rebuilt) if kept == layers else 0)


def chunk_passes_in_flight(pp_rank: int, pp_size: int, vp_size: int, num_microbatches: int) -> int:
    """Forward passes of a model chunk whose activations pipeline rank `pp_rank` holds at once,
    at its peak (the end of its warmup): megatron-core's warmup count
    (schedules.get_pp_rank_microbatches) plus the first steady-state forward, capped at all
    of them. 1F1B: pp - r - 1 warmup forwards, so pp - r micro-batches in flight. Interleaved
    (v chunks per rank): 2(pp - r - 1) + (v - 1) pp warmup forwards of chunks of L / (pp v)
    layers; on rank 0 that is (pp(v + 1) - 1) L / (pp v) = L (1 + (pp - 1) / (pp v)) layers'
    activations, Korthikanti et al.'s and Megatron's (theoretical_memory_usage.py)
    interleaved-schedule factor 1 + (p - 1) / (p m) over one stage's pp micro-batches of L/pp
    layers. No pipelining (pp = 1): one micro-batch at a time."""
    total = num_microbatches * vp_size
    if pp_size == 1:
        return min(1, total)
    warmup = pp_size - pp_rank - 1
    if vp_size > 1:
        warmup = 2 * (pp_size - pp_rank - 1) + (vp_size - 1) * pp_size
    return min(warmup + 1, total)
