"""The end of `torchrun -m stem_megatron.train` under each parallel layout: every rank exits 0
after `done:`, and the run ends with its sample, generated collectively where each rank runs
the whole model (the vocab-sharded lookups need every DP rank), or with one line naming the
tools/generate.py command where TP or PP split the model. The equivalence tests drive the
trainer in-process and never reach this code."""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stem_megatron.generation import SampleSettings
from tests.launch.conftest import CONFIG, ROOT

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SEED = 7
TIMEOUT = 420  # below gloo's 600 s: a rank left waiting in a collective fails the test


@pytest.fixture(scope="module")
def overrides(small_corpus) -> list[str]:
    """A 2-layer model, 2 steps, validation and a save at the last step only."""
    return [
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.ffn_hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64",
        "stem.layers=[1]",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.train_iters=2",
        "train.eval_interval=0",
        "train.eval_iters=1",
        "optim.lr_warmup_iters=1",
        "checkpoint.save_interval=0",
        f"train.seed={SEED}",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
    ]


def train(scope, run_dir: Path, nproc: int, overrides: list[str]) -> str:
    """Run the CLI as users type it; the output of a run whose every rank exited 0."""
    code, out = scope.run(
        [
            TORCHRUN,
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "stem_megatron.train",
            "--config",
            CONFIG,
            *overrides,
            f"logging.run_dir={run_dir}",
        ],
        "torchrun",
        timeout=TIMEOUT,
        cwd=ROOT,
    )
    # torchrun exits 0 only when every worker did; no worker may have died on the way.
    assert code == 0 and "Traceback" not in out and "FAILED" not in out, out[-4000:]
    return out


def lines_starting(out: str, prefix: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(prefix)]


def generate(command: str) -> str:
    """The text a `python tools/generate.py ...` command line prints (with this Python). Only
    stdout: torch's own notes (e.g. a CUDA build without a GPU) go to stderr."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "tools/generate.py"], command
    proc = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.removesuffix("\n")


def only_line(out: str, prefix: str) -> str:
    found = lines_starting(out, prefix)
    assert len(found) == 1, out[-4000:]  # printed by rank 0 only
    return found[0]


# name: (processes, overrides, whether to check the sample against tools/generate.py)
SAMPLED = {  # each rank runs the whole model: the run prints its sample
    "dp2-replicated": (2, [], False),
    "dp2-vocab-sharded": (2, ["stem.dp_layout=vocab_sharded"], True),
    "dp2-host-vocab-sharded": (
        2,
        ["stem.storage=host", "stem.dp_layout=vocab_sharded", "stem.cache_rows=32"],
        True,
    ),
    "dp2-mmap": (2, ["stem.storage=mmap"], False),
}
SPLIT = {  # (processes, overrides): TP or PP split the model, so the run names the command
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
    "tp2xdp2-vocab-sharded": pytest.param(
        4,
        ["parallel.tensor_model_parallel_size=2", "stem.dp_layout=vocab_sharded"],
        marks=pytest.mark.slow,
    ),
    "pp2xdp2": pytest.param(4, ["parallel.pipeline_model_parallel_size=2"], marks=pytest.mark.slow),
    "tp2xpp2": pytest.param(
        4,
        ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
        marks=pytest.mark.slow,
    ),
}


@pytest.mark.parametrize("nproc,layout,against_tool", list(SAMPLED.values()), ids=list(SAMPLED))
def test_run_ends_with_its_sample(scope, tmp_path, overrides, nproc, layout, against_tool):
    out = train(scope, tmp_path / "run", nproc, overrides + layout)
    only_line(out, "done: step 2 |")
    sample = ast.literal_eval(only_line(out, "sample: ").removeprefix("sample: "))
    assert sample.startswith("ROMEO.") and len(sample) > len("ROMEO."), sample
    if against_tool:  # the text tools/generate.py draws from the checkpoint, same settings
        command = SampleSettings("ROMEO.", SEED).command(tmp_path / "run/checkpoints/step_2")
        assert sample == generate(command)


@pytest.mark.parametrize("nproc,layout", list(SPLIT.values()), ids=list(SPLIT))
def test_split_model_run_names_the_generate_command(scope, tmp_path, overrides, nproc, layout):
    out = train(scope, tmp_path / "run", nproc, overrides + layout)
    only_line(out, "done: step 2 |")
    line = only_line(out, "sample: ")
    assert line.startswith("sample: skipped: TP x PP = "), line
    command = line.split("checkpoint: ", 1)[1]
    # The command the sampled layouts' test runs, for this run's last checkpoint.
    assert command == SampleSettings("ROMEO.", SEED).command(tmp_path / "run/checkpoints/step_2")


@pytest.mark.slow
def test_finished_vocab_sharded_run_resumed_has_nothing_to_do(scope, tmp_path, overrides):
    run_dir = tmp_path / "run"
    layout = overrides + ["stem.dp_layout=vocab_sharded"]
    train(scope, run_dir, 2, layout)
    out = train(scope, run_dir, 2, layout + ["checkpoint.load=auto"])
    assert lines_starting(out, "nothing to do: the run is at step 2"), out[-4000:]
