"""The STEM language model: a Llama-style decoder built from megatron-core's parallel layers.

RMSNorm, RoPE, grouped-query attention through `F.scaled_dot_product_attention` (its kernel
picked in model/attention.py), SwiGLU FFN, and the STEM FFN in the layers of `stem_layers`.
Activations are [seq, batch, hidden] as in megatron-core. Parameter names follow megatron-core's
GPTModel (local spec):

    embedding.word_embeddings.weight
    decoder.layers.N.input_layernorm.weight
    decoder.layers.N.self_attention.linear_qkv.weight   [groups x (q heads/group + 2) x head_dim, h]
    decoder.layers.N.self_attention.linear_proj.weight
    decoder.layers.N.pre_mlp_layernorm.weight
    decoder.layers.N.mlp.linear_fc1.weight              dense: [gate; up]; STEM: gate only
    decoder.layers.N.mlp.stem_table.weight              STEM layers: [vocab, d_ff]
    decoder.layers.N.mlp.linear_fc2.weight
    decoder.final_layernorm.weight
    output_layer.weight                                 only when untied

Tied, under pipeline parallelism: the last stage holds a copy of the embedding weight, named
as the embedding, for the head; the trainer keeps the two equal (sums their gradients).

N is the global layer number on every pipeline stage. Every STEM layer needs the token ids,
so `forward` takes `input_ids` on every stage, not only the first.

Sequence parallelism (`spec.sequence_parallel`, Megatron's): the embedding reduce-scatters
its output over the sequence, so norms and residuals hold s/TP tokens per TP rank; the
column-parallel linears (qkv, fc1, the head) all-gather their input and the row-parallel ones
reduce-scatter their output, so RoPE, attention, the gate and the STEM lookup see the whole
sequence; pipeline stages exchange [s/TP, b, h]. The STEM lookup stays local: every rank has
all the ids and reads its d_ff/TP columns for the gathered sequence.

Activation recomputation: model/recompute.py (Megatron's `recompute_*` settings).

`tp_group` (optional) is the TP group handed to megatron's layers; None: megatron-core's
default group. megatron sizes each shard from the group's size() and rank() when it is built,
which is how the dry run builds any rank's shard on the meta device in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import ModelParallelConfig
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer import TransformerConfig

from stem_megatron.config import ModelConfig
from stem_megatron.model.attention import causal_attention
from stem_megatron.model.init import init_parameters
from stem_megatron.model.recompute import checkpointed, run_layers
from stem_megatron.model.rope import apply_rotary, rotary_cos_sin
from stem_megatron.model.stem_ffn import StemMLP, SwiGLUMLP, column_linear, row_linear
from stem_megatron.modes import RecomputeGranularity
from stem_megatron.sharding import (
    RowBlock,
    TPGroup,
    TPShard,
    mark_shared_embedding,
    mark_tied_copy,
    set_tp_shard,
)
from stem_megatron.stem.table import StemTable


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Embedding/head rows: rounded up independently of TP, so every layout has the same model."""
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)


@dataclass(frozen=True)
class ModelSpec:
    """What a model instance is: the architecture plus which part of it this rank builds."""

    model: ModelConfig
    vocab_size: int  # the tokenizer's exact vocab: STEM table rows
    stem_layers: tuple[int, ...]
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1  # read by megatron-core's pipeline schedules
    vp_size: int | None = None
    layers: tuple[int, ...] | None = None  # global layer numbers on this stage; None: all
    pre_process: bool = True  # holds the embedding
    post_process: bool = True  # holds the final norm, the head and the loss
    # (dp_rank, dp_size) when STEM tables are vocab-sharded over data-parallel ranks
    vocab_shard: tuple[int, int] | None = None
    sequence_parallel: bool = False  # Megatron's SP over the TP ranks (parallel.sequence_parallel)
    bf16: bool = False  # dense parameters and activations in bf16 (cast after initialisation)

    @property
    def table_rows(self) -> RowBlock | None:
        """The table rows this rank holds under the vocab-sharded layout (None: all)."""
        if self.vocab_shard is None:
            return None
        return RowBlock.of(self.vocab_size, *self.vocab_shard)

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.model.make_vocab_size_divisible_by)

    @property
    def local_layers(self) -> tuple[int, ...]:
        return self.layers if self.layers is not None else tuple(range(self.model.num_layers))


def megatron_config(spec: ModelSpec) -> TransformerConfig:
    """The megatron-core config our layers and megatron's schedules read."""
    m = spec.model
    # Parameters are created on the CPU and initialised by us (model/init.py), so any TP
    # layout holds exactly the single-process model's slices.
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        tensor_model_parallel_size=spec.tp_size,
        pipeline_model_parallel_size=spec.pp_size,
        virtual_pipeline_model_parallel_size=spec.vp_size,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
        bf16=spec.bf16,
        # activations sent between pipeline stages
        pipeline_dtype=torch.bfloat16 if spec.bf16 else torch.float32,
        # Unbatched p2p: with two pipeline ranks a batched exchange sends activations and
        # gradients to the same peer on one group, and gloo pairs them by order, swapping
        # them (interleaved 1F1B trains on wrong tensors); the unbatched path sends one
        # direction on a second group.
        batch_p2p_comm=False,
        sequence_parallel=spec.sequence_parallel,
        recompute_granularity=m.recompute_granularity,
        recompute_method=m.recompute_method,
        recompute_num_layers=m.recompute_num_layers,
        cuda_graph_scope=[],
    )  # megatron-core 0.16 warns on its own default ("full")


class SelfAttention(torch.nn.Module):
    def __init__(
        self,
        m: ModelConfig,
        config: TransformerConfig,
        tp_size: int,
        tp_group: TPGroup | None = None,
    ):
        super().__init__()
        self.config = config
        self.head_dim = m.hidden_size // m.num_attention_heads
        self.heads_per_group = m.num_attention_heads // m.num_query_groups
        self.local_groups = m.num_query_groups // tp_size
        qkv_size = m.num_query_groups * (self.heads_per_group + 2) * self.head_dim
        self.linear_qkv = column_linear(m.hidden_size, qkv_size, config, tp_group=tp_group)
        self.linear_proj = row_linear(
            m.num_attention_heads * self.head_dim, m.hidden_size, config, tp_group
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.linear_qkv(x)[0]  # the whole sequence (gathered here under SP)
        if (
            self.config.recompute_granularity == RecomputeGranularity.SELECTIVE
            and self.training
            and torch.is_grad_enabled()
        ):
            out = checkpointed(self.core, self.config, qkv, cos, sin)
        else:
            out = self.core(qkv, cos, sin)
        return self.linear_proj(out)[0]  # reduce-scattered over the sequence under SP

    def core(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE and attention: what selective recomputation recomputes from qkv [s, b, .]."""
        s, b, _ = qkv.shape
        qkv = qkv.view(s, b, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.heads_per_group].reshape(s, b, -1, self.head_dim)
        k, v = qkv[:, :, :, self.heads_per_group], qkv[:, :, :, self.heads_per_group + 1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = causal_attention(q, k, v)  # the SDPA backend chosen in model/attention.py
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class TransformerLayer(torch.nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        layer_number: int,
        config: ModelParallelConfig,
        tp_group: TPGroup | None = None,
    ):
        super().__init__()
        m = spec.model
        self.input_layernorm = torch.nn.RMSNorm(m.hidden_size, eps=m.norm_epsilon)
        self.self_attention = SelfAttention(m, config, spec.tp_size, tp_group)
        self.pre_mlp_layernorm = torch.nn.RMSNorm(m.hidden_size, eps=m.norm_epsilon)
        if layer_number in spec.stem_layers:
            self.mlp = StemMLP(
                m.hidden_size,
                m.ffn_hidden_size,
                spec.vocab_size,
                config,
                spec.tp_size,
                tp_group,
                spec.table_rows,
            )
        else:
            self.mlp = SwiGLUMLP(m.hidden_size, m.ffn_hidden_size, config, tp_group)

    def forward(self, x, token_ids, cos, sin):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.pre_mlp_layernorm(x), token_ids)


class GlobalLayers(torch.nn.ModuleDict):
    """Layers named by their global layer number (so names agree across pipeline stages)
    that iterate like a ModuleList, as megatron-core's schedules expect of `decoder.layers`."""

    def __iter__(self):
        return iter(self.values())


class TransformerBlock(torch.nn.Module):
    def __init__(self, spec: ModelSpec, config: TransformerConfig, tp_group: TPGroup | None = None):
        super().__init__()
        self.config = config
        self.layers = GlobalLayers(
            {str(i): TransformerLayer(spec, i, config, tp_group) for i in spec.local_layers}
        )
        if spec.post_process:
            self.final_layernorm = torch.nn.RMSNorm(
                spec.model.hidden_size, eps=spec.model.norm_epsilon
            )

    def forward(self, x, token_ids, cos, sin):
        """The layers, with full recomputation where the config asks for it (recompute.py)."""
        return run_layers(list(self.layers), self.config, self.training, x, token_ids, cos, sin)


class StemGPTModel(torch.nn.Module):
    def __init__(self, spec: ModelSpec, tp_group: TPGroup | None = None):
        super().__init__()
        m = spec.model
        if m.num_query_groups % spec.tp_size or m.ffn_hidden_size % spec.tp_size:
            raise ValueError(
                f"tensor_model_parallel_size ({spec.tp_size}) must divide "
                f"model.num_query_groups ({m.num_query_groups}) and model.ffn_hidden_size "
                f"({m.ffn_hidden_size})"
            )
        if tp_group is not None and (tp_group.size(), tp_group.rank()) != (
            spec.tp_size,
            spec.tp_rank,
        ):
            raise ValueError(
                f"tp_group is rank {tp_group.rank()} of {tp_group.size()}, the "
                f"spec says rank {spec.tp_rank} of {spec.tp_size}"
            )
        self.spec = spec
        self.config = megatron_config(spec)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's schedules
        self.tied = not m.untie_embeddings_and_output_weights
        if spec.pre_process:
            self.embedding = torch.nn.Module()
            self.embedding.word_embeddings = VocabParallelEmbedding(
                spec.padded_vocab_size,
                m.hidden_size,
                init_method=lambda w: None,
                config=self.config,
                tp_group=tp_group,
                # SP: [b, s] ids -> [s/TP, b, h], one reduce-scatter instead of an all-reduce
                reduce_scatter_embeddings=spec.sequence_parallel,
            )
            set_tp_shard(self.embedding.word_embeddings.weight, TPShard(dim=0))
            if self.tied and not spec.post_process:  # the last stage holds a copy (below)
                mark_shared_embedding(self.embedding.word_embeddings.weight)
        elif spec.post_process and self.tied:
            # The last of several pipeline stages holds a copy of the tied embedding for the
            # head (as Megatron does), under the embedding's name: initialised alike, its
            # gradient summed with the first stage's, so the two never part.
            self.embedding = torch.nn.Module()
            self.embedding.word_embeddings = torch.nn.Module()
            copy = torch.nn.Parameter(
                torch.empty(spec.padded_vocab_size // spec.tp_size, m.hidden_size)
            )
            self.embedding.word_embeddings.weight = copy
            set_tp_shard(copy, TPShard(dim=0))
            mark_tied_copy(copy)
        self.decoder = TransformerBlock(spec, self.config, tp_group)
        if spec.sequence_parallel:
            # Each TP rank's norms see its s/TP tokens: megatron-core's finalize_model_grads
            # sums these weights' gradients over the TP group.
            for module in self.modules():
                if isinstance(module, torch.nn.RMSNorm):
                    module.weight.sequence_parallel = True
        if spec.post_process:
            self.output_layer = ColumnParallelLinear(
                m.hidden_size,
                spec.padded_vocab_size,
                config=self.config,
                init_method=lambda w: None,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=self.tied,
                tp_group=tp_group,
            )
            if not self.tied:
                set_tp_shard(self.output_layer.weight, TPShard(dim=0))
        cos, sin = rotary_cos_sin(
            m.seq_length, m.hidden_size // m.num_attention_heads, m.rope_theta, m.rope_scaling
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.input_tensor: torch.Tensor | None = None

    # What megatron-core's finalize_model_grads reads to sum the tied embedding's gradients
    # over the first and last pipeline stages.
    @property
    def pre_process(self) -> bool:
        return self.spec.pre_process

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.tied

    def shared_embedding_or_output_weight(self) -> torch.nn.Parameter | None:
        """The tied embedding (or this last stage's copy of it); None on middle stages."""
        if not self.tied or not hasattr(self, "embedding"):
            return None
        return self.embedding.word_embeddings.weight

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their hidden states here (megatron API)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def stem_tables(self) -> dict[str, StemTable]:
        return {name: mod for name, mod in self.named_modules() if isinstance(mod, StemTable)}

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        stem_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids/labels: [b, s]. Returns per-token losses [b, s] when labels are given on
        the last stage, logits [b, s, padded_vocab/TP] without labels, else hidden [s, b, h].
        `stem_ids` ([b, s], default input_ids): the ids the STEM tables are indexed by. On-the-fly
        knowledge editing redirects the lookups this way while the embedding sees the real text."""
        if stem_ids is not None and stem_ids.shape != input_ids.shape:
            raise ValueError(
                f"stem_ids {tuple(stem_ids.shape)} must have the shape of input_ids "
                f"{tuple(input_ids.shape)}"
            )
        s = input_ids.shape[1]
        if s > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence of {s} tokens is longer than model.seq_length ({self.rope_cos.shape[0]})"
            )
        if self.spec.sequence_parallel and s % self.spec.tp_size:
            raise ValueError(
                f"sequence parallelism splits the {s} tokens of a sequence over "
                f"{self.spec.tp_size} tensor-parallel ranks: it must divide them"
            )
        if not self.spec.pre_process:
            x = self.input_tensor
        elif self.spec.sequence_parallel:
            x = self.embedding.word_embeddings(input_ids)  # [s/TP, b, h] already
        else:
            x = self.embedding.word_embeddings(input_ids).transpose(0, 1).contiguous()
        # [s, b]: every TP rank has all ids (STEM reads its columns for the gathered sequence)
        token_ids = (input_ids if stem_ids is None else stem_ids).transpose(0, 1)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        x = self.decoder(x, token_ids, cos, sin)
        if not self.spec.post_process:
            return x
        x = self.decoder.final_layernorm(x)
        weight = self.embedding.word_embeddings.weight if self.tied else None
        # [s, b, padded_vocab/TP]; under SP the head all-gathers the sequence first
        logits = self.output_layer(x, weight=weight)[0]
        if labels is None:
            return logits.transpose(0, 1)
        # vocab_parallel_cross_entropy overwrites its input; the logits are not reused.
        labels = labels.transpose(0, 1).contiguous()
        return vocab_parallel_cross_entropy(logits.float(), labels).transpose(0, 1)

    def init_parameters(self, seed: int) -> None:
        """Every parameter in place: its part of the model's seeded initial values
        (model/init.py), the same in every layout."""
        spec = self.spec
        init_parameters(self.named_parameters(), seed, spec.model, spec.tp_rank, spec.tp_size)
