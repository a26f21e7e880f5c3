"""The learning-rate schedule: linear warm-up, then step decay clamped at a floor.

    lr(s) = start * s / warmup                                  for s < warmup
    lr(s) = max(end, start / factor ** floor(s / decay_every))  after

With the defaults (1e-4, factor 10, every 50000 steps, floor 1e-5) the rate is 1e-4 for the
first 50k optimizer steps and 1e-5 after. It is a pure function of the optimizer step, so it
needs no state in checkpoints and steps exactly once per optimizer step whatever the number
of processes (accelerate's scheduler wrapper would step once per process).
"""
from __future__ import annotations

import math


def step_decay_lr(step: int, start: float, end: float, decay_every: int,
                  factor: float = 10.0, warmup_steps: int = 0) -> float:
    if step < 0:
        raise ValueError("step must be >= 0")
    if warmup_steps and step < warmup_steps:
        return start * (step + 1) / warmup_steps
    decays = math.floor(step / decay_every)
    return max(end, start / factor**decays)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
