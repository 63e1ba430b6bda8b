"""tools/inspect_checkpoint.py on tiny STEM and dense checkpoints: the statistics it reports
agree with independent computations on the same tensors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.checkpoint.offline import OfflineCheckpoint
from stem_megatron.checkpoint.table_stats import dense_up_outputs, validation_tokens
from stem_megatron.cli.inspect_checkpoint import main
from stem_megatron.data.indexed import open_dataset
from stem_megatron.data.sampler import PackedSampleStream
from stem_megatron.training.trainer import Trainer

STEPS = 3
TABLE = "model.decoder.layers.1.mlp.stem_table.weight"


@pytest.fixture
def stem_run(tiny_config, parallel):
    config = tiny_config(f"train.train_iters={STEPS}", "train.eval_interval=0")
    Trainer(config, parallel).run()
    return config


@pytest.fixture
def dense_run(tiny_config, parallel, tmp_path):
    config = tiny_config(
        f"train.train_iters={STEPS}",
        "train.eval_interval=0",
        "stem.enabled=false",
        f"logging.run_dir={tmp_path / 'dense'}",
    )
    Trainer(config, parallel).run()
    return config


def trained_token_ids(config) -> set[int]:
    """Every input id the run's training steps looked up (lazy mode updates exactly those rows)."""
    data = open_dataset(config.data.train_data)
    stream = PackedSampleStream(
        data.tokens,
        config.model.seq_length,
        config.train.micro_batch_size,
        seed=config.train.seed,
        dp_rank=0,
        dp_size=1,
    )
    micro = config.train.global_batch_size // config.train.micro_batch_size
    return {int(t) for _ in range(STEPS * micro) for t in next(stream)[:, :-1].flatten()}


def all_pairs_mean_cosine(rows: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(rows.double(), dim=1)
    cos = unit @ unit.T
    n = rows.shape[0]
    return ((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))).item()


def test_stem_statistics_and_dense_comparison(stem_run, dense_run, tmp_path, capsys):
    report_path, plot_path = tmp_path / "report.json", tmp_path / "spread.png"
    assert (
        main(
            [
                str(stem_run.run_dir),
                "--tensors",
                "--pairs",
                "20000",
                "--tokens",
                "512",
                "--dense-checkpoint",
                str(dense_run.run_dir),
                "--json",
                str(report_path),
                "--plot",
                str(plot_path),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "STEM layer 1: table [512, 64]" in text and "dense baseline W_up x" in text
    assert TABLE in text  # --tensors lists every tensor
    report = json.loads(report_path.read_text())
    assert report["step"] == STEPS and report["stem_layers"] == [1]
    assert report["layout"]["tensor_model_parallel_size"] == 1
    assert report["layout"]["stem.storage"] == "device"
    assert report["kinds"]["table optimizer"]["tensors"] == 2

    (table,) = report["stem_tables"]
    weights = OfflineCheckpoint(stem_run.run_dir).read(TABLE)
    seen = trained_token_ids(stem_run)
    assert table["updated"] == len(seen)  # rows never updated = ids never looked up in training
    assert table["norms"]["mean"] == pytest.approx(weights.double().norm(dim=1).mean().item())
    exhaustive = all_pairs_mean_cosine(weights[sorted(seen)])
    assert table["spread"]["pairs"] == 20000
    assert table["spread"]["mean"] == pytest.approx(exhaustive, abs=0.01)
    assert table["token_spread"]["pairs"] > 15000  # pairs of equal tokens are dropped
    assert set(report["dense_token_spread"]) == {"1"}
    dense_spread = report["dense_token_spread"]["1"]
    assert -1 <= dense_spread["p5"] <= dense_spread["p50"] <= dense_spread["p95"] <= 1
    assert_plot_draws_each_series(plot_path, panels=1, series=3)


def assert_plot_draws_each_series(path, panels: int, series: int) -> None:
    """A PNG of `panels` side by side (4.5 x 3.5 in at 100 dpi) with a line in each of the
    first `series` matplotlib colours (C0, C1, ...): a blank or partial figure fails."""
    image = Image.open(path).convert("RGB")
    assert image.size == (450 * panels, 350)
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c")[:series]:
        rgb = torch.tensor([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=torch.float32)
        assert ((pixels - rgb).abs().max(dim=1).values < 40).sum() > 100, colour


def test_up_projection_outputs_are_w_up_times_ffn_input(dense_run):
    """The hooked outputs equal the up half of the stored [2, d_ff, h] fc1 applied to the FFN
    input (the pre-MLP norm's output) captured separately."""
    loaded = load_for_inference(str(dense_run.run_dir))
    tokens = validation_tokens(str(dense_run.data.valid_data), 512, 64)
    norm = dict(loaded.model.named_modules())["decoder.layers.0.pre_mlp_layernorm"]
    inputs = []
    hook = norm.register_forward_hook(lambda m, a, out: inputs.append(out.detach()))
    try:
        up = dense_up_outputs(loaded.model, [0], tokens, 32)[0]
    finally:
        hook.remove()
    w_up = OfflineCheckpoint(dense_run.run_dir).read(
        "model.decoder.layers.0.mlp.linear_fc1.weight"
    )[1]
    x = torch.cat([i.transpose(0, 1).reshape(-1, i.shape[-1]) for i in inputs])
    torch.testing.assert_close(up, x @ w_up.T, rtol=1e-5, atol=1e-6)


def test_dense_checkpoint_alone_and_bad_input(dense_run, stem_run, tmp_path, capsys):
    assert (
        main(
            [
                str(dense_run.run_dir),
                "--data",
                str(dense_run.data.valid_data),
                "--tokens",
                "256",
                "--pairs",
                "1000",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "STEM layers none" in text
    assert "dense layer 0: W_up x" in text and "dense layer 1: W_up x" in text

    assert main([str(tmp_path / "nowhere")]) == 1
    assert "no such checkpoint path" in capsys.readouterr().err
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    assert main([str(stem_run.run_dir), "--plot", str(taken)]) == 1
    assert "already exists" in capsys.readouterr().err and taken.read_bytes() == b"mine"
    # A STEM run is no dense baseline: its layer 1 has no up-projection.
    assert main([str(stem_run.run_dir), "--dense-checkpoint", str(stem_run.run_dir)]) == 1
    assert "is not a dense FFN layer" in capsys.readouterr().err
