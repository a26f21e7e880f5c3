"""Which samples make each step's batch, and every per-step random choice.

Everything is a pure function of (seed, unit, step): the sample order is a fresh seeded
permutation per epoch, and each step gets its own generator. A resumed run therefore sees
exactly the batches and noise an uninterrupted run would, with no RNG state to save.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


class BatchOrder:
    def __init__(self, num_samples: int, batch_size: int, seed: int, unit: str):
        self.n = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.unit = unit
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.unit, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}  # keep one epoch
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._perm(p // self.n)[p % self.n] for p in positions])

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.unit, "step", step))


def local_slice(global_batch: int, rank: int, world: int) -> slice:
    """This process's contiguous share of a global batch."""
    per = global_batch // world
    return slice(rank * per, (rank + 1) * per)
