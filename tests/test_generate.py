"""Generation from a saved checkpoint through tools/generate.py."""

from __future__ import annotations

import pytest

from stem_megatron.parallel.state import ParallelState
from stem_megatron.training.trainer import Trainer
from tools import generate


@pytest.fixture
def trained_run(tiny_config):
    config = tiny_config("train.train_iters=2", "optim.lr_warmup_iters=0", "train.eval_interval=0")
    parallel = ParallelState.initialize()
    try:
        Trainer(config, parallel).run()
    finally:
        parallel.destroy()
    return config.run_dir


def run_generate(capsys, *args: str) -> tuple[int, str, str]:
    code = generate.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_and_sampled_generation_from_checkpoint(trained_run, capsys):
    base = ["--checkpoint", str(trained_run), "--prompt", "ROMEO.", "--max-new-tokens", "12"]
    code, greedy, _ = run_generate(capsys, *base)
    assert code == 0 and greedy.startswith("ROMEO.") and len(greedy.strip()) > len("ROMEO.")
    assert run_generate(capsys, *base)[1] == greedy  # greedy is deterministic
    sampled = [run_generate(capsys, *base, "--temperature", "1.0", "--top-k", "20",
                            "--seed", str(seed))[1] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # same seed, same text
    assert sampled[0].startswith("ROMEO.")


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code, _, err = run_generate(capsys, "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 1 and "no such checkpoint path" in err
