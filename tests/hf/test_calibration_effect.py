"""Measured: how close a STEM model imported from a trained dense model starts, with fresh
xavier tables (the paper's rule) vs calibrated tables, and after a short continued
pretraining. Slow (trains a small dense model first): `pytest -m slow -s tests/hf/...`."""

from __future__ import annotations

import pytest

from stem_megatron.config_loader import load_config
from stem_megatron.hf.exporter import export_checkpoint
from stem_megatron.hf.importer import Calibration, import_llama
from stem_megatron.training.trainer import Trainer

DENSE = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.ffn_hidden_size=192",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=64",
    "model.make_vocab_size_divisible_by=64",
    "stem.enabled=false",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
    "train.eval_iters=8",
    "train.eval_interval=0",
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "optim.lr_warmup_iters=20",
    "logging.log_interval=50",
]
CONTINUE_STEPS = 40


@pytest.mark.slow
def test_calibrated_tables_start_closer_to_the_dense_model(parallel, tmp_path, small_corpus):
    data = [
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
    ]
    dense = load_config(
        None, DENSE + data + ["train.train_iters=300", f"logging.run_dir={tmp_path / 'dense'}"]
    )
    dense_val = Trainer(dense, parallel).run().val_loss
    hf_dir = export_checkpoint(str(dense.run_dir), tmp_path / "hf", log=lambda _: None)
    calibration = Calibration(str(small_corpus["train"]), 65_536)
    results = {}
    for rule in ("xavier", "calibrated"):
        out = import_llama(
            hf_dir,
            tmp_path / rule,
            ["stem.layers=[1,3]"],
            calibration if rule == "calibrated" else None,
            log=lambda _: None,
        )
        config = load_config(
            out / "config.yaml",
            data
            + [
                f"train.train_iters={CONTINUE_STEPS}",
                "train.eval_interval=0",
                "train.micro_batch_size=8",
                "train.global_batch_size=8",
                "train.eval_iters=8",
                f"logging.run_dir={tmp_path / (rule + '_run')}",
                "logging.log_interval=50",
            ],
        )
        trainer = Trainer(config, parallel)
        start = trainer.evaluate()
        results[rule] = (start, trainer.run().val_loss)
    print(f"\ndense after 300 steps: val {dense_val:.4f}")
    for rule, (start, end) in results.items():
        print(
            f"STEM layers [1,3], {rule} tables: val {start:.4f} at import, {end:.4f} after "
            f"{CONTINUE_STEPS} steps (backbone lr 1e-5, tables 5e-4)"
        )
    assert results["calibrated"][0] < results["xavier"][0]
