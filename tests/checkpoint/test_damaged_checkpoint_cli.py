"""Every entry point reports a damaged checkpoint as one `error:` line naming the file.

Before the manifest: a truncated shard was a bare EOFError traceback in train, generate and
inspect_checkpoint and a miniz traceback in convert_checkpoint and edit_knowledge; 4 KB of
random bytes loaded silently and the run died with "training diverged"; random bytes in
`.metadata` were an uncaught UnsafeCheckpointError; a truncated metadata.json named no file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from stem_megatron.cli import (
    convert_checkpoint,
    edit_knowledge,
    generate,
    hf_checkpoint,
    inspect_checkpoint,
)
from stem_megatron.train import main as train_main
from tests.config_overrides import as_overrides

SHARD = "__0_0.distcp"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    from tests.conftest import tiny_run_config, train_in_process

    config = tiny_run_config(
        small_corpus,
        tmp_path_factory.mktemp("run") / "run",
        "train.train_iters=2",
        "optim.lr_warmup_iters=0",
        "train.eval_interval=0",
    )
    train_in_process(config)
    return config


def _damaged(trained, tmp_path: Path, damage: str) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(trained.save_dir / "step_2", ck)
    name, how = damage.split(":")
    path = ck / name
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # 4 KB (or all of a smaller file) of seeded random bytes, in place
        size = min(4096, len(data))
        start = min(8192, len(data) - size)
        noise = (
            torch.randint(
                0, 256, (size,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
            )
            .numpy()
            .tobytes()
        )
        data[start : start + size] = noise
    path.write_bytes(bytes(data))
    return ck


def _one_error_line(capsys, rc: int, ck: Path, name: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: checkpoint {ck} is damaged: {name} ")


DAMAGES = [f"{SHARD}:truncate", f"{SHARD}:scribble", ".metadata:scribble", "metadata.json:truncate"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_train_reports_the_damaged_file(trained, tmp_path, capsys, damage):
    ck = _damaged(trained, tmp_path, damage)
    overrides = as_overrides(trained.to_dict()) + [
        f"logging.run_dir={tmp_path / 'resumed'}",
        f"checkpoint.load={ck}",
        "checkpoint.save=null",
        "train.train_iters=3",
    ]
    rc = train_main(overrides + ["--sample-prompt", ""])
    _one_error_line(capsys, rc, ck, damage.split(":")[0])


TOOLS = {
    "generate": lambda ck, out: generate.main(
        ["--checkpoint", str(ck), "--prompt", "a", "--max-new-tokens", "1"]
    ),
    "inspect": lambda ck, out: inspect_checkpoint.main([str(ck), "--pairs", "10"]),
    "to-safetensors": lambda ck, out: convert_checkpoint.main(
        ["to-safetensors", str(ck), str(out), "--quiet"]
    ),
    "edit": lambda ck, out: edit_knowledge.main(
        ["--checkpoint", str(ck), "--output", str(out), "--swap", "a=b", "--rule", "pick"]
    ),
    "hf-export": lambda ck, out: hf_checkpoint.main(
        ["export", "--checkpoint", str(ck), "--out", str(out)]
    ),
}


@pytest.mark.slow  # five tools, two damages: about a minute on 2 cores
@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("damage", [f"{SHARD}:truncate", f"{SHARD}:scribble"])
def test_tools_report_the_damaged_file(trained, tmp_path, capsys, tool, damage):
    ck = _damaged(trained, tmp_path, damage)
    rc = TOOLS[tool](ck, tmp_path / "out")
    _one_error_line(capsys, rc, ck, SHARD)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["train", "generate", "hf-export"])
def test_a_crafted_metadata_pickle_is_one_error_line(trained, tmp_path, capsys, entry):
    ck = tmp_path / "ck"
    shutil.copytree(trained.save_dir / "step_2", ck)
    (ck / "manifest.json").unlink()  # a crafted checkpoint would not carry a matching one
    (ck / ".metadata").write_bytes(b"cos\nsystem\n(S'true'\ntR.")  # pickle calling os.system
    if entry == "train":
        rc = train_main(
            as_overrides(trained.to_dict())
            + [
                f"logging.run_dir={tmp_path / 'resumed'}",
                f"checkpoint.load={ck}",
                "checkpoint.save=null",
                "train.train_iters=3",
                "--sample-prompt",
                "",
            ]
        )
    else:
        rc = TOOLS[entry](ck, tmp_path / "out")
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and "Traceback" not in err
    assert errors == [
        "error: checkpoint .metadata references os.system, which is not part of DCP "
        "metadata; refusing to unpickle it"
    ]
