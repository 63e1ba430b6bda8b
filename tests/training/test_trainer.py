"""End-to-end training on a small real corpus: metrics, checkpoints, exact resume,
gradient accumulation, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from stem_megatron.checkpoint.errors import CheckpointMismatchError
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.train import main as train_main
from stem_megatron.training.trainer import Trainer
from tests.config_overrides import as_overrides
from tests.training.test_metrics import read_tb

REQUIRED_TAGS = {
    "loss/train",
    "optim/lr",
    "optim/grad_norm",
    "throughput/tokens_per_s",
    "throughput/flops_per_token",
    "stem/unique_rows",
    "params/total",
    "params/active",
}


def metrics_by_step(run_dir) -> dict[int, dict]:
    """metrics.jsonl by step; each step has one object (train and val metrics together)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["step"] not in rows, f"step {row['step']} logged twice"
        rows[row["step"]] = row
    return rows


def test_training_writes_metrics_checkpoints_and_config(tiny_config, parallel):
    config = tiny_config("checkpoint.save_interval=3")
    result = Trainer(config, parallel).run()
    run = config.run_dir
    rows = metrics_by_step(run)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for row in rows.values():
        assert REQUIRED_TAGS <= row.keys()
    assert {"loss/val"} <= rows[3].keys() and {"loss/val"} <= rows[6].keys()
    assert rows[6]["loss/train"] < rows[1]["loss/train"]  # it learns
    assert rows[1]["params/active"] < rows[1]["params/total"]
    assert result.val_loss == pytest.approx(rows[6]["loss/val"])
    # TensorBoard holds what metrics.jsonl holds: every tag at every step, same value.
    board = {
        (tag, step): value for tag, points in read_tb(run / "tb").items() for step, value in points
    }
    assert board == pytest.approx(
        {
            (tag, step): value
            for step, row in rows.items()
            for tag, value in row.items()
            if tag != "step"
        },
        rel=1e-6,
    )
    recorded = yaml.safe_load((run / "config.yaml").read_text())  # defaults spelled out
    assert recorded["model"]["vocab_size"] == load_tokenizer(config.data.tokenizer).vocab_size
    assert recorded["stem"]["layers"] == config.stem_layers()
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_6"
    assert (ckpts / "step_3").is_dir() and (ckpts / "step_6").is_dir()


@pytest.mark.parametrize(
    "mode,storage,resume_storage",
    [
        ("lazy", "device", "device"),
        ("exact", "device", "device"),
        ("exact", "host", "host"),
        ("exact", "host", "device"),  # checkpoints do not depend on the tier
        (
            "exact",
            "host stem.cache_rows=48",
            "host stem.cache_rows=48",
        ),  # through the hot-row cache
    ],
)
def test_resume_reproduces_uninterrupted_run(
    tiny_config, parallel, tmp_path, mode, storage, resume_storage
):
    full = tiny_config(
        "checkpoint.save_interval=3",
        f"stem.optimizer.mode={mode}",
        *f"stem.storage={storage}".split(),
    )
    Trainer(full, parallel).run()
    resumed = tiny_config(
        f"checkpoint.load={full.run_dir / 'checkpoints' / 'step_3'}",
        f"logging.run_dir={tmp_path / 'resumed'}",
        f"stem.optimizer.mode={mode}",
        *f"stem.storage={resume_storage}".split(),
    )
    trainer = Trainer(resumed, parallel)
    assert trainer.step == 3
    trainer.run()
    a, b = metrics_by_step(full.run_dir), metrics_by_step(resumed.run_dir)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step]["loss/train"] == a[step]["loss/train"]
        assert b[step]["optim/grad_norm"] == a[step]["optim/grad_norm"]
    assert b[6]["loss/val"] == a[6]["loss/val"]


def test_resume_between_log_steps_logs_the_uninterrupted_means(tiny_config, parallel, tmp_path):
    """loss/train is a mean over log_interval steps; a checkpoint inside a window carries the
    window's losses, so the resumed run logs the same means."""
    full = tiny_config("checkpoint.save_interval=3", "logging.log_interval=2")
    Trainer(full, parallel).run()
    resumed = tiny_config(
        f"checkpoint.load={full.run_dir / 'checkpoints' / 'step_3'}",
        f"logging.run_dir={tmp_path / 'resumed'}",
        "logging.log_interval=2",
    )
    Trainer(resumed, parallel).run()
    a, b = metrics_by_step(full.run_dir), metrics_by_step(resumed.run_dir)
    assert sorted(a) == [2, 3, 4, 6] and sorted(b) == [4, 6]  # step 3: validation only
    assert b[4]["loss/train"] == a[4]["loss/train"] and b[6].keys() == a[6].keys()
    assert b[6]["loss/train"] == a[6]["loss/train"] and b[6]["loss/val"] == a[6]["loss/val"]


def test_gradient_accumulation_matches_one_big_micro_batch(tiny_config, parallel, tmp_path):
    losses = []
    for micro in (1, 4):
        config = tiny_config(
            f"train.micro_batch_size={micro}",
            "train.train_iters=2",
            "train.eval_interval=0",
            f"logging.run_dir={tmp_path / str(micro)}",
        )
        trainer = Trainer(config, parallel)
        trainer.run()
        losses.append([metrics_by_step(config.run_dir)[s]["loss/train"] for s in (1, 2)])
        params = {n: p.detach().clone() for n, p in trainer.chunks[0].named_parameters()}
        if micro == 1:
            reference = params
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # Adam divides by sqrt(v): summation-order noise in a near-zero gradient element can move
    # it by a fraction of one step (lr 3e-3), hence atol 1e-5 rather than fp32 resolution.
    for name, value in params.items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains(tiny_config, parallel):
    config = tiny_config("train.bf16=true", "train.train_iters=3", "train.eval_interval=0")
    result = Trainer(config, parallel).run()
    assert torch.isfinite(torch.tensor(result.train_loss))


def test_dense_baseline_trains_from_same_code(tiny_config, parallel):
    config = tiny_config("stem.enabled=false", "train.train_iters=2", "train.eval_interval=0")
    trainer = Trainer(config, parallel)
    assert trainer.chunks[0].stem_tables() == {}
    trainer.run()
    assert metrics_by_step(config.run_dir)[2]["stem/unique_rows"] == 0


def test_checkpoint_of_another_shape_is_refused(tiny_config, parallel, tmp_path):
    config = tiny_config("train.train_iters=1", "optim.lr_warmup_iters=0", "train.eval_interval=0")
    Trainer(config, parallel).run()
    other = tiny_config(
        "model.ffn_hidden_size=128",
        f"checkpoint.load={config.run_dir}",
        f"logging.run_dir={tmp_path / 'other'}",
    )
    # Both the gate and the table are d_ff wide: whichever the check reaches first is named.
    with pytest.raises(
        CheckpointMismatchError,
        match=r"shape mismatch for 'model\.decoder\."
        r"layers\.\d+\.mlp\.(linear_fc1|stem_table)\.weight'.*checkpoint has",
    ):
        Trainer(other, parallel)


def test_model_vocab_smaller_than_data_is_refused_before_training(tiny_config, parallel):
    with pytest.raises(ValueError, match="vocab"):
        Trainer(tiny_config("model.vocab_size=100"), parallel)


def test_megatron_lm_dataset_without_sidecar_needs_require_meta_false(
    tiny_config, parallel, small_corpus, tmp_path
):
    """A dataset from Megatron-LM's own preprocessing has no .meta.json: refused with the
    setting that accepts it; with it, the ids are still checked against the vocab."""
    prefix = tmp_path / "megatron_lm_train"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{small_corpus['train']}{suffix}", f"{prefix}{suffix}")
    data = [f"data.train_data={prefix}", "data.valid_data=null"]
    with pytest.raises(ValueError, match="set data.require_meta=false"):
        Trainer(tiny_config(*data), parallel)
    with pytest.raises(ValueError, match="outside the vocabulary of size 100"):
        Trainer(tiny_config(*data, "data.require_meta=false", "model.vocab_size=100"), parallel)
    trainer = Trainer(
        tiny_config(
            *data,
            "data.require_meta=false",
            "train.train_iters=1",
            "optim.lr_warmup_iters=0",
            "train.eval_interval=0",
        ),
        parallel,
    )
    assert trainer.run().step == 1


def test_auto_resume_and_refusal_to_start_over_existing_checkpoints(tiny_config, parallel):
    first = tiny_config(
        "train.train_iters=2",
        "optim.lr_warmup_iters=0",
        "train.eval_interval=0",
        "checkpoint.load=auto",
    )
    assert Trainer(first, parallel).step == 0  # nothing to resume yet: a fresh start
    Trainer(first, parallel).run()
    longer = tiny_config(
        "train.train_iters=3",
        "optim.lr_warmup_iters=0",
        "train.eval_interval=0",
        "checkpoint.load=auto",
    )
    trainer = Trainer(longer, parallel)
    assert trainer.step == 2
    trainer.run()
    assert (longer.save_dir / "latest").read_text().strip() == "step_3"
    with pytest.raises(
        ValueError,
        match=r"already holds checkpoints \(latest: step_3\); resume "
        r"with checkpoint.load=auto",
    ):
        Trainer(tiny_config("train.train_iters=4"), parallel)


def test_stop_signal_saves_and_resume_matches_uninterrupted(tiny_config, parallel, tmp_path):
    import os
    import signal

    full = tiny_config("train.eval_interval=0")
    Trainer(full, parallel).run()

    stopped = tiny_config(
        "train.eval_interval=0", f"logging.run_dir={tmp_path / 'stopped'}", "checkpoint.load=auto"
    )
    trainer = Trainer(stopped, parallel)
    step = trainer.train_step

    def step_then_preempt():  # the scheduler's SIGTERM arrives during step 2
        metrics = step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    trainer.train_step = step_then_preempt
    result = trainer.run()
    assert (result.step, result.stopped_by) == (2, "SIGTERM")
    assert (stopped.save_dir / "latest").read_text().strip() == "step_2"
    Trainer(stopped, parallel).run()  # the requeued job
    a, b = metrics_by_step(full.run_dir), metrics_by_step(stopped.run_dir)
    assert [b[s]["loss/train"] for s in range(1, 7)] == [a[s]["loss/train"] for s in range(1, 7)]


def test_checkpoint_of_another_table_optimizer_mode_is_refused(tiny_config, parallel, tmp_path):
    config = tiny_config("train.train_iters=1", "optim.lr_warmup_iters=0", "train.eval_interval=0")
    Trainer(config, parallel).run()
    other = tiny_config(
        "stem.optimizer.mode=exact",
        f"checkpoint.load={config.run_dir}",
        f"logging.run_dir={tmp_path / 'other'}",
    )
    with pytest.raises(
        ValueError,
        match="trained with stem.optimizer.mode=lazy, this run uses "
        "exact: resume with stem.optimizer.mode=lazy",
    ):
        Trainer(other, parallel)


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tiny_config, capsys):
    """`checkpoint.load=auto` on a run that reached train_iters (e.g. a job requeued after it
    ended): one line, exit 0, nothing trained or overwritten."""
    config = tiny_config(
        "train.train_iters=2",
        "optim.lr_warmup_iters=0",
        "train.eval_interval=0",
        "checkpoint.load=auto",
    )
    args = as_overrides(config.to_dict()) + ["--sample-prompt", ""]
    assert train_main(args) == 0
    latest = (config.save_dir / "latest").read_text()
    metrics = (config.run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train_main(args) == 0
    assert "nothing to do: the run is at step 2 of train.train_iters=2" in capsys.readouterr().out
    assert (config.save_dir / "latest").read_text() == latest
    assert (config.run_dir / "metrics.jsonl").read_text() == metrics
