"""An imported Hugging Face model fine-tunes the same under tensor parallelism as on one
process: the model-only checkpoint loads into TP shards like any other checkpoint."""

from __future__ import annotations

import pytest
import torch
import yaml

from stem_megatron.config_loader import load_config
from stem_megatron.hf.importer import import_llama
from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import full_parameters, train_steps
from stem_megatron.training.trainer import Trainer
from tests.config_overrides import as_overrides


def test_imported_model_finetunes_identically_under_tp2(hf_llama, parallel, tmp_path, small_corpus):
    hf_dir, _ = hf_llama()
    out = import_llama(hf_dir, tmp_path / "imported", ["stem.layers=[1,2]"], log=lambda _: None)
    overrides = as_overrides(yaml.safe_load((out / "config.yaml").read_text())) + [
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
        "train.train_iters=2",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.eval_interval=0",
        "optim.lr=1e-3",
        "stem.optimizer.lr=1e-2",
    ]
    single = Trainer(
        load_config(None, overrides + [f"logging.run_dir={tmp_path / 'one'}"]), parallel
    )
    losses = [single.train_step()["loss/train"] for _ in range(2)]
    expected = full_parameters(single)
    tp2 = run_local_workers(
        2,
        train_steps,
        overrides
        + ["parallel.tensor_model_parallel_size=2", f"logging.run_dir={tmp_path / 'tp2'}"],
        2,
    )
    for rank in tp2:
        assert rank["start"] == 0  # finetune: step 0, not the checkpoint's
        assert rank["losses"] == pytest.approx(losses, rel=1e-5)
        for name, value in expected.items():
            torch.testing.assert_close(rank["params"][name], value, atol=1e-5, rtol=1e-4)
