"""The two FFNs of the model: dense SwiGLU and STEM.

    dense: y = W_down( SiLU(W_gate x) * (W_up x) )
    STEM:  y = W_down( SiLU(W_gate x) * U_l[token] )

Both are built from megatron-core's parallel linears: the gate (and up) projections are
column-parallel, the down projection is row-parallel, and the STEM table is split by columns
exactly like the gate it multiplies, so under TP the lookup is local.

`tp_group` goes to megatron's layers as is; None means megatron-core's default TP group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from stem_megatron.sharding import RowBlock, TPGroup, TPShard, set_tp_shard
from stem_megatron.stem.table import StemTable


def _no_init(_weight: torch.Tensor) -> None:
    """Parameters are initialised from their full tensors afterwards (model.init_parameters)."""


def column_linear(
    in_size: int,
    out_size: int,
    config: ModelParallelConfig,
    shard: TPShard = TPShard(dim=0),
    tp_group: TPGroup | None = None,
) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(
        in_size,
        out_size,
        config=config,
        init_method=_no_init,
        bias=False,
        gather_output=False,
        tp_group=tp_group,
    )
    set_tp_shard(layer.weight, shard)
    return layer


def row_linear(
    in_size: int, out_size: int, config: ModelParallelConfig, tp_group: TPGroup | None = None
) -> RowParallelLinear:
    layer = RowParallelLinear(
        in_size,
        out_size,
        config=config,
        init_method=_no_init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
        tp_group=tp_group,
    )
    set_tp_shard(layer.weight, TPShard(dim=1))
    return layer


class SwiGLUMLP(torch.nn.Module):
    """Dense baseline. `linear_fc1` fuses [gate; up] as megatron-core's GPTModel does."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        config: ModelParallelConfig,
        tp_group: TPGroup | None = None,
    ):
        super().__init__()
        self.linear_fc1 = column_linear(
            hidden_size, 2 * ffn_hidden_size, config, TPShard(dim=0, chunks=2), tp_group
        )
        self.linear_fc2 = row_linear(ffn_hidden_size, hidden_size, config, tp_group)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x)[0].chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)[0]


class StemMLP(torch.nn.Module):
    """STEM FFN: `linear_fc1` is the gate alone; the up-projection is `stem_table[token]`."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        vocab_size: int,
        config: ModelParallelConfig,
        tp_size: int,
        tp_group: TPGroup | None = None,
        table_rows: RowBlock | None = None,
    ):
        super().__init__()
        self.linear_fc1 = column_linear(hidden_size, ffn_hidden_size, config, tp_group=tp_group)
        self.stem_table = StemTable(vocab_size, ffn_hidden_size, tp_size, row_block=table_rows)
        self.linear_fc2 = row_linear(ffn_hidden_size, hidden_size, config, tp_group)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        gate = self.linear_fc1(x)[0]
        rows = self.stem_table(token_ids)  # [s, b, d_ff/TP], fp32 even under autocast
        return self.linear_fc2(F.silu(gate) * rows.to(gate.dtype))[0]
