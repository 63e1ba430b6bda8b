"""tools/hf_checkpoint.py: import and export from the command line, exit codes and messages
for bad input, inputs left byte-identical, no partial outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stem_megatron.cli import hf_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run(capsys, *args: str) -> tuple[int, str]:
    code = hf_checkpoint.main(list(args))
    return code, capsys.readouterr().err


def test_import_and_export_from_the_command_line(hf_llama, tmp_path, capsys):
    hf_dir, _ = hf_llama()
    before = snapshot(hf_dir)
    code, err = run(
        capsys,
        "import",
        "--hf-dir",
        str(hf_dir),
        "--out",
        str(tmp_path / "cpt"),
        "--config",
        "stem.layers=[1]",
        "model.seq_length=16",
    )
    assert code == 0, err
    assert "writing the checkpoint" in err and "imported" in err
    assert snapshot(hf_dir) == before
    checkpoint = tmp_path / "cpt" / "checkpoints"
    saved = snapshot(checkpoint)
    code, err = run(
        capsys, "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")
    )
    assert code == 0, err
    assert "exported step 0 (STEM in layers [1])" in err
    assert snapshot(checkpoint) == saved
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["stem_layers"] == [1] and config["max_position_embeddings"] == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    code, err = run(
        capsys, "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")
    )
    assert code == 1 and "already exists" in err
    code, err = run(capsys, "import", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "cpt"))
    assert code == 1 and "already exists" in err
    code, err = run(
        capsys,
        "import",
        "--hf-dir",
        str(hf_dir),
        "--out",
        str(tmp_path / "cal"),
        "--calibration-data",
        str(tmp_path / "no_data"),
    )
    assert code == 1 and f"dataset {tmp_path / 'no_data'} is missing" in err
    assert not (tmp_path / "cal").exists()


def test_bad_input_exits_with_the_problem_named(tmp_path, capsys):
    code, err = run(
        capsys, "import", "--hf-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")
    )
    assert code == 1 and "does not exist" in err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    code, err = run(capsys, "import", "--hf-dir", str(gpt2), "--out", str(tmp_path / "o"))
    assert code == 1 and "GPT2LMHeadModel (model_type 'gpt2') is not supported" in err
    code, err = run(
        capsys, "export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")
    )
    assert code == 1 and "no such checkpoint path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_script_runs_as_a_process(tmp_path):
    """As a real process, refusing an existing output before any slow import."""
    (tmp_path / "o").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/hf_checkpoint.py"),
            "export",
            "--checkpoint",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "error: output path" in result.stderr
    assert "already exists" in result.stderr
