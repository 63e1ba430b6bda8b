"""Every command in the docs' `bash` blocks works as written after `make train`.

The docs: README.md, docs/*.md and benchmarks/RESULTS.md. Convention (docs/testing.md): a
fenced block whose info string is `bash` holds commands for a shell at the repository root,
meant to run top to bottom after `make train`, each document on its own. A block right after
the line `<!-- readme-test: not run (REASON) -->` is checked but not run: multi-node, SLURM or
GPU commands, a Llama directory that is not here, minutes of training, `make test` itself.
Blocks of other kinds (plain output, `yaml`, `python`) are not commands. Comment lines are
dropped and backslash continuations joined.

- test_doc_commands_parse (default suite, seconds): each command names a make target,
  script, config and flags that exist (flags as the tool's --help lists them), its overrides
  and config pass load_config, and every run directory or output it reads was made before it:
  `runs/latest` by `make train`, anything else by a command above it in the same document. No
  two commands write the same output (the slow test runs every document in one copy).
- test_doc_commands_run (slow): copies the repository to a temporary directory, shrinks
  configs/tiny.yaml to a 4-step run of a small model, runs `make train`, then every command not
  marked, document after document, and requires exit status 0 from each.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from stem_megatron.config import ConfigError
from stem_megatron.config_loader import load_config
from stem_megatron.train import parse_args as parse_train_args

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = re.compile(r"<!-- readme-test: not run \((.+)\) -->")
FENCE = re.compile(r"^```(\S*)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]+$|<[a-z-]+>")  # TOKENIZER, runs/tiny-<date>
# Paths the documented commands create and read; anything read there must be made first.
MADE = ("runs/", "out/", "exported/")
OUTPUT_FLAGS = ("--output", "--out", "--output-prefix")
# Tools with an output among their positional arguments: which one, counting from 1
# (<command> <source> <out>).
OUTPUT_POSITIONAL = {"tools/convert_checkpoint.py": 3, "stem-convert": 3}
# The console scripts pyproject.toml installs (make install): name -> "module:function".
CONSOLE_SCRIPTS = {
    ep.name: ep.value
    for ep in entry_points(group="console_scripts")
    if ep.value.startswith("stem_megatron.")
}
# What `make train` leaves for the commands below it (configs/tiny.yaml's run).
MADE_BY_MAKE_TRAIN = ["runs/latest"]


@dataclass
class Command:
    text: str  # one shell command, continuations joined
    line: int  # line of the document it starts on
    run: bool  # False: in a block marked not run
    document: str = "README.md"

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.text}"


def documents() -> list[str]:
    """The documents whose commands are checked, repository-relative, in the order run."""
    docs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
    return ["README.md", *docs, "benchmarks/RESULTS.md"]


def block_commands(text: str, document: str = "README.md") -> list[Command]:
    """The commands of one document's `bash` blocks, in order."""
    lines = text.splitlines()
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        run = not (i > 0 and NOT_RUN.fullmatch(lines[i - 1].strip()))
        is_bash = fence.group(1) == "bash"
        pending, start = "", 0
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            line = lines[i].strip()
            i += 1
            if not is_bash or not line or (not pending and line.startswith("#")):
                continue
            if not pending:
                start = i
            pending += line[:-1].rstrip() + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                commands.append(Command(pending, start, run, document))
                pending = ""
        i += 1
    return commands


def _load(program: str) -> ModuleType:
    """The module whose main() `program` runs: a console script's, or a script file's."""
    if program in CONSOLE_SCRIPTS:
        return importlib.import_module(CONSOLE_SCRIPTS[program].split(":")[0])
    script = ROOT / program
    spec = importlib.util.spec_from_file_location(f"doc_tool_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))  # as `python script.py` has it: its own folder first
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(script.parent))
    return module


def _tool_help(program: str, args: list[str]) -> str:
    """The tool's --help text (of its subcommand when the first argument is one), from the
    tool's own parser: its main() parses before it does anything else."""
    module = _load(program)
    takes_argv = bool(inspect.signature(module.main).parameters)  # else it reads sys.argv

    def help_of(argv: list[str]) -> str:
        out, saved = io.StringIO(), sys.argv
        sys.argv = [program, *argv]
        try:
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                module.main(argv) if takes_argv else module.main()
        finally:
            sys.argv = saved
        return out.getvalue()

    text = help_of(["--help"])
    subcommands = re.search(r"\{([\w,-]+)\}", text)
    if subcommands and args and args[0] in subcommands.group(1).split(","):
        text += help_of([args[0], "--help"])
    return text


class Checker:
    """Checks commands in order, remembering what earlier ones of the document made."""

    def __init__(self) -> None:
        self.made: list[str] = []
        self.written: dict[str, Command] = {}  # every output so far, of any document
        self.command: Command | None = None
        self.targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))

    def start(self, document: str) -> None:
        """A document's commands run after `make train`, not after another document's."""
        self.made = list(MADE_BY_MAKE_TRAIN)

    def check(self, command: Command) -> None:
        self.command = command
        words = shlex.split(command.text, comments=True)
        for word in words:
            assert not word.startswith("[") and not PLACEHOLDER.match(word), (
                f"{word!r} is synopsis, not a command: write a value that runs"
            )
        while words and ENV_ASSIGNMENT.match(words[0]):
            words.pop(0)
        program, args = words[0], words[1:]
        if program == "make":
            assert args and args[0] in self.targets, f"no make target {args}"
            if args[0] == "train":
                self.made += MADE_BY_MAKE_TRAIN
        elif CONSOLE_SCRIPTS.get(program) == "stem_megatron.train:main":
            self._train(args)
        elif program in CONSOLE_SCRIPTS:
            self._tool(program, args)
        elif program in ("python", ".venv/bin/python"):
            if args[:2] == ["-m", "stem_megatron.train"]:
                self._train(args[2:])
            else:
                assert (ROOT / args[0]).is_file(), f"{args[0]} does not exist"
                self._tool(args[0], args[1:])
        elif program == "torchrun":
            assert "stem_megatron.train" in args, "torchrun runs -m stem_megatron.train"
            self._train(args[args.index("stem_megatron.train") + 1 :])
        elif program in ("launch/torchrun.sh", "sbatch"):
            script = next(a for a in [program, *args] if a.startswith("launch/"))
            assert (ROOT / script).is_file(), f"{script} does not exist"
            rest = args[args.index(script) + 1 :] if script in args else args
            if rest and rest[0].isdigit():  # torchrun.sh NPROC CONFIG ...
                rest = rest[1:]
            if rest:
                self._config(rest[0], rest[1:])
        elif program == "srun":
            self.check(Command(shlex.join(args), command.line, command.run))
        else:
            assert program == "export", f"the test does not know how to check {program!r}"

    def _train(self, args: list[str]) -> None:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parsed = parse_train_args(args)
            except SystemExit:
                raise AssertionError(err.getvalue().strip()) from None
        assert parsed.config, "a training command names its --config"
        self._config(parsed.config, parsed.overrides)
        settings = dict(o.split("=", 1) for o in parsed.overrides)
        load = settings.get("checkpoint.load", "auto")
        if load != "auto":
            self._reads(load)
        if not parsed.dry_run and not parsed.config.startswith(MADE):
            self._writes(settings.get("logging.run_dir", f"runs/{Path(parsed.config).stem}"))

    def _config(self, config: str, overrides: list[str]) -> None:
        try:
            if config.startswith(MADE):  # a run's recorded config.yaml
                self._reads(config)
                load_config(None, overrides)
            else:
                load_config(ROOT / config, overrides)
        except ConfigError as exc:
            raise AssertionError(f"config error: {exc}") from None

    def _tool(self, program: str, args: list[str]) -> None:
        help_text = _tool_help(program, args)
        positional = 0
        for i, word in enumerate(args):
            flag = word.split("=", 1)[0]
            if word.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                    f"{program} has no option {flag} (see its --help)"
                )
                continue
            previous = args[i - 1] if i else ""
            is_value = previous.startswith("--") and "=" not in previous
            if not is_value:
                positional += 1
            value = word.split("=", 1)[1] if "=" in word and not is_value else word
            if previous in OUTPUT_FLAGS or (
                not is_value and OUTPUT_POSITIONAL.get(program) == positional
            ):
                self._writes(value)
            elif value.startswith("configs/"):
                assert (ROOT / value).is_file(), f"{value} does not exist"
            elif value.startswith(MADE):
                self._reads(value)

    def _writes(self, path: str) -> None:
        other = self.written.get(path)
        assert other is None, f"{path} is written by {other} too: give each output its own name"
        self.written[path] = self.command
        self.made.append(path)

    def _reads(self, path: str) -> None:
        made = any(
            path == m
            or path.startswith(m.rstrip("/") + "/")
            or m.startswith(path.rstrip("/") + "/")
            for m in self.made
        )
        assert made, (
            f"{path} is read, but neither make train nor a command above makes it "
            f"(made so far: {', '.join(self.made)})"
        )


def documented_commands() -> list[Command]:
    return [c for doc in documents() for c in block_commands((ROOT / doc).read_text(), doc)]


def check_commands(commands: list[Command]) -> list[str]:
    """What is wrong with each command, checked document by document."""
    checker, failures, document = Checker(), [], None
    for command in commands:
        if command.document != document:
            document = command.document
            checker.start(document)
        try:
            checker.check(command)
        except AssertionError as exc:
            failures.append(f"{command}\n    {exc}")
    return failures


def test_doc_commands_parse():
    commands = documented_commands()
    assert any(c.run for c in commands) and any(not c.run for c in commands)
    failures = check_commands(commands)
    assert not failures, "documented commands that cannot work as written:\n" + "\n".join(failures)


def test_a_document_reads_only_what_make_train_and_its_own_commands_made():
    made = Command("python tools/convert_checkpoint.py to-safetensors runs/latest out/st", 1, True)
    read = "python tools/convert_checkpoint.py from-safetensors out/st runs/again/checkpoints"
    assert check_commands([made, Command(read, 2, True)]) == []
    failures = check_commands([made, Command(read, 1, True, "docs/other.md")])
    assert len(failures) == 1 and "out/st is read" in failures[0]


def test_two_documents_may_not_write_one_output():
    write = "python tools/convert_checkpoint.py to-safetensors runs/latest out/st"
    failures = check_commands([Command(write, 1, True), Command(write, 1, True, "docs/other.md")])
    assert len(failures) == 1 and "out/st is written by README.md:1" in failures[0]


def test_the_convention_reads_blocks_marks_and_continuations():
    text = "\n".join(
        [
            "```bash",
            "# a comment",
            "python a.py --x 1 \\",
            "    --y 2",
            "make train",
            "```",
            "<!-- readme-test: not run (4 nodes) -->",
            "```bash",
            "sbatch launch/slurm.sbatch",
            "```",
            "```",
            "$ python not_a_command.py",
            "```",
            "```yaml",
            "a: 1",
            "```",
        ]
    )
    assert [(c.text, c.line, c.run) for c in block_commands(text)] == [
        ("python a.py --x 1 --y 2", 3, True),
        ("make train", 5, True),
        ("sbatch launch/slurm.sbatch", 9, False),
    ]


# --- the slow test: run them -------------------------------------------------------------

SHRUNK = {
    "model": {
        "num_layers": 6,
        "hidden_size": 64,
        "ffn_hidden_size": 192,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "seq_length": 64,
    },
    "train": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 4, "eval_iters": 1},
    "optim": {"lr_warmup_iters": 2},
}


def _copy_repository(dest: Path) -> None:
    """The working tree as git sees it (tracked and new files, not ignored ones), the prepared
    corpus, and the venv by a link. The files are dated before the venv's install stamp, so
    `make` in the copy never reinstalls into the shared venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    before_stamp = (ROOT / ".venv/.installed").stat().st_mtime - 1
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
            os.utime(dest / name, (before_stamp, before_stamp))
    shutil.copytree(ROOT / "data/prepared", dest / "data/prepared")
    (dest / ".venv").symlink_to(ROOT / ".venv")


def _shrink(config: Path) -> None:
    tree = yaml.safe_load(config.read_text())
    for section, values in SHRUNK.items():
        tree.setdefault(section, {}).update(values)
    config.write_text(yaml.safe_dump(tree, sort_keys=False))


def _run(command: str, repo: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        ["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit status {done.returncode}: {command}\n{output[-3000:]}"
    assert "nothing to do" not in output, f"{command} did nothing:\n{output[-1000:]}"


@pytest.mark.slow
def test_doc_commands_run(tmp_path):
    if (
        not (ROOT / "data/prepared/tokenizer.json").exists()
        or not (ROOT / ".venv/.installed").exists()
    ):
        pytest.skip("needs make install and make data")
    repo = tmp_path / "repo"
    _copy_repository(repo)
    _shrink(repo / "configs/tiny.yaml")
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=repo).returncode != 0:
        pytest.fail("make would reinstall the venv in the copy; the test must not")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{repo / '.venv/bin'}{os.pathsep}{env['PATH']}"  # `python` is the venv's
    _run("make train", repo, env)
    assert (repo / "runs/latest/checkpoints/latest").exists(), "make train made no runs/latest"
    # The venv's console scripts import the package installed editable (the checkout this test
    # runs from); the copy's own code comes first.
    in_copy = {**env, "PYTHONPATH": str(repo)}
    for command in documented_commands():
        if command.run:
            _run(command.text, repo, in_copy)
    # From outside the repository the tools find the bundled configs and the corpus that
    # the run's recorded config names by repository-relative paths.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in (
        f"python {repo}/tools/generate.py --checkpoint {repo}/runs/latest "
        f"--prompt ROMEO. --max-new-tokens 4",
        f"python {repo}/tools/edit_knowledge.py --checkpoint {repo}/runs/latest "
        f"--output edited --swap France=England",
        f"PYTHONPATH={repo} python -m stem_megatron.train --config configs/tiny.yaml --dry-run",
    ):
        _run(command, elsewhere, env)
