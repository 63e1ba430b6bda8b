"""tools/edit_knowledge.py on a real trained checkpoint (exact table optimizer): rows and
moments move, nothing else changes, the input is untouched, training resumes from the output,
and on-the-fly remapping (generate.py --stem-remap) computes what the edited checkpoint does."""

from __future__ import annotations

import hashlib

import pytest
import torch

from stem_megatron.checkpoint.inference import load_for_inference
from stem_megatron.checkpoint.offline import OfflineCheckpoint
from stem_megatron.cli import edit_knowledge, generate
from stem_megatron.data.tokenizer import load_tokenizer
from stem_megatron.editing.remap import parse_remap
from stem_megatron.editing.tables import OPTIM_PREFIX, table_key
from stem_megatron.generation import generate_ids
from stem_megatron.model.reference import ReferenceGPT
from stem_megatron.parallel.state import ParallelState
from stem_megatron.training.trainer import Trainer
from tests.conftest import train_in_process

A, B = "the", "and"  # single tokens (after a space) in the small corpus's 512-token BPE


def train(config):
    train_in_process(config)
    return config.run_dir


@pytest.fixture
def trained(tiny_config):
    return train(
        tiny_config(
            "train.train_iters=3",
            "train.eval_interval=0",
            "stem.layers=[0,1]",
            "optim.lr_warmup_iters=0",
            "stem.optimizer.mode=exact",
        )
    )


def digest(path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run_tool(capsys, *args) -> tuple[int, str]:
    code = edit_knowledge.main([str(a) for a in args])
    return code, capsys.readouterr().err


def ids_of(run_dir, *words) -> list[int]:
    tok = load_tokenizer(OfflineCheckpoint(run_dir).config_dict["data"]["tokenizer"])
    ids = [tok.encode(" " + w) for w in words]
    assert all(len(i) == 1 for i in ids), ids
    return [i[0] for i in ids]


def test_swap_moves_rows_with_their_moments_and_nothing_else(trained, tmp_path, capsys):
    before = digest(trained)
    out = tmp_path / "edited"
    assert run_tool(
        capsys, "--checkpoint", trained, "--output", out, "--swap", f"{A}={B}", "--layers", "0"
    ) == (0, "")
    assert digest(trained) == before  # the input is never modified
    a, b = ids_of(trained, A, B)
    src, dst = OfflineCheckpoint(trained), OfflineCheckpoint(out)
    assert dst.step == src.step and dst.scalars == src.scalars
    assert dst.metadata["knowledge_edits"][0]["layers"] == [0]
    moved = {table_key(0)} | {OPTIM_PREFIX.format(layer=0) + s for s in ("exp_avg", "exp_avg_sq")}
    assert moved <= set(src.keys()) and set(dst.keys()) == set(src.keys())
    for key, old in src.tensors():
        new = dst.read(key)
        if key in moved:
            assert torch.equal(new[[a, b]], old[[b, a]]) and not torch.equal(old[a], old[b])
            keep = torch.ones(old.shape[0], dtype=torch.bool)
            keep[[a, b]] = False
            assert torch.equal(new[keep], old[keep])
        else:  # layer 1's table and moments, every dense tensor, RNG state
            assert torch.equal(new, old), key
    # Swapping back restores every tensor bit for bit.
    back = tmp_path / "back"
    assert (
        run_tool(
            capsys, "--checkpoint", out, "--output", back, "--swap", f"{B}={A}", "--layers", "0"
        )[0]
        == 0
    )
    restored = OfflineCheckpoint(back)
    assert all(torch.equal(restored.read(k), t) for k, t in src.tensors())


def test_training_resumes_from_an_edited_exact_checkpoint(trained, tiny_config, tmp_path, capsys):
    out = tmp_path / "edited"
    assert run_tool(capsys, "--checkpoint", trained, "--output", out, "--swap", f"{A}={B}")[0] == 0
    edited = OfflineCheckpoint(out)
    config = tiny_config(
        "train.train_iters=5",
        "train.eval_interval=0",
        "stem.layers=[0,1]",
        "optim.lr_warmup_iters=0",
        "stem.optimizer.mode=exact",
        f"checkpoint.load={out}",
        f"logging.run_dir={tmp_path / 'resumed'}",
    )
    parallel = ParallelState.initialize()
    try:
        trainer = Trainer(config, parallel)
        assert trainer.step == 3
        sparse = trainer.tables.optimizer
        for name, table in sparse.tables.items():
            layer = int(name.split(".")[2])
            assert torch.equal(table.detach(), edited.read(table_key(layer)))
            prefix = OPTIM_PREFIX.format(layer=layer)
            assert torch.equal(sparse.exp_avg[name], edited.read(prefix + "exp_avg"))
            assert torch.equal(sparse.exp_avg_sq[name], edited.read(prefix + "exp_avg_sq"))
            # A checkpoint holds settled rows only: nothing is owed after loading it.
            assert sparse.unsettled({name: torch.arange(table.shape[0])})[name].numel() == 0
        result = trainer.run()
    finally:
        parallel.destroy()
    assert result.step == 5 and torch.isfinite(torch.tensor(result.train_loss))


def test_bad_input_is_refused_with_the_fix(trained, tiny_config, tmp_path, capsys):
    base = ["--checkpoint", trained]
    exists = tmp_path / "exists"
    exists.mkdir()
    out = tmp_path / "never"
    cases = [
        (["--output", exists, "--swap", f"{A}={B}"], "already exists"),
        (
            ["--output", out, "--swap", f"{A}={B}", "--layers", "0,3"],
            "layers [3] are not STEM layers",
        ),
        (["--output", out, "--swap", f"{A}=id:99999"], "not in the vocabulary"),
        (["--output", out, "--swap", f"{A}=Romeo"], "--rule repeat, pick or average"),
        (["--output", out, "--copy", "the"], "expected A=B"),
    ]
    for args, message in cases:
        code, err = run_tool(capsys, *base, *args)
        assert code == 1 and message in err, (args, err)
    code, err = run_tool(
        capsys, "--checkpoint", tmp_path / "missing", "--output", out, "--swap", f"{A}={B}"
    )
    assert code == 1 and "no such checkpoint path" in err
    dense = train(
        tiny_config(
            "train.train_iters=1",
            "train.eval_interval=0",
            "stem.enabled=false",
            "optim.lr_warmup_iters=0",
            f"logging.run_dir={tmp_path / 'dense'}",
        )
    )
    code, err = run_tool(capsys, "--checkpoint", dense, "--output", out, "--swap", f"{A}={B}")
    assert code == 1 and "no STEM tables" in err
    code = generate.main(
        ["--checkpoint", str(dense), "--prompt", "the", "--stem-remap", f"{A}={B}"]
    )
    assert code == 1 and "dense model" in capsys.readouterr().err
    assert not out.exists() and list(exists.iterdir()) == []


def test_remapped_lookups_equal_the_swapped_checkpoint(trained_stem_run, tmp_path, capsys):
    """The paper's on-the-fly edit: same text, redirected STEM rows. Checked against the
    reference model on the edited weights, and generation against the edited checkpoint, on
    a model trained far enough that its greedy text varies (so the edit shows in it)."""
    trained = trained_stem_run
    out = tmp_path / "edited"
    assert run_tool(capsys, "--checkpoint", trained, "--output", out, "--swap", f"{A}={B}")[0] == 0
    parallel = ParallelState.initialize()
    try:
        original, edited = load_for_inference(str(trained)), load_for_inference(str(out))
        tok, spec = original.tokenizer, original.model.spec
        remap = parse_remap(tok, [f"{A}={B}", f"{B}={A}"])
        prompt = tok.encode(f"To be {A} king {B} queen")
        first = next(i for i, (a, b) in enumerate(zip(prompt, remap(prompt))) if a != b)
        reference = ReferenceGPT(
            spec.model,
            spec.stem_layers,
            {k: t for k, t in edited.model.state_dict().items() if isinstance(t, torch.Tensor)},
        )
        ids = torch.tensor([prompt])
        with torch.no_grad():
            redirected = original.model(ids, stem_ids=torch.tensor([remap(prompt)]))
            plain = original.model(ids)
            expected = reference.logits(ids)
        torch.testing.assert_close(redirected, expected, rtol=1e-5, atol=1e-5)
        # Causal: the scores before the first redirected token stay, every later one moves.
        torch.testing.assert_close(redirected[:, :first], plain[:, :first], rtol=0, atol=1e-6)
        assert (redirected - plain)[0, first:].abs().amax(-1).min() > 1e-3
        kwargs = dict(
            max_new_tokens=24, vocab_size=spec.vocab_size, seq_length=spec.model.seq_length
        )
        remapped = generate_ids(original.model, prompt, stem_ids=remap, **kwargs)
        assert remapped == generate_ids(edited.model, prompt, **kwargs)
        assert remapped != generate_ids(original.model, prompt, **kwargs)  # the edit shows
        assert len(set(remapped[len(prompt) :])) >= 8  # varied text, not one repeated token
    finally:
        parallel.destroy()
    # The same through the command line.
    text = [
        generate.main(
            [
                "--checkpoint",
                str(ckpt),
                "--prompt",
                f"To be {A} king {B} queen",
                "--max-new-tokens",
                "8",
                *extra,
            ]
        )
        or capsys.readouterr().out
        for ckpt, extra in (
            (trained, ["--stem-remap", f"{A}={B}", "--stem-remap", f"{B}={A}"]),
            (out, []),
        )
    ]
    assert text[0] == text[1]
