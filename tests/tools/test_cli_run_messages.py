"""Messages of commands that get as far as a model: a diverged run, a cropped prompt, the
strict rule, the `latest` pointer as a checkpoint path, and a dry run for no ranks."""

from __future__ import annotations

import pytest

from stem_megatron.cli import generate
from stem_megatron.config import ConfigError
from stem_megatron.config_loader import load_config
from stem_megatron.planning.dry_run import dry_run
from stem_megatron.train import main as train_main
from tests.config_overrides import as_overrides


def test_a_diverged_run_ends_with_one_error_line(tiny_config, capsys):
    config = tiny_config("optim.lr=1e6", "optim.lr_warmup_iters=0", "train.eval_interval=0")
    assert train_main(as_overrides(config.to_dict()) + ["--sample-prompt", ""]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: gradient norm is nan: training diverged")
    assert "optim.lr" in err[0]


def test_a_prompt_longer_than_the_context_is_reported(trained_run, capsys):
    prompt = "ROMEO. " * 40  # tiny runs have model.seq_length 32
    assert (
        generate.main(
            ["--checkpoint", str(trained_run), "--prompt", prompt, "--max-new-tokens", "2"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "longer than model.seq_length=32: the model sees only its last 32 tokens" in err


def test_generate_takes_the_latest_pointer_file(trained_run, capsys):
    # The path tools/generate.py's docstring used to show, and one that failed.
    pointer = trained_run / "checkpoints" / "latest"
    args = ["--prompt", "ROMEO.", "--max-new-tokens", "4"]
    assert generate.main(["--checkpoint", str(pointer), *args]) == 0
    by_pointer = capsys.readouterr().out
    assert generate.main(["--checkpoint", str(trained_run), *args]) == 0
    assert by_pointer == capsys.readouterr().out


def test_the_strict_rule_error_names_generates_own_flag(trained_run, capsys):
    assert (
        generate.main(
            ["--checkpoint", str(trained_run), "--prompt", "ROMEO.", "--stem-remap", "id:5=id:6,7"]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "the strict rule needs equal lengths: choose --stem-remap-rule repeat or pick"
    )
    assert "--rule " not in err and "average" not in err


def test_a_dry_run_for_zero_ranks_is_refused():
    with pytest.raises(ConfigError, match="world size must be >= 1, got 0"):
        dry_run(load_config("configs/tiny.yaml"), 0)
