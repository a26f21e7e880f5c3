"""Exponential moving average of the trained weights (LoRA factors or a whole UNet).

The average lives beside the parameters, in fp32, on their device. Its decay warms up as
min(decay, (1 + t) / (10 + t)) so the first steps are not dominated by the random or
zero-initialised start (the usual schedule of EMA in diffusion training).

Checkpoints hold it as `ema.<i>` tensors, in the trainer's parameter order (deterministic for
a given recipe), so a resume continues the same average.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    PREFIX = "ema."

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.steps = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), 1.0 - decay)
        self.steps += 1

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {f"{self.PREFIX}{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}
        tensors[f"{self.PREFIX}steps"] = torch.tensor(self.steps)
        return tensors

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(tensors[f"{self.PREFIX}{i}"])
        self.steps = int(tensors[f"{self.PREFIX}steps"])

    @contextmanager
    def swapped(self):
        """Inside, the model's parameters hold the average (e.g. to export or sample it)."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow.to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved):
                    param.copy_(value)
