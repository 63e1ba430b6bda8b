"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to min_lr.

Megatron's semantics (`OptimizerParamScheduler`): `lr_decay_iters` counts from step 0
and includes the warmup, decay runs from max_lr to min_lr between the end of warmup and
`lr_decay_iters`, and the LR stays at min_lr after it. One deliberate difference in
indexing: `lr(step)` is the LR of the optimizer step taken when `step` iterations are
complete (0-indexed), and it evaluates Megatron's formula at `step + 1` optimizer steps.
So:
  - step 0 trains at max_lr / warmup (Megatron's first step runs at lr 0, a wasted step),
  - warmup ends with step warmup-1 at exactly max_lr,
  - with decay_iters == train_iters the last step, train_iters-1, runs at exactly min_lr.

The schedule is a pure function of the step, so it has no state to checkpoint: a resumed
run recomputes the LR from the step it resumes at.

Several param groups with different base LRs (dense weights, STEM tables) share one
schedule through `factor(step)`: set `group["lr"] = base_lr * schedule.factor(step)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stem_megatron.modes import DecayStyle


@dataclass(frozen=True)
class LRSchedule:
    """Warmup + decay schedule; `schedule(step)` is the LR, `schedule.factor(step)` its
    ratio to max_lr.

    Args:
        max_lr: peak LR, reached at the end of warmup (Megatron's `lr`).
        min_lr: LR at and after `decay_iters` (ignored by the constant style, which stays
            at max_lr after warmup, as in Megatron).
        warmup_iters: steps of linear warmup (Megatron's `lr_warmup_iters`); 0 disables it.
        decay_iters: step at which decay reaches min_lr, counted from 0 and including the
            warmup (Megatron's `lr_decay_iters`, usually train_iters).
        decay_style: "constant", "linear" or "cosine" (Megatron's `lr_decay_style`).
    """

    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    decay_style: DecayStyle = DecayStyle.COSINE

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise the style string through object.__setattr__.
        try:
            object.__setattr__(self, "decay_style", DecayStyle(self.decay_style))
        except ValueError:
            styles = ", ".join(s.value for s in DecayStyle)
            raise ValueError(
                f"decay_style={self.decay_style!r}: expected one of {styles}"
            ) from None
        if not self.max_lr > 0:  # also rejects NaN; factor() divides by it
            raise ValueError(f"max_lr={self.max_lr} must be > 0")
        if not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, max_lr={self.max_lr}]")
        if self.warmup_iters < 0:
            raise ValueError(f"warmup_iters={self.warmup_iters} must be >= 0")
        if self.decay_iters < 0:
            raise ValueError(f"decay_iters={self.decay_iters} must be >= 0")
        if self.warmup_iters > self.decay_iters:
            raise ValueError(
                f"warmup_iters={self.warmup_iters} must be <= "
                f"decay_iters={self.decay_iters} (decay iters include the warmup)"
            )

    @classmethod
    def from_megatron(
        cls,
        *,
        lr: float,
        min_lr: float,
        lr_warmup_iters: int,
        train_iters: int,
        lr_decay_iters: int | None = None,
        lr_decay_style: str = "cosine",
    ) -> LRSchedule:
        """Build from config fields with Megatron's names; lr_decay_iters defaults to
        train_iters."""
        return cls(
            max_lr=lr,
            min_lr=min_lr,
            warmup_iters=lr_warmup_iters,
            decay_iters=train_iters if lr_decay_iters is None else lr_decay_iters,
            decay_style=DecayStyle(lr_decay_style),
        )

    def __call__(self, step: int) -> float:
        """LR for the optimizer step taken when `step` iterations are complete."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        n = step + 1  # optimizer steps including this one; see the module docstring
        if n <= self.warmup_iters:
            return self.max_lr * n / self.warmup_iters
        if self.decay_style is DecayStyle.CONSTANT:
            return self.max_lr
        if n >= self.decay_iters:
            return self.min_lr
        ratio = (n - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.decay_style is DecayStyle.LINEAR:
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def factor(self, step: int) -> float:
        """lr(step) / max_lr: the multiplier for a param group with its own base LR."""
        return self(step) / self.max_lr
