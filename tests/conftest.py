"""Fixtures shared across test folders: a small real corpus prepared like the main job's,
and a factory for tiny run configs that train in seconds on CPU."""

from __future__ import annotations

import json
import lzma
import warnings
from pathlib import Path

import pytest

from stem_megatron.config import RunConfig
from stem_megatron.config_loader import load_config
from stem_megatron.data.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
NO_CUDA = "no CUDA device: make test-gpu needs one"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (tests/gpu, and the cuda case of device-parametrised tests) skip
    without CUDA; `make test` deselects them anyway (pytest.ini), `make test-gpu` selects them."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def pytest_terminal_summary(terminalreporter):
    """One line instead of a skip reason per test."""
    import torch

    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "gpu" in r.keywords]
    if skipped and not torch.cuda.is_available():
        terminalreporter.write_line(f"{NO_CUDA}: {len(skipped)} gpu tests skipped")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict[str, Path]:
    """Six works of the bundled corpus (~0.7 MB), a 512-token BPE and train/val datasets."""
    from stem_megatron.cli.preprocess_data import preprocess

    out = tmp_path_factory.mktemp("corpus")
    with lzma.open(ROOT / "data/corpus/shakespeare.jsonl.xz", "rt") as fh:
        works = [json.loads(next(fh)) for _ in range(6)]
    # Split works into ~20 documents so the train/val split has something to split.
    docs = [w["text"][i : i + 40_000] for w in works for i in range(0, len(w["text"]), 40_000)]
    corpus = out / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = out / "tokenizer.json"
    train_bpe_tokenizer(docs, 512, tokenizer)
    preprocess([corpus], tokenizer, out / "small", val_fraction=0.1, seed=1)
    return {"tokenizer": tokenizer, "train": out / "small_train", "val": out / "small_val"}


@pytest.fixture
def parallel():
    """A world of one: megatron-core's process groups for in-process training."""
    from stem_megatron.parallel.state import ParallelState

    state = ParallelState.initialize()
    yield state
    state.destroy()


def tiny_run_config(small_corpus: dict[str, Path], run_dir: Path, *overrides: str) -> RunConfig:
    """A 2-layer STEM model on the small corpus (see `tiny_config`), then `overrides`."""
    base = [
        "model.num_layers=2",
        "model.hidden_size=32",
        "model.ffn_hidden_size=64",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
        "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.train_iters=6",
        "train.eval_interval=3",
        "train.eval_iters=2",
        "optim.lr_warmup_iters=2",
        "optim.lr=0.003",
        "optim.min_lr=0.0003",
        "logging.log_interval=1",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
        f"logging.run_dir={run_dir}",
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture
def tiny_config(small_corpus, tmp_path):
    """`tiny_config(*overrides)`: a 2-layer STEM model on the small corpus, run dir in tmp."""

    def make(*overrides: str) -> RunConfig:
        return tiny_run_config(small_corpus, tmp_path / "run", *overrides)

    return make


def train_in_process(config: RunConfig):
    """Train `config` to its end in this process (a world of one); returns the run's result."""
    from stem_megatron.parallel.state import ParallelState
    from stem_megatron.training.trainer import Trainer

    parallel = ParallelState.initialize()
    try:
        return Trainer(config, parallel).run()
    finally:
        parallel.destroy()


@pytest.fixture
def trained_run(tiny_config) -> Path:
    """The run dir of a 2-step tiny STEM run (no validation)."""
    config = tiny_config("train.train_iters=2", "optim.lr_warmup_iters=0", "train.eval_interval=0")
    train_in_process(config)
    return config.run_dir


@pytest.fixture(scope="session")
def trained_stem_run(small_corpus, tmp_path_factory) -> Path:
    """The run dir of a 3-layer STEM model (tables in layers 1 and 2) trained for 150 steps
    (about 5 s). Trained this far, its greedy continuations vary from token to token, so a
    wrong position, context window or STEM lookup id changes the generated text; a model a
    few steps from init repeats one token and hides all of those."""
    config = tiny_run_config(
        small_corpus,
        tmp_path_factory.mktemp("trained_stem") / "run",
        "model.num_layers=3",
        "stem.layers=[1,2]",
        "train.train_iters=150",
        "train.global_batch_size=8",
        "train.eval_interval=0",
        "optim.lr=0.01",
        "optim.min_lr=0.01",
        "stem.optimizer.lr=0.03",
        "logging.log_interval=50",
    )
    result = train_in_process(config)
    # A SIGTERM (e.g. from `timeout`) makes the trainer save and return early: say so rather
    # than hand the tests a less trained model.
    assert result.stopped_by is None, f"trained_stem_run stopped by {result.stopped_by}"
    return Path(config.run_dir)
