"""The STEM table lookup and its row-sparse gradient.

A STEM layer reads one row of its table U [vocab, d_ff] per token. The table must never get
a dense [vocab, d_ff] gradient: that would cost V * d_ff memory and bandwidth per step for a
batch that touched a few thousand rows. So the lookup is an autograd Function whose backward
sums the output gradient per unique id and hands the [n_unique, d] rows to a
`RowGradAccumulator` instead of returning a gradient for the table; `table.grad` stays None.

The table Parameter keeps `requires_grad=True` (it is a parameter: state_dict, parameter
counts, and autograd must record the lookup), but the trainer keeps it out of the dense
optimizer and DDP. The accumulated rows go to `stem.sparse_adam.SparseRowAdamW`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least: bf16 row gradients summed over micro-batches lose too many bits.
    return torch.float64 if dtype == torch.float64 else torch.float32


class RowGradAccumulator:
    """Row-sparse gradient of one table across the micro-batches of one optimizer step.

    Each backward adds (unique_ids, rows_grad) for its micro-batch; `reduce()` merges the
    chunks into sorted unique ids with summed rows and caches the result until the next
    `add` or `clear`. Rows are kept in fp32 whatever dtype the backward produced.

    Memory: an `add` that brings the held rows above twice the rows of the last merge (or of
    its own chunk) merges first, so a step of many micro-batches holds at most about three
    times its unique rows (never more than ~3x the table), not one chunk per micro-batch;
    each added row is merged O(1) times amortised.
    """

    def __init__(self, dim: int | None = None, device: torch.device | str | None = None) -> None:
        # dim/device only shape the empty result; they are inferred from the first add.
        self._dim = dim
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._chunks: list[tuple[Tensor, Tensor]] = []
        self._reduced: tuple[Tensor, Tensor] | None = None
        self._held_rows = 0  # rows over all chunks
        self._merged_rows = 0  # rows of the last merge
        self.adds = 0  # backward passes that delivered rows since the last clear
        self.on_add: Callable[[int], None] | None = None  # called with `adds` after each add

    def add(self, unique_ids: Tensor, rows_grad: Tensor) -> None:
        """Add one micro-batch's rows. `unique_ids` [n] must not repeat within the call.

        The accumulator takes ownership of `rows_grad` (no copy when it is fp32 already):
        `scale_` may later modify it in place.
        """
        if (
            unique_ids.dim() != 1
            or rows_grad.dim() != 2
            or rows_grad.shape[0] != unique_ids.numel()
        ):
            raise ValueError(
                f"RowGradAccumulator.add expects ids [n] and rows [n, d], got "
                f"{tuple(unique_ids.shape)} and {tuple(rows_grad.shape)}"
            )
        if self._dim is not None and rows_grad.shape[1] != self._dim:
            raise ValueError(
                f"row width {rows_grad.shape[1]} does not match accumulator width {self._dim}"
            )
        self._dim = rows_grad.shape[1]
        self._device = rows_grad.device
        grad = rows_grad.detach().to(_accum_dtype(rows_grad.dtype))
        self._chunks.append((unique_ids.detach().long(), grad))
        self._reduced = None
        self._held_rows += grad.shape[0]
        if self._held_rows > 2 * max(self._merged_rows, grad.shape[0]):
            self.reduce()
        self.adds += 1
        if self.on_add is not None:
            self.on_add(self.adds)

    def reduce(self) -> tuple[Tensor, Tensor]:
        """(ids: sorted unique LongTensor [m], grad: [m, d]) with duplicates across adds summed."""
        if self._reduced is not None:
            return self._reduced
        if not self._chunks:
            ids = torch.empty(0, dtype=torch.long, device=self._device)
            grad = torch.empty(0, self._dim or 0, dtype=torch.float32, device=self._device)
            return ids, grad
        if len(self._chunks) == 1:
            ids, grad = self._chunks[0]
            # A single backward's ids come from torch.unique and are sorted already.
            if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
                order = torch.argsort(ids)
                ids, grad = ids[order], grad[order]
        else:
            all_ids = torch.cat([c[0] for c in self._chunks])
            all_grad = torch.cat([c[1] for c in self._chunks])
            ids, inverse = torch.unique(all_ids, sorted=True, return_inverse=True)
            grad = all_grad.new_zeros(ids.numel(), all_grad.shape[1]).index_add_(
                0, inverse, all_grad
            )
        # Collapse to one chunk so scale_ and later adds work on the merged rows.
        self._chunks = [(ids, grad)]
        self._held_rows = self._merged_rows = ids.numel()
        self._reduced = (ids, grad)
        return self._reduced

    def squared_norm(self) -> Tensor:
        """Squared L2 norm of the combined gradient (0-d, fp32 or fp64), for global-norm
        clipping."""
        _, grad = self.reduce()
        return grad.pow(2).sum()

    def scale_(self, factor: float | Tensor) -> None:
        """Multiply the combined gradient in place (grad clipping, loss-scale removal)."""
        _, grad = self.reduce()
        grad.mul_(factor)

    def clear(self) -> None:
        self._chunks = []
        self._reduced = None
        self._held_rows = self._merged_rows = 0
        self.adds = 0

    @property
    def num_rows(self) -> int:
        """Unique rows in the combined gradient (the `stem/unique_rows` metric)."""
        return self.reduce()[0].numel()

    @property
    def held_rows(self) -> int:
        """Rows held right now over all chunks (what the gradient costs in memory)."""
        return self._held_rows

    @property
    def is_empty(self) -> bool:
        return not self._chunks


def row_index(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(sorted unique ids, inverse) of `ids` flattened. Computed once per ids tensor: every
    STEM layer of a forward pass receives the same one, and on a GPU `torch.unique` waits for
    the device (its output size is data-dependent), so one forward pays it once, not per layer.
    Kept on the tensor itself, so it lives exactly as long as the ids it describes (which are
    therefore never modified in place)."""
    index = getattr(ids, "_stem_row_index", None)
    if index is None:
        index = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
        ids._stem_row_index = index
    return index


class _StemLookup(torch.autograd.Function):
    """Gather table rows by id; backward sends row gradients to an accumulator, not to the table."""

    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor, accumulator: RowGradAccumulator) -> Tensor:  # type: ignore[override]
        flat = ids.reshape(-1)
        # The backward's row ids (sorted: the accumulator merges sorted ids).
        unique_ids, inverse = row_index(ids)
        # One gather straight into the output: gathering the distinct rows first and then
        # expanding them writes and reads an extra copy.
        out = table.index_select(0, flat).view(*ids.shape, table.shape[1])
        ctx.save_for_backward(unique_ids, inverse)
        ctx.accumulator = accumulator
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, None, None]:  # type: ignore[override]
        _rows_backward(ctx, grad_out)
        # None for the table: no dense gradient is ever materialised, table.grad stays None.
        return None, None, None


def _rows_backward(ctx, grad_out: Tensor) -> None:
    """Sum the output gradient per unique id and hand the rows to the accumulator."""
    unique_ids, inverse = ctx.saved_tensors
    d = grad_out.shape[-1]
    grad_flat = grad_out.reshape(-1, d)
    dtype = _accum_dtype(grad_out.dtype)
    rows_grad = torch.zeros(unique_ids.numel(), d, dtype=dtype, device=grad_out.device)
    rows_grad.index_add_(0, inverse, grad_flat.to(dtype))
    ctx.accumulator.add(unique_ids, rows_grad)


class _StagedLookup(torch.autograd.Function):
    """The lookup of a host-resident table: its rows for this micro-batch's unique ids were
    staged on the compute device; ids are remapped to staging positions. `table` is an input
    only so that autograd records the lookup; the backward is the same as `_StemLookup`'s."""

    @staticmethod
    def forward(
        ctx,
        table: Tensor,
        ids: Tensor,
        unique_ids: Tensor,
        rows: Tensor,  # type: ignore[override]
        accumulator: RowGradAccumulator,
    ) -> Tensor:
        inverse = torch.searchsorted(unique_ids, ids.reshape(-1))
        out = rows.index_select(0, inverse).view(*ids.shape, rows.shape[1])
        ctx.save_for_backward(unique_ids, inverse)
        ctx.accumulator = accumulator
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, None, None, None, None]:  # type: ignore[override]
        _rows_backward(ctx, grad_out)
        return None, None, None, None, None


def stem_lookup(table: torch.nn.Parameter, ids: Tensor, accumulator: RowGradAccumulator) -> Tensor:
    """table[ids] with shape [*ids.shape, d]; in backward the row gradients go to `accumulator`.

    The output dtype is the table's (index_select is not an autocast op); the caller
    multiplies it with the gate activation. Each backward through the result adds one
    chunk to `accumulator`, so run it once per micro-batch and clear after the step.
    """
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"stem_lookup ids must be int32/int64, got {ids.dtype}")
    return _StemLookup.apply(table, ids, accumulator)


def staged_lookup(
    table: torch.nn.Parameter,
    ids: Tensor,
    unique_ids: Tensor,
    rows: Tensor,
    accumulator: RowGradAccumulator,
) -> Tensor:
    """`stem_lookup` for a table whose rows for `unique_ids` (sorted, exactly the distinct values of
    `ids`) were staged as `rows` on the compute device. The output is a new tensor, so the
    staging buffer behind `rows` may be reused once this returns."""
    return _StagedLookup.apply(table, ids, unique_ids, rows, accumulator)
