"""RowPrefetcher and the host storage tier: staged rows equal the table's, staging buffers are
reused and grow only when needed, a late prefetch is measured as a stall, tables consume
micro-batches at their own pace, no row is staged stale after an update, the staged lookup's
gradient equals the direct lookup's, and host-memory checks fail before allocating."""

from __future__ import annotations

import time

import pytest
import torch

from stem_megatron.stem.lookup import RowGradAccumulator, staged_lookup, stem_lookup
from stem_megatron.stem.prefetch import RowPrefetcher, RowRequest
from stem_megatron.stem.storage import available_host_bytes, check_host_fits, host_table_bytes

CPU = torch.device("cpu")


def requests(batches: list[torch.Tensor]) -> list[RowRequest]:
    return [RowRequest.of_ids(ids) for ids in batches]


def micro_batches(count: int, vocab: int, shape=(4, 8), seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=gen) for _ in range(count)]


def consume(
    prefetcher: RowPrefetcher, name: str, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One lookup's staged (unique ids, rows copy, staging buffer address)."""
    with prefetcher.staged(name, ids.numel()) as staged:
        return staged.unique_ids.clone(), staged.rows.clone(), staged.rows.data_ptr()


def test_staged_rows_equal_table_rows_and_buffers_are_reused():
    tables = {"a": torch.randn(50, 6), "b": torch.randn(50, 6)}
    batches = micro_batches(5, 50)
    prefetcher = RowPrefetcher(tables, CPU)
    addresses = []
    with prefetcher.prefetching(requests(batches)):
        for ids in batches:
            for name, table in tables.items():
                unique, rows, address = consume(prefetcher, name, ids)
                assert torch.equal(unique, torch.unique(ids))
                assert torch.equal(rows, table[unique])
                if name == "a":
                    addresses.append(address)
    metrics = prefetcher.finish()
    # Two slots, alternating: micro-batch i + 2 reads from micro-batch i's buffer.
    assert addresses[0] == addresses[2] == addresses[4] and addresses[1] == addresses[3]
    assert addresses[0] != addresses[1]
    expected = sum(torch.unique(ids).numel() * (6 * 4 + 8) for ids in batches) * len(tables)
    assert metrics["stem/bytes_h2d"] == expected
    capacity = prefetcher.slot_capacity("a")
    # A step whose micro-batches need no more rows keeps the buffers; a bigger one grows them.
    with prefetcher.prefetching(requests(batches[:2])):
        for ids in batches[:2]:
            for name in tables:
                consume(prefetcher, name, ids)
    prefetcher.finish()
    assert prefetcher.slot_capacity("a") == capacity
    wide = torch.arange(0, 50).repeat(20)[None]  # every row, more than a slot holds
    with prefetcher.prefetching(requests([wide])):
        for name, table in tables.items():
            _, rows, _ = consume(prefetcher, name, wide)
            assert torch.equal(rows, table)
    prefetcher.finish()
    assert (
        prefetcher.slot_capacity("a")[0] >= 50 and prefetcher.slot_capacity("a")[1] == capacity[1]
    )


def test_tables_consume_micro_batches_at_their_own_pace():
    """Interleaved pipelining: one chunk's table runs ahead of another's. Table a reads all
    micro-batches before table b reads its first; with two slots per table this must not wait
    on b."""
    tables = {"a": torch.randn(30, 4), "b": torch.randn(30, 4)}
    batches = micro_batches(6, 30)
    prefetcher = RowPrefetcher(tables, CPU)
    with prefetcher.prefetching(requests(batches)):
        for name in ("a", "b"):
            for ids in batches:
                unique, rows, _ = consume(prefetcher, name, ids)
                assert torch.equal(rows, tables[name][unique])
    prefetcher.finish()


def test_late_prefetch_is_measured_as_stall():
    table = torch.randn(200_000, 64)
    big = torch.randint(0, 200_000, (1, 2_000_000))
    prefetcher = RowPrefetcher({"t": table}, CPU)
    with prefetcher.prefetching(requests([big])):  # read at once: the gather cannot be done yet
        consume(prefetcher, "t", big)
    slow = prefetcher.finish()["stem/prefetch_stall_ms"]
    small = torch.randint(0, 200_000, (1, 64))
    with prefetcher.prefetching(requests([small])):
        time.sleep(0.5)  # computing: the 64 rows are staged meanwhile
        consume(prefetcher, "t", small)
    ready = prefetcher.finish()["stem/prefetch_stall_ms"]
    assert slow > 1.0 and ready < slow


def test_no_stale_row_after_an_update():
    table = torch.zeros(20, 3)
    ids = torch.tensor([[1, 2, 3, 2]])
    prefetcher = RowPrefetcher({"t": table}, CPU)
    with prefetcher.prefetching(requests([ids])):
        consume(prefetcher, "t", ids)
    prefetcher.finish()
    assert not prefetcher.active  # the staging thread is joined before the update
    table.index_add_(0, torch.tensor([2, 3]), torch.ones(2, 3))  # the step's row update
    with prefetcher.prefetching(requests([ids])):
        unique, rows, _ = consume(prefetcher, "t", ids)
    prefetcher.finish()
    assert torch.equal(rows, table[unique]) and rows[1:].eq(1).all()


def test_out_of_order_and_missing_lookups_are_errors():
    prefetcher = RowPrefetcher({"t": torch.randn(10, 2)}, CPU)
    batches = [torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5]])]
    with pytest.raises(RuntimeError, match="out of order"):
        with prefetcher.prefetching(requests(batches)):
            consume(prefetcher, "t", batches[1])
    assert not prefetcher.active
    with prefetcher.prefetching(requests(batches)):
        consume(prefetcher, "t", batches[0])
    with pytest.raises(RuntimeError, match="fewer times"):
        prefetcher.finish()


def test_staged_lookup_matches_direct_lookup_forward_and_gradient():
    table = torch.nn.Parameter(torch.randn(40, 5))
    ids = torch.randint(0, 40, (7, 3))
    upstream = torch.randn(7, 3, 5)
    direct, staged = RowGradAccumulator(), RowGradAccumulator()
    (stem_lookup(table, ids, direct) * upstream).sum().backward()
    unique = torch.unique(ids)
    out = staged_lookup(table, ids, unique, table.detach()[unique].clone(), staged)
    assert torch.equal(out, table.detach()[ids])
    (out * upstream).sum().backward()
    assert table.grad is None
    for a, b in zip(direct.reduce(), staged.reduce()):
        assert torch.equal(a, b)


def test_host_memory_check_names_needed_and_available_bytes():
    needed = host_table_bytes(1000, 64, torch.float32, exact=True)
    assert needed == 1000 * 64 * 12 + 1000 * 8
    check_host_fits(needed, "a table", available=needed)
    with pytest.raises(MemoryError, match=r"needs 776,000 bytes .* only 1,000 bytes are available"):
        check_host_fits(needed, "a table", available=1000)
    assert available_host_bytes() > 0


def test_host_table_outside_a_prefetched_step_stages_synchronously():
    """A host table looked up with no step being prefetched (generation, a direct call)
    gathers its rows on the spot, with the same output and row gradient."""
    from stem_megatron.stem.table import StemTable

    torch.manual_seed(0)
    device_table = StemTable(30, 4)
    torch.nn.init.normal_(device_table.weight)
    host_table = StemTable(30, 4)
    host_table.weight.data.copy_(device_table.weight.data)
    host_table.move_to_host("cpu")
    assert host_table.on_host and host_table.prefetcher is None
    ids = torch.randint(0, 30, (5, 2))
    for table in (device_table, host_table):
        table(ids).pow(2).sum().backward()
    assert torch.equal(host_table(ids), device_table(ids))
    for a, b in zip(host_table.grad_accumulator.reduce(), device_table.grad_accumulator.reduce()):
        assert torch.equal(a, b)
