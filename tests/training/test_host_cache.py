"""The hot-row cache of host tables (`stem.cache_rows`) changes where rows are read from, never
what is read: training is bitwise the same with and without it, exact mode resumes through it,
and it moves fewer bytes to the device."""

from __future__ import annotations

import pytest
import torch

from stem_megatron.config import ConfigError
from stem_megatron.training.trainer import Trainer
from tests.training.test_trainer import metrics_by_step

STEPS = 20
CACHE_ROWS = 48


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_cache_trains_bitwise_like_no_cache_and_moves_fewer_bytes(
    tiny_config, parallel, tmp_path, mode
):
    runs = {}
    for rows in (0, CACHE_ROWS):
        config = tiny_config(
            "stem.storage=host",
            f"stem.cache_rows={rows}",
            "stem.layers=[0,1]",
            "train.micro_batch_size=1",
            f"stem.optimizer.mode={mode}",
            f"train.train_iters={STEPS}",
            "train.eval_interval=10",
            f"logging.run_dir={tmp_path / str(rows)}",
        )
        trainer = Trainer(config, parallel)
        trainer.run()
        runs[rows] = (
            metrics_by_step(config.run_dir),
            {n: p.detach().clone() for n, p in trainer.chunks[0].named_parameters()},
        )
        if rows:  # the cache holds exactly the host rows it caches
            cache = trainer.tables.prefetcher.cache
            assert cache.num_rows == CACHE_ROWS
            for name, table in trainer.tables.tables.items():
                assert torch.equal(cache.rows[name], table.weight.detach()[cache.ids])
    (plain, plain_params), (cached, cached_params) = runs[0], runs[CACHE_ROWS]
    for step in range(1, STEPS + 1):
        for tag in ("loss/train", "optim/grad_norm", "stem/unique_rows"):
            assert cached[step][tag] == plain[step][tag], (step, tag)
        assert plain[step]["stem/cache_hit_rate"] == 0.0
        assert 0.3 < cached[step]["stem/cache_hit_rate"] <= 1.0  # Zipfian tokens
    assert cached[10]["loss/val"] == plain[10]["loss/val"]
    for name, value in plain_params.items():
        assert torch.equal(cached_params[name], value), name
    # Fewer bytes to the device in total, refreshes of updated hot rows included: a hot row
    # is copied once per update instead of once per micro-batch (4 here) that reads it.
    moved = {
        rows: sum(run[s]["stem/bytes_h2d"] for s in run if "stem/bytes_h2d" in run[s])
        for rows, (run, _) in runs.items()
    }
    assert moved[CACHE_ROWS] < moved[0]
    assert all(cached[s]["stem/cache_refresh_bytes"] > 0 for s in range(1, STEPS + 1))
    assert all(plain[s]["stem/cache_refresh_bytes"] == 0 for s in range(1, STEPS + 1))


def test_cache_needs_host_storage(tiny_config):
    with pytest.raises(ConfigError, match="stem.cache_rows caches rows of host-resident tables"):
        tiny_config("stem.cache_rows=8")
    with pytest.raises(ConfigError, match="stem.cache_rows must be >= 0, got -1"):
        tiny_config("stem.storage=host", "stem.cache_rows=-1")
