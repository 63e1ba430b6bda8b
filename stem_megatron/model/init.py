"""Parameter initialisation drawn in row blocks, so a rank draws only the rows it holds.

Every parameter has one initial value whatever the layout: its full (logical) tensor. That
tensor is cut into blocks of whole rows of at most `BLOCK_ELEMENTS` elements, and block k is
drawn from a generator seeded by (seed, parameter name, k). A rank draws only the blocks that
meet its own rows (its TP slice when the split is along rows, its vocab-sharded row block) and
copies the part it holds (its TP columns when the split is along columns) straight into the
parameter, wherever that lives (device, host, pinned or a memory-mapped file). One block, 64 MiB
in fp32, is the only temporary: a table is never whole in a process that holds part of it, and
an mmap table never passes through RAM as a whole.

Block 0 is seeded by (seed, name) alone, the generator whole tensors were drawn from before
blocks existed: a tensor of at most one block keeps exactly its earlier values.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from stem_megatron.config import ModelConfig
from stem_megatron.sharding import TPShard, full_shape, get_row_block, get_tp_shard
from stem_megatron.stem.table import xavier_normal_std

BLOCK_ELEMENTS = 2**24


@dataclass(frozen=True)
class Span:
    """Indices [start, end) of the full tensor along one dimension, held from `local` on."""

    start: int
    end: int
    local: int


def held_spans(
    size: int, shard: TPShard | None, dim: int, tp_rank: int, tp_size: int
) -> list[Span]:
    """The indices along `dim` (of `size` in full) that TP rank `tp_rank` holds, in local
    order: each of the shard's `chunks` blocks split into `tp_size` ceil-sized pieces (as
    torch.chunk), the rank's piece of each, concatenated."""
    if shard is None or shard.dim != dim or tp_size == 1:
        return [Span(0, size, 0)]
    spans, local = [], 0
    chunk = -(-size // shard.chunks)
    for c in range(shard.chunks):
        start, end = c * chunk, min((c + 1) * chunk, size)
        piece = -(-(end - start) // tp_size)
        lo, hi = min(start + tp_rank * piece, end), min(start + (tp_rank + 1) * piece, end)
        if lo < hi:
            spans.append(Span(lo, hi, local))
            local += hi - lo
    return spans


def window(spans: list[Span], start: int, end: int) -> list[Span]:
    """`spans` restricted to local indices [start, end), renumbered from 0."""
    out = []
    for s in spans:
        lo = max(s.local, start)
        hi = min(s.local + s.end - s.start, end)
        if lo < hi:
            out.append(Span(s.start + lo - s.local, s.start + hi - s.local, lo - start))
    return out


def rows_per_block(shape: tuple[int, ...], block_elements: int) -> int:
    return max(1, block_elements // math.prod(shape[1:]))


def block_generator(seed: int, name: str, block: int) -> torch.Generator:
    """Block `block`'s generator, from the run seed, the parameter's name and the block alone
    (not the rank or stage that draws it); block 0's is the one whole tensors were drawn from."""
    key = name if block == 0 else f"{name}#block{block}"
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))


def draw_block(
    shape: tuple[int, ...], std: float, seed: int, name: str, block: int, block_elements: int
) -> torch.Tensor:
    """Rows of block `block` of the full normal(0, std) tensor of `shape`."""
    per_block = rows_per_block(shape, block_elements)
    start = block * per_block
    rows = min(per_block, shape[0] - start)
    return torch.empty((rows, *shape[1:])).normal_(
        0.0, std, generator=block_generator(seed, name, block)
    )


@torch.no_grad()
def fill_normal_(
    param: torch.Tensor,
    name: str,
    std: float,
    seed: int,
    tp_rank: int,
    tp_size: int,
    block_elements: int | None = None,
) -> None:
    """Write into `param` its part of the full normal(0, std) tensor named `name`, drawn in
    blocks of `block_elements` (None: `BLOCK_ELEMENTS`, read when called)."""
    block_elements = block_elements or BLOCK_ELEMENTS
    shape = full_shape(param, tp_size)
    shard = get_tp_shard(param)
    rows = held_spans(shape[0], shard, 0, tp_rank, tp_size)
    row_block = get_row_block(param)
    if row_block is not None:
        rows = window(rows, row_block.start, row_block.end)
    col_dim = shard.dim if shard is not None and shard.dim != 0 else None
    cols = None
    if col_dim is not None:
        cols = held_spans(shape[col_dim], shard, col_dim, tp_rank, tp_size)
    per_block = rows_per_block(shape, block_elements)
    blocks = sorted({k for s in rows for k in range(s.start // per_block, -(-s.end // per_block))})
    for k in blocks:
        drawn = draw_block(shape, std, seed, name, k, block_elements)
        _copy_held(param, drawn, k * per_block, rows, cols, col_dim)


def _copy_held(
    param: torch.Tensor,
    drawn: torch.Tensor,
    first: int,
    rows: list[Span],
    cols: list[Span] | None,
    col_dim: int | None,
) -> None:
    """Copy into `param` the rows of `drawn` (full rows from `first` on) that it holds, and of
    those only its columns."""
    for s in rows:
        lo, hi = max(s.start, first), min(s.end, first + drawn.shape[0])
        if lo >= hi:
            continue
        src = drawn.narrow(0, lo - first, hi - lo)
        dst = param.narrow(0, s.local + lo - s.start, hi - lo)
        if cols is None:
            dst.copy_(src)
            continue
        for c in cols:
            width = c.end - c.start
            dst.narrow(col_dim, c.local, width).copy_(src.narrow(col_dim, c.start, width))


def init_std(name: str, shape: tuple[int, ...], model: ModelConfig) -> float:
    """Megatron's init: `init_method_std`, scaled by 1/sqrt(2 layers) for the projections into
    the residual stream; STEM tables xavier-normal over the full [V, d_ff] table."""
    if name.endswith("stem_table.weight"):
        return xavier_normal_std(*shape)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return model.init_method_std / math.sqrt(2.0 * model.num_layers)
    return model.init_method_std


@torch.no_grad()
def init_parameters(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    seed: int,
    model: ModelConfig,
    tp_rank: int,
    tp_size: int,
) -> None:
    """Every parameter in place: norms to one, the rest their part of the seeded draw."""
    for name, param in named_parameters:
        if name.endswith("layernorm.weight"):
            param.fill_(1.0)
            continue
        std = init_std(name, full_shape(param, tp_size), model)
        fill_normal_(param, name, std, seed, tp_rank, tp_size)
