"""The project is a package: its console scripts are installed and answer, and no file finds
the code by editing sys.path (the editable install makes `stem_megatron` importable)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    ep.name: ep.value
    for ep in importlib.metadata.distribution("stem-megatron").entry_points
    if ep.group == "console_scripts"
}
# sys.path changed in code (insert/append/extend/assignment) or through site.addsitedir.
SYS_PATH_EDIT = re.compile(
    r"\bsys\.path\s*(\.\s*(insert|append|extend)\s*\(|(\[[^\]]*\])?\s*\+?=(?!=))"
    r"|\bsite\.addsitedir\s*\("
)
SEARCHED = ("stem_megatron", "tools", "benchmarks", "tests", "launch")


def test_the_installed_scripts_are_the_ones_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert SCRIPTS == declared, "the install is stale: run `make install`"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_console_script_answers_help(name, tmp_path):
    script = Path(sys.executable).with_name(name)
    assert script.exists(), f"{script} is not installed: run `make install`"
    done = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:"), done.stdout[:200]


def sys_path_edits(files: list[Path]) -> list[str]:
    """`path:line: text` of every line that edits sys.path."""
    return [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if SYS_PATH_EDIT.search(line)
    ]


# The one edit allowed: the doc-commands check loads a script as `python script.py` runs it,
# with the script's own folder first on the path (benchmarks import their siblings).
SCRIPT_RUN = "tests/test_doc_commands.py:", "sys.path.insert(0, str(script.parent))"


def test_no_file_edits_sys_path():
    files = [path for folder in SEARCHED for path in sorted((ROOT / folder).rglob("*.py"))]
    files += sorted(ROOT.glob("*.py"))
    files.remove(Path(__file__).resolve())  # its examples below are edits on purpose
    assert len(files) > 100, "the search found too few files"
    edits = sys_path_edits(files)
    allowed = [e for e in edits if e.startswith(SCRIPT_RUN[0]) and SCRIPT_RUN[1] in e]
    assert len(allowed) == 1, "the doc-commands check no longer loads scripts as Python does"
    assert [e for e in edits if e not in allowed] == [], "import from the installed package"


@pytest.mark.parametrize(
    "line",
    [
        "sys.path.insert(0, str(ROOT))",
        "sys.path.append(here)",
        "    sys.path[:0] = [root]",
        "sys.path += [root]",
        "sys.path = [root] + sys.path",
        "site.addsitedir(root)",
        'code = "import sys; sys.path.insert(0, sys.argv[1])"',
    ],
)
def test_the_search_catches_a_sys_path_edit(line, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "script.py").write_text(f"import sys\n{line}\n")
    assert sys_path_edits([tmp_path / "script.py"]) == [f"script.py:2: {line.strip()}"]


def test_reading_sys_path_is_not_an_edit(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "script.py").write_text("print(sys.path)\nif sys.path == []:\n    pass\n")
    assert sys_path_edits([tmp_path / "script.py"]) == []


def test_a_plot_without_the_demo_extra_names_it(monkeypatch, capsys, tmp_path):
    from stem_megatron.cli import inspect_checkpoint

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a),
    )
    assert inspect_checkpoint.main([str(tmp_path), "--plot", str(tmp_path / "p.png")]) == 1
    assert "--plot needs matplotlib: install the demo extra" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
