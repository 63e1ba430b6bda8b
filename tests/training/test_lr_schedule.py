import math

import pytest

from stem_megatron.modes import DecayStyle
from stem_megatron.training.lr_schedule import LRSchedule

MAX, MIN, WARMUP, DECAY = 3e-4, 3e-5, 10, 110


def cosine(ratio: float) -> float:
    return MIN + 0.5 * (1 + math.cos(math.pi * ratio)) * (MAX - MIN)


def test_cosine_key_points() -> None:
    s = LRSchedule(MAX, MIN, WARMUP, DECAY, "cosine")
    # Warmup: (step + 1) / warmup of max, so step 0 is not wasted at lr 0.
    assert s(0) == pytest.approx(MAX / WARMUP)
    assert s(4) == pytest.approx(MAX * 5 / WARMUP)
    assert s(WARMUP - 1) == pytest.approx(MAX)  # end of warmup
    # First decay step: one step into the (DECAY - WARMUP)-step cosine.
    assert s(WARMUP) == pytest.approx(cosine(1 / (DECAY - WARMUP)))
    assert s(WARMUP) < MAX
    # Middle of the decay: halfway between max and min.
    mid = WARMUP + (DECAY - WARMUP) // 2 - 1
    assert s(mid) == pytest.approx((MAX + MIN) / 2)
    # The last step (DECAY - 1) is at min_lr exactly, and it stays there.
    assert s(DECAY - 2) > MIN
    assert s(DECAY - 1) == pytest.approx(MIN)
    assert s(DECAY + 1000) == MIN


def test_monotone_warmup_then_decay() -> None:
    s = LRSchedule(MAX, MIN, WARMUP, DECAY)
    lrs = [s(i) for i in range(DECAY + 5)]
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP]))
    assert all(a >= b for a, b in zip(lrs[WARMUP - 1 :], lrs[WARMUP:]))


def test_linear_and_constant() -> None:
    lin = LRSchedule(MAX, MIN, WARMUP, DECAY, DecayStyle.LINEAR)
    assert lin(WARMUP - 1) == pytest.approx(MAX)
    ratio = (30 + 1 - WARMUP) / (DECAY - WARMUP)
    assert lin(30) == pytest.approx(MAX - ratio * (MAX - MIN))
    assert lin(DECAY - 1) == pytest.approx(MIN)

    const = LRSchedule(MAX, MIN, WARMUP, DECAY, "constant")
    assert const(0) == pytest.approx(MAX / WARMUP)
    assert const(WARMUP - 1) == const(50) == const(DECAY + 10) == MAX


def test_no_warmup_and_decay_shorter_than_training() -> None:
    s = LRSchedule(MAX, MIN, 0, 20)
    assert s(0) == pytest.approx(cosine(1 / 20))
    assert s(19) == s(500) == MIN


def test_factor_scales_groups_with_their_own_base_lr() -> None:
    s = LRSchedule(MAX, MIN, WARMUP, DECAY)
    table_lr = 10 * MAX  # e.g. a STEM table group with a higher base LR
    for step in (0, WARMUP - 1, 40, DECAY - 1, DECAY + 3):
        assert s.factor(step) == pytest.approx(s(step) / MAX)
        assert table_lr * s.factor(step) == pytest.approx(10 * s(step))
    assert s.factor(WARMUP - 1) == pytest.approx(1.0)


def test_from_megatron_defaults_decay_iters_to_train_iters() -> None:
    s = LRSchedule.from_megatron(lr=MAX, min_lr=MIN, lr_warmup_iters=WARMUP, train_iters=DECAY)
    assert s == LRSchedule(MAX, MIN, WARMUP, DECAY, DecayStyle.COSINE)
    s = LRSchedule.from_megatron(
        lr=MAX,
        min_lr=MIN,
        lr_warmup_iters=WARMUP,
        train_iters=1000,
        lr_decay_iters=DECAY,
        lr_decay_style="linear",
    )
    assert (s.decay_iters, s.decay_style) == (DECAY, DecayStyle.LINEAR)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(min_lr=1e-3), "min_lr"),
        (dict(min_lr=-1e-5), "min_lr"),
        (dict(max_lr=-1.0), "max_lr"),
        (dict(max_lr=0.0, min_lr=0.0), "max_lr"),
        (dict(warmup_iters=200), "warmup_iters"),
        (dict(warmup_iters=-1), "warmup_iters"),
        (dict(decay_iters=-5, warmup_iters=0), "decay_iters"),
        (dict(decay_style="wsd"), "decay_style"),
    ],
)
def test_validation_names_the_field(kwargs: dict, field: str) -> None:
    args = dict(max_lr=MAX, min_lr=MIN, warmup_iters=WARMUP, decay_iters=DECAY)
    with pytest.raises(ValueError, match=field):
        LRSchedule(**{**args, **kwargs})


def test_negative_step_rejected() -> None:
    with pytest.raises(ValueError, match="step"):
        LRSchedule(MAX, MIN, WARMUP, DECAY)(-1)
