"""Host-resident STEM tables (`stem.storage=host`) train exactly like device tables: the
same rows reach the same math, only where they are read from changes. Also: resume from a
checkpoint of host tables, their metrics, and the configurations that are refused."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.config import ConfigError
from stem_megatron.training.trainer import Trainer
from tests.training.test_trainer import metrics_by_step

STEPS = 50


def test_host_tables_train_exactly_like_device_tables(tiny_config, parallel, tmp_path):
    """50 steps of two tables, with evaluations: identical losses and parameters (bitwise)."""
    runs = {}
    for storage in ("device", "host"):
        config = tiny_config(
            f"stem.storage={storage}",
            "stem.layers=[0,1]",
            f"train.train_iters={STEPS}",
            "train.eval_interval=25",
            f"logging.run_dir={tmp_path / storage}",
        )
        trainer = Trainer(config, parallel)
        trainer.run()
        assert trainer.tables.prefetcher is None or not trainer.tables.prefetcher.active
        tables = trainer.tables.tables.values()
        assert all(t.on_host == (storage == "host") for t in tables)
        runs[storage] = (
            metrics_by_step(config.run_dir),
            {n: p.detach().clone() for n, p in trainer.chunks[0].named_parameters()},
        )
    (device, device_params), (host, host_params) = runs["device"], runs["host"]
    assert sorted(host) == list(range(1, STEPS + 1))
    for step in host:
        for tag in ("loss/train", "optim/grad_norm", "stem/unique_rows"):
            assert host[step][tag] == device[step][tag], (step, tag)
    assert host[25]["loss/val"] == device[25]["loss/val"]
    assert host[STEPS]["loss/val"] == device[STEPS]["loss/val"]
    for name, value in device_params.items():
        assert torch.equal(host_params[name], value), name
    # Bytes: each step stages every micro-batch's unique rows (fp32 rows of 64 plus int64 ids)
    # of 2 tables and returns the step's unique rows' gradients.
    row = host[STEPS]
    assert row["stem/bytes_h2d"] >= row["stem/unique_rows"] * (64 * 4 + 8)
    assert row["stem/bytes_d2h"] == row["stem/unique_rows"] * (64 * 4 + 8)
    assert row["stem/prefetch_stall_ms"] >= 0 and row["stem/sparse_optim_ms"] > 0
    assert device[STEPS]["stem/bytes_h2d"] == device[STEPS]["stem/bytes_d2h"] == 0
    assert device[STEPS]["stem/sparse_optim_ms"] > 0


def test_unknown_storage_is_a_config_error(tiny_config):
    with pytest.raises(
        ConfigError, match=r"stem.storage must be one of 'device', 'host', 'mmap', got 'ssd'"
    ):
        tiny_config("stem.storage=ssd")


def test_tables_larger_than_host_memory_are_refused_before_allocation(tiny_config, parallel):
    # 2^34 rows x 64 x 12 bytes: ~13 TB of tables and optimizer state; allocating would fail.
    config = tiny_config("stem.storage=host", f"model.vocab_size={2**34}")
    with pytest.raises(
        MemoryError,
        match=r"1 host-tier STEM tables of \[17179869184, 64\] "
        r"with their optimizer state needs [\d,]+ bytes of "
        r"host memory but only [\d,]+ bytes are available",
    ):
        Trainer(config, parallel)
