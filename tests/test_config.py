"""Config loading: YAML, dotted overrides, type checks and cross-field validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stem_megatron.config import ConfigError
from stem_megatron.config_loader import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  num_layers: 6\noptim:\n  lr: 3e-4\n")
    config = load_config(
        path,
        [
            "train.train_iters=200",
            "stem.layers=[1,3]",
            "optim.min_lr=1e-5",
            "checkpoint.load=runs/x",
        ],
    )
    assert config.name == "exp"
    assert config.model.num_layers == 6
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)
    assert config.train.train_iters == 200
    assert config.stem.layers == [1, 3] and config.stem_layers() == [1, 3]
    assert config.checkpoint.load == "runs/x"
    assert config.run_dir == Path("runs/exp")
    assert config.save_dir == Path("runs/exp/checkpoints")


def test_default_stem_layers_are_every_other_from_one():
    config = load_config(None, ["model.num_layers=8"])
    assert config.stem_layers() == [1, 3, 5, 7]
    assert load_config(None, ["stem.enabled=false"]).stem_layers() == []


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "train.train_iter=5",
            "unknown key 'train.train_iter'; allowed in 'train': micro_batch_size",
        ),
        ("modle.num_layers=2", "unknown key 'modle'"),
        ("train.train_iters=abc", "train.train_iters: expected int, got 'abc'"),
        ("train.train_iters=2.5", "train.train_iters: expected int"),
        ("stem.enabled=maybe", "stem.enabled: expected bool"),
        ("stem.layers=[1,x]", r"stem.layers\[1\]: expected int"),
        ("stem.layers=[1,9]", r"stem.layers \[9\] out of range: the model has layers 0..3"),
        (
            "model.num_query_groups=3",
            r"num_attention_heads \(8\) must be divisible by .*num_query_groups \(3\)",
        ),
        (
            "train.global_batch_size=12",
            r"global_batch_size \(12\) must be a multiple of .*micro_batch_size \(8\)",
        ),
        ("optim.min_lr=1.0", r"optim.min_lr \(1.0\) must be in \[0, optim.lr"),
        ("optim.lr_warmup_iters=500", r"optim.lr_warmup_iters \(500\)"),
        ("stem.optimizer.mode=dense", "stem.optimizer.mode must be"),
        ("train.train_iters", "not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,message",
    [
        # Each of these used to pass the config and fail only once the model was built (or
        # deep in megatron), with a message that named no key.
        ("optim.adam_beta1=1.5", r"optim.adam_beta1 must be in \[0, 1\), got 1.5"),
        ("optim.adam_beta2=-0.1", r"optim.adam_beta2 must be in \[0, 1\)"),
        ("optim.adam_eps=0", "optim.adam_eps must be positive"),
        ("optim.lr=-1", "optim.lr must be positive"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("optim.lr_decay_iters=0", "optim.lr_decay_iters must be positive"),
        ("stem.optimizer.lr=-1", "stem.optimizer.lr must be >= 0"),
        ("stem.optimizer.weight_decay=-1", "stem.optimizer.weight_decay must be >= 0"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*32\), got -1"),
        ("model.norm_epsilon=0", "model.norm_epsilon must be positive"),
        ("model.rope_theta=-5", "model.rope_theta must be positive"),
        ("model.init_method_std=0", "model.init_method_std must be positive"),
        ("optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
        ("optim.clip_grad=.inf", "optim.clip_grad: expected a finite number"),
        (
            "parallel.virtual_pipeline_model_parallel_size=2",
            r"virtual_pipeline_model_parallel_size \(2\) needs pipeline_model_parallel_size > 1",
        ),
        (
            "parallel.virtual_pipeline_model_parallel_size=-2",
            "parallel.virtual_pipeline_model_parallel_size must be >= 1",
        ),
        ("parallel.pipeline_layers=[2,2]", r"pipeline_layers \[2, 2\] has 2 entries"),
    ],
)
def test_ranges_are_checked_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/tiny.yaml", [override])


def test_optimizer_offload_needs_bf16():
    """Without bf16, megatron-core's offload refused the distributed optimizer's fp32 shards
    once the model was built, with "error: can't optimize a non-leaf Tensor"."""
    offload = ["optim.use_distributed_optimizer=true", "optim.optimizer_cpu_offload=true"]
    with pytest.raises(ConfigError, match="optim.optimizer_cpu_offload needs train.bf16=true"):
        load_config(ROOT / "configs/tiny.yaml", offload)
    assert load_config(ROOT / "configs/tiny.yaml", [*offload, "train.bf16=true"]).train.bf16


def test_a_yaml_error_in_an_override_is_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["stem.layers=[1,3"])
    message = str(info.value)
    assert "\n" not in message
    assert "override 'stem.layers=[1,3'" in message and "line 1, column 5" in message


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .* at line 2, column 1$"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a directory: name a YAML file in it"):
        load_config(tmp_path)


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(ROOT / "configs/tiny.yaml", ["train.seed=7"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 7
    assert again.to_dict() | {"name": config.name} == config.to_dict()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_cli_reports_config_errors_without_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stem_megatron.train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "train.bogus=1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "config error: unknown key 'train.bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr
