"""A checkpoint of host and mmap tables on CUDA (issue 12, defect 1): saving leaves the tables
and their moments where they live (the GPU's peak memory does not grow by their size), and a
resume gets them back bitwise, in host memory (pinned for the host tier), not on the GPU and
not left at their initial values."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.training.trainer import Trainer

pytestmark = pytest.mark.gpu
STEPS = 3


def table_state(trainer: Trainer) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each table's rows and both moments, as they are (not copied)."""
    opt = trainer.tables.optimizer
    return {
        name: (t.weight.detach(), opt.exp_avg[name], opt.exp_avg_sq[name])
        for name, t in trainer.tables.tables.items()
    }


@pytest.mark.parametrize("storage", ["host", "mmap"])
def test_host_tables_round_trip_a_checkpoint_where_they_live(
    tiny_config, parallel, tmp_path, storage
):
    def config(*extra: str):
        # Wide tables (512 x 1024) next to a narrow dense model: the tables and moments (12 MiB)
        # are 4x the dense model's parameters, gradients, main copy and Adam moments together,
        # so a save that moved them to the GPU shows in its peak memory.
        return tiny_config(
            f"stem.storage={storage}",
            "stem.layers=[0,1]",
            "model.ffn_hidden_size=1024",
            "train.eval_interval=0",
            f"stem.mmap_dir={tmp_path / 'maps'}",
            *extra,
        )

    first_config = config(f"logging.run_dir={tmp_path / 'first'}")
    first = Trainer(first_config, parallel)
    for _ in range(STEPS):
        first.train_step()
    saved = {n: tuple(t.clone() for t in ts) for n, ts in table_state(first).items()}
    table_bytes = sum(t.numel() * t.element_size() for ts in saved.values() for t in ts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    path = first.state.save(first.checkpointer, first.step, first_config)
    grown = torch.cuda.max_memory_allocated() - resident
    assert grown < table_bytes // 2, f"saving took {grown:,} GPU bytes for {table_bytes:,}"
    for name, tensors in table_state(first).items():  # saving changed nothing
        assert all(torch.equal(a, b) for a, b in zip(tensors, saved[name])), name
    del first

    resumed = Trainer(
        config(f"checkpoint.load={path}", f"logging.run_dir={tmp_path / 'resumed'}"), parallel
    )
    assert resumed.step == STEPS
    for name, tensors in table_state(resumed).items():
        for kind, got, want in zip(("table", "exp_avg", "exp_avg_sq"), tensors, saved[name]):
            assert got.device.type == "cpu", (name, kind, got.device)
            if storage == "host" and kind == "table":
                assert got.is_pinned(), name
            assert torch.equal(got, want), (name, kind)
        assert resumed.tables.tables[name].on_host
    # The resumed run trains on (its rows are staged from the loaded tables).
    assert torch.isfinite(torch.tensor(resumed.train_step()["loss/train"]))
