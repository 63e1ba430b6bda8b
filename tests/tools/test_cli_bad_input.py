"""Bad command-line input to every tool and to training: a non-zero exit with one line naming
the problem and the fix, nothing written, and the answer comes before torch is imported (so it
comes at once, not after seconds of imports). Each command runs as a user runs it, under
`python -X importtime`, whose report says what was imported."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["-m", "stem_megatron.train", "--config", "configs/tiny.yaml"]
COMMANDS = (
    [[f"tools/{p.name}"] for p in sorted((ROOT / "tools").glob("*.py"))]
    + [
        ["tools/convert_checkpoint.py", sub]
        for sub in ("reshard", "to-safetensors", "from-safetensors")
    ]
    + [["tools/hf_checkpoint.py", sub] for sub in ("import", "export")]
    + [["-m", "stem_megatron.train"]]
)
_IMPORT_LINE = re.compile(r"import time:\s+\d+ \|\s+\d+ \|\s*(\S+)")


def run(args: list[str], cwd: Path = ROOT) -> tuple[int, str, list[str], set[str]]:
    """Exit code, stdout, stderr's lines other than the import report, top-level packages
    imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    lines, packages = [], set()
    for line in proc.stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            packages.add(match.group(1).split(".")[0])
        elif line.strip() and not line.startswith("import time:"):
            lines.append(line)
    return proc.returncode, proc.stdout, lines, packages


def options_without_help(help_text: str) -> list[str]:
    """Option entries of an argparse help text that have no description."""
    lines = help_text.splitlines()
    bare = []
    for i, line in enumerate(lines):
        if line.startswith("  -"):
            same_line = re.search(r"\S {2,}\S", line.strip())
            below = (
                i + 1 < len(lines)
                and lines[i + 1].startswith(" " * 8)
                and not lines[i + 1].lstrip().startswith("-")
            )
            if not (same_line or below):
                bare.append(line.strip())
    return bare


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_and_a_bad_flag_answer_before_torch_loads(command):
    code, out, _, packages = run([*command, "--help"])
    assert code == 0 and "usage:" in out
    assert "torch" not in packages and "megatron" not in packages
    assert options_without_help(out) == []  # every option says what it does
    code, _, lines, packages = run([*command, "--no-such-flag"])
    assert code == 2 and "error:" in lines[-1] and "Traceback" not in "\n".join(lines)
    assert "torch" not in packages


def test_generate_help_shows_defaults():
    _, out, _, _ = run(["tools/generate.py", "--help"])
    flat = " ".join(out.split())
    assert "tokens to generate (default: 100)" in flat
    assert "--prompt PROMPT text to continue" in flat


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["tools/generate.py", "--checkpoint", "x", "--prompt", "y", "--max-new-tokens", "-5"],
            "argument --max-new-tokens: expected an integer >= 0, got '-5'",
        ),
        (
            ["tools/generate.py", "--checkpoint", "x", "--prompt", "y", "--top-k", "0"],
            "argument --top-k: expected a positive integer, got '0'",
        ),
        (
            ["tools/generate.py", "--checkpoint", "x", "--prompt", "y", "--temperature", "-1"],
            "argument --temperature: expected a number >= 0, got '-1'",
        ),
        (
            ["tools/inspect_checkpoint.py", "x", "--pairs", "-5"],
            "argument --pairs: expected a positive integer, got '-5'",
        ),
        (
            [*TRAIN, "--dry-run", "--world-size", "0"],
            "argument --world-size: expected a positive integer, got '0'",
        ),
        (
            ["tools/estimate_memory.py", "--config", "configs/tiny.yaml", "--world-size", "0"],
            "argument --world-size: expected a positive integer, got '0'",
        ),
        (
            ["tools/convert_checkpoint.py", "reshard", "x", "y", "--dp", "0"],
            "argument --dp: expected a positive integer, got '0'",
        ),
        (
            [
                "tools/preprocess_data.py",
                "--input",
                "a.txt",
                "--tokenizer",
                "t",
                "--output-prefix",
                "o",
                "--val-fraction",
                "1",
            ],
            "argument --val-fraction: expected a number in [0, 1)",
        ),
    ],
)
def test_out_of_range_flags_are_usage_errors(args, message):
    code, _, lines, packages = run(args)
    assert code == 2 and message in lines[-1]
    assert "torch" not in packages


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            "config error: parallel.virtual_pipeline_model_parallel_size (2) needs "
            "pipeline_model_parallel_size > 1",
        ),
        (
            ["parallel.virtual_pipeline_model_parallel_size=-2"],
            "config error: parallel.virtual_pipeline_model_parallel_size must be >= 1",
        ),
        (["optim.adam_beta1=1.5"], "config error: optim.adam_beta1 must be in [0, 1), got 1.5"),
        (["stem.optimizer.lr=-1"], "config error: stem.optimizer.lr must be >= 0"),
        (["train.seed=-1"], "config error: train.seed must be in [0, 2**32), got -1"),
        (
            ["stem.layers=[1,3"],
            "config error: override 'stem.layers=[1,3': value is not valid YAML",
        ),
        (
            ["logging.run_dir=/proc/x"],
            "error: logging.run_dir: /proc/x cannot be written: cannot create a directory in /proc",
        ),
    ],
)
def test_training_refuses_bad_config_in_one_line_before_torch(overrides, message):
    code, out, lines, packages = run([*TRAIN, *overrides])
    assert code == 2 and lines == [lines[0]] and lines[0].startswith(message), lines
    assert "torch" not in packages and out == ""


def test_a_directory_as_config_is_named_as_such():
    code, _, lines, _ = run(["-m", "stem_megatron.train", "--config", "configs"])
    assert code == 2 and len(lines) == 1
    assert "--config" in lines[0] and "is a directory: name a YAML file in it" in lines[0]


@pytest.mark.parametrize("run_dir", ["afile", "afile/sub"])
def test_a_run_dir_that_is_a_file_is_refused_before_torch(tmp_path, run_dir):
    (tmp_path / "afile").write_text("keep me")
    code, _, lines, packages = run([*TRAIN, f"logging.run_dir={tmp_path / run_dir}"])
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (
        f"error: logging.run_dir: {tmp_path / run_dir} cannot be written: "
        f"{tmp_path / 'afile'} is a file, not a directory; choose a writable "
        f"logging.run_dir"
    )
    assert "torch" not in packages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_read_only_run_dir_is_refused_before_torch(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)]
    if not shutil.which("mount") or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("mounting a read-only tmpfs needs root where mount is allowed")
    try:
        code, _, lines, packages = run([*TRAIN, f"logging.run_dir={read_only / 'run'}"])
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    assert code == 2 and len(lines) == 1 and "torch" not in packages
    assert f"cannot create a directory in {read_only} (Read-only file system)" in lines[0]


@pytest.mark.parametrize(
    "edit", ["--swap=Rome=Rome", "--copy=Rome=Rome", "--average=Rome+Rome", "--inject=Rome=Rome"]
)
def test_an_edit_that_changes_nothing_is_refused(tmp_path, edit):
    out = tmp_path / "edited"
    code, _, lines, packages = run(
        ["tools/edit_knowledge.py", "--checkpoint", str(tmp_path), "--output", str(out), edit]
    )
    assert code == 1 and len(lines) == 1
    assert "names 'Rome' on every side, so it would change nothing" in lines[0]
    assert not out.exists() and "torch" not in packages
