"""The storage tiers on CUDA: device tables, host tables (pinned, rows staged on the copy
engine's side stream), host tables with the hot-row cache and mmap tables with it, in lazy and
exact mode, train like device tables: the same losses, step by step.

On CPU these are bitwise equal (tests/training/test_host_tables.py, test_host_cache.py,
tests/stem/test_mmap_tier.py). On CUDA they are compared to rtol 1e-4: host tables are updated
by the CPU kernel and device tables on the GPU, and CUDA's backward accumulates gradients with
float atomics whose order varies, so equal math may round differently. The tables learn fast
(stem.optimizer.lr 0.1) so that what they read shows in the loss: on CPU, host tables read
stale (their initial rows) every step moved the losses by 2e-4 at step 3 and 3e-3 at step 10.
Rows a stream race corrupts are caught bitwise by test_gpu_prefetch.py."""

from __future__ import annotations

import pytest

from stem_megatron.training.trainer import Trainer
from tests.training.test_trainer import metrics_by_step

pytestmark = pytest.mark.gpu
STEPS = 10
CACHE_ROWS = 48
VARIANTS = {
    "device": ["stem.storage=device"],
    "host": ["stem.storage=host"],
    "host_cache": ["stem.storage=host", f"stem.cache_rows={CACHE_ROWS}"],
    "mmap_cache": ["stem.storage=mmap", f"stem.cache_rows={CACHE_ROWS}"],
}


def check_placement(trainer: Trainer, variant: str) -> None:
    """Tables and both moments where their tier keeps them; host copies on a side stream."""
    tables = trainer.tables
    for name, table in tables.tables.items():
        weight = table.weight.detach()
        assert table.on_host == (variant != "device"), name
        assert weight.device.type == ("cuda" if variant == "device" else "cpu"), name
        if variant.startswith("host"):
            assert weight.is_pinned(), name  # asynchronous copies need page-locked rows
        for moment in (tables.optimizer.exp_avg[name], tables.optimizer.exp_avg_sq[name]):
            assert moment.device == weight.device, name
    if variant != "device":
        assert tables.prefetcher.engine.stream is not None  # not the compute stream
        assert (tables.prefetcher.cache is not None) == variant.endswith("cache")


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_host_and_mmap_tables_train_like_device_tables_on_cuda(
    tiny_config, parallel, tmp_path, mode
):
    runs = {}
    for variant, extra in VARIANTS.items():
        config = tiny_config(
            *extra,
            "stem.layers=[0,1]",
            "train.micro_batch_size=1",  # 4 micro-batches a step: both staging slots in use
            "stem.optimizer.lr=0.1",
            f"stem.optimizer.mode={mode}",
            f"train.train_iters={STEPS}",
            "train.eval_interval=5",
            f"stem.mmap_dir={tmp_path / 'maps'}",
            f"logging.run_dir={tmp_path / variant}",
        )
        trainer = Trainer(config, parallel)
        check_placement(trainer, variant)
        trainer.run()
        runs[variant] = metrics_by_step(config.run_dir)
        del trainer
    device = runs.pop("device")
    for variant, run in runs.items():
        for step in range(1, STEPS + 1):
            got, want = run[step]["loss/train"], device[step]["loss/train"]
            assert got == pytest.approx(want, rel=1e-4), (variant, step)
            assert run[step]["stem/unique_rows"] == device[step]["stem/unique_rows"]
            assert run[step]["stem/bytes_h2d"] > 0 and run[step]["stem/prefetch_stall_ms"] >= 0
            hits = run[step]["stem/cache_hit_rate"]
            assert hits > 0 if variant.endswith("cache") else hits == 0, (variant, step)
        for step in (5, STEPS):
            assert run[step]["loss/val"] == pytest.approx(device[step]["loss/val"], rel=1e-4)
    assert device[STEPS]["stem/bytes_h2d"] == 0
