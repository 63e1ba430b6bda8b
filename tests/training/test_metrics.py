import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stem_megatron.training import progress as progress_mod
from stem_megatron.training.metrics import MetricsLogger
from stem_megatron.training.progress import TrainingProgress


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_tb(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_and_tensorboard_hold_the_logged_values(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run") as logger:
        logger.log(1, {"loss/train": 4.5, "optim/lr": 3e-4, "stem/unique_rows": 17})
        logger.log(
            2,
            {
                "loss/train": torch.tensor(4.25),
                "optim/lr": 2.5e-4,
                "optim/grad_norm": None,  # skipped, not written as null
            },
        )
        # Each line is on disk as soon as log() returns: a crash loses nothing logged.
        assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows == [
        {"step": 1, "loss/train": 4.5, "optim/lr": 3e-4, "stem/unique_rows": 17.0},
        {"step": 2, "loss/train": 4.25, "optim/lr": 2.5e-4},
    ]
    assert all(isinstance(v, float) for row in rows for k, v in row.items() if k != "step")

    scalars = read_tb(tmp_path / "run" / "tb")
    assert set(scalars) == {"loss/train", "optim/lr", "stem/unique_rows"}
    assert scalars["loss/train"] == [(1, 4.5), (2, 4.25)]
    assert [s for s, _ in scalars["optim/lr"]] == [1, 2]
    assert [v for _, v in scalars["optim/lr"]] == pytest.approx([3e-4, 2.5e-4])
    assert scalars["stem/unique_rows"] == [(1, 17.0)]


def test_non_scalar_tensor_rejected(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger, pytest.raises(ValueError, match="loss/train"):
        logger.log(1, {"loss/train": torch.ones(3)})


def test_truncate_after_drops_the_crashed_tail_on_resume(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss/train": 10.0 - step})
    # The crashed run also left half a line behind.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss/tr')

    # Resume from the checkpoint at step 3: steps 4.. are redone with new values. A resume
    # starts in a later second: TensorBoard orders event files by name, which within one
    # second (same time, host and pid) ends in a process-wide counter compared as text (9 > 10).
    time.sleep(1.0)
    with MetricsLogger(tmp_path) as logger:
        logger.truncate_after(3)
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        for step in range(4, 7):
            logger.log(step, {"loss/train": 100.0 + step})

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss/train"] for r in rows] == [9.0, 8.0, 7.0, 104.0, 105.0, 106.0]
    # TensorBoard hides the first run's steps 4 and 5 too.
    assert read_tb(tmp_path / "tb")["loss/train"] == [
        (1, 9.0),
        (2, 8.0),
        (3, 7.0),
        (4, 104.0),
        (5, 105.0),
        (6, 106.0),
    ]


def test_truncate_after_without_a_previous_file(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run") as logger:
        logger.truncate_after(10)
        logger.log(11, {"loss/train": 1.0})
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == [{"step": 11, "loss/train": 1.0}]


def test_disabled_logger_creates_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, enabled=False) as logger:
        logger.truncate_after(3)
        logger.log(1, {"loss/train": 1.0})
    assert not run_dir.exists()


# --- progress -------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress_mod, "monotonic", fake)
    return fake


LINE = re.compile(
    r"^step +\d+/\d+ \| loss \d+\.\d{4}( \| lr \d\.\d\de[-+]\d\d)?"
    r"( \| grad_norm \d+\.\d{3})? \| tok/s [\d,]+ \| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$"
)


def test_plain_lines_when_not_a_terminal(
    clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    progress = TrainingProgress(train_iters=2000, log_interval=100)
    for step in range(1, 201):
        clock.t += 0.5  # 2 steps/s, 4096 tokens each
        loss = 5.0 if step <= 100 else 4.0  # the caller's window mean
        progress.update(step, loss=loss, tokens=4096, lr=3e-4, grad_norm=0.8123)
        if step == 100:
            progress.message("step 100 | val_loss 4.0000")
    progress.close()

    out = capsys.readouterr()
    assert out.err == ""  # no bar
    lines = out.out.splitlines()
    assert lines == [
        "step  100/2000 | loss 5.0000 | lr 3.00e-04 | grad_norm 0.812 | tok/s 8,192"
        " | elapsed 0:00:50 | eta 0:15:50",
        "step 100 | val_loss 4.0000",
        "step  200/2000 | loss 4.0000 | lr 3.00e-04 | grad_norm 0.812 | tok/s 8,192"
        " | elapsed 0:01:40 | eta 0:15:00",
    ]
    assert LINE.match(lines[0]) and LINE.match(lines[2])


def test_resumed_run_eta_counts_only_remaining_steps(
    clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    progress = TrainingProgress(train_iters=1000, start_step=900, log_interval=50)
    for step in range(901, 1001):
        clock.t += 2.0
        progress.update(step, loss=3.0, tokens=1000)
    lines = capsys.readouterr().out.splitlines()
    # 50 steps in 100 s, 50 left: 100 s, not 900 steps' worth. The last step always prints.
    assert lines == [
        "step  950/1000 | loss 3.0000 | tok/s 500 | elapsed 0:01:40 | eta 0:01:40",
        "step 1000/1000 | loss 3.0000 | tok/s 500 | elapsed 0:03:20 | eta 0:00:00",
    ]
    assert all(LINE.match(line) for line in lines)


def test_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with TrainingProgress(train_iters=10, enabled=False) as progress:
        for step in range(1, 11):
            progress.update(step, loss=1.0, tokens=1)
        progress.message("step 10 | val_loss 1.0000")
    assert capsys.readouterr() == ("", "")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_and_messages_do_not_break_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    with TrainingProgress(train_iters=20, start_step=10, log_interval=5) as progress:
        for step in range(11, 21):
            progress.update(step, loss=2.5, tokens=100)
        progress.message("step 20 | val_loss 2.0000")
    assert capsys.readouterr().out == "step 20 | val_loss 2.0000\n"  # no plain lines
    bar = term.getvalue()
    assert "20/20" in bar and "loss 2.5000" in bar and "tok/s" in bar
