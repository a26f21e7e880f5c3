"""A phase's data, ready for training: ingested, checked against the recipe's policy,
prepared at each stage's resolution, with the caption template applied."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_tools.ingest import Rejection, ingest
from data_tools.prepare import Prepared, prepare

from .errors import UserError


@dataclass
class PhaseData:
    captions: list[str]
    pixels: dict[int, torch.Tensor]  # resolution -> (N, 3, S, S) uint8
    rejected: list[Rejection]
    source: str
    fingerprint: str = ""  # files (paths, sizes, mtimes), preparation settings and caption template
    wheres: list[str] = field(default_factory=list)
    validation: "PhaseData | None" = None
    warnings: list[dict] = field(default_factory=list)  # used, but worth knowing (near-duplicates, long captions)
    stats: dict = field(default_factory=dict)

    def report(self) -> dict:
        return {"path": self.source, "fingerprint": self.fingerprint,
                "usable": len(self.captions), "skipped": len(self.rejected),
                "validation": len(self.validation.captions) if self.validation else 0,
                "skipped_samples": [{"where": r.where, "reason": r.reason} for r in self.rejected],
                "warnings": self.warnings, "stats": self.stats}

    @classmethod
    def concat(cls, parts: list["PhaseData"]) -> "PhaseData":
        """Several phases' data as one set (distillation on everything the teacher saw)."""
        if len(parts) == 1:
            return parts[0]
        held = [p.validation for p in parts if p.validation is not None]
        digest = hashlib.sha256(json.dumps([p.fingerprint for p in parts]).encode()).hexdigest()[:16]
        return cls([c for p in parts for c in p.captions],
                   {s: torch.cat([p.pixels[s] for p in parts]) for s in parts[0].pixels},
                   [r for p in parts for r in p.rejected], " + ".join(p.source for p in parts), digest,
                   [w for p in parts for w in p.wheres], cls.concat(held) if held else None)

    def with_replay(self, earlier: list["PhaseData"], fraction: float, seed: int) -> tuple["PhaseData", int]:
        """This phase's data plus samples of earlier phases' training data, so that about
        `fraction` of the mixed set (and so of every epoch's batches) is rehearsal. The replayed
        samples are a seeded draw without repetition (cycling when more are needed than there
        are), fixed at preparation, so resumed runs see the same mix. Validation stays this
        phase's own. Returns (mixed data, number of replayed samples)."""
        pool = PhaseData.concat(earlier)
        count = round(fraction / (1.0 - fraction) * len(self.captions))
        if count == 0 or not pool.captions:
            return self, 0
        order = torch.randperm(len(pool.captions), generator=torch.Generator().manual_seed(seed))
        picked = pool.subset(order.repeat(count // len(order) + 1)[:count].tolist())
        digest = hashlib.sha256(json.dumps([self.fingerprint, pool.fingerprint, fraction, seed]).encode())
        mixed = PhaseData(self.captions + picked.captions,
                          {s: torch.cat([p, picked.pixels[s]]) for s, p in self.pixels.items()},
                          self.rejected, f"{self.source} + replay of {pool.source}",
                          digest.hexdigest()[:16], self.wheres + picked.wheres, self.validation,
                          self.warnings, self.stats)
        return mixed, count

    def subset(self, keep: list[int]) -> "PhaseData":
        return PhaseData([self.captions[i] for i in keep], {s: p[keep] for s, p in self.pixels.items()},
                         [], self.source, self.fingerprint, [self.wheres[i] for i in keep])


def in_validation(where: str, fraction: float) -> bool:
    """Stable per sample: adding data never moves an old sample across the split."""
    return fraction > 0 and int(hashlib.sha1(where.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def apply_dedupe(pixels: torch.Tensor, wheres: list[str], policy: str) -> tuple[set[int], list[Rejection], list[dict]]:
    """(indices to drop, their rejections, near-duplicate warnings kept by the policy)."""
    from data_tools.analysis import find_duplicates

    if policy == "off":
        return set(), [], []
    found = find_duplicates(pixels.numpy(), near=True)
    drop, rejected, warnings = set(), [], []
    for i, (first, kind, distance) in sorted(found.items()):
        if kind == "exact" or policy == "near":
            drop.add(i)
            what = "exact duplicate" if kind == "exact" else f"near-duplicate (phash distance {distance})"
            rejected.append(Rejection(wheres[i], f"{what} of {wheres[first]}"))
        else:
            warnings.append({"where": wheres[i], "warning": f"near-duplicate of {wheres[first]} "
                             f"(phash distance {distance}); kept (data.dedupe: near leaves it out)"})
    return drop, rejected, warnings


def resolve_data_path(spec, cache_dir: Path) -> Path:
    if spec.path.startswith("synth:"):
        from data_tools.synth import materialize

        return materialize(spec.path, cache_dir)
    return Path(spec.path).expanduser()


def load_phase_data(spec, resolutions: list[int], cache_dir: Path | None, where: str,
                    progress_factory=None, enforce: bool = True) -> PhaseData:
    """`enforce=False` (finetune-data inspect) reports instead of failing on the policy."""
    root = resolve_data_path(spec, cache_dir)
    found = ingest(root, spec.format, spec.caption_column, spec.image_column, spec.split)
    rejected = list(found.rejected)
    prepared: dict[int, Prepared] = {}
    for size in sorted(set(resolutions)):
        bar = progress_factory(len(found.records), f"prepare {root.name} @{size}px") if progress_factory else None
        prepared[size] = prepare(found.records, size, cache_dir, spec.too_small, bar)
        if bar is not None:
            bar.close()
    # A sample is usable only if it prepared at every resolution the stages need.
    usable = None
    for result in prepared.values():
        ok = set(result.wheres)
        usable = ok if usable is None else usable & ok
        known = {r.where for r in rejected}
        rejected += [r for r in result.rejected if r.where not in known]
    usable = usable or set()
    if enforce and rejected and spec.on_bad_sample == "fail":
        first = rejected[0]
        raise UserError(f"{where}: {len(rejected)} bad sample(s) in {spec.path} and on_bad_sample is "
                        f"'fail'; first: {first.where}: {first.reason} (run `finetune-data inspect "
                        f"{spec.path}` for all, or set on_bad_sample: skip)")
    if enforce and len(usable) < spec.min_samples:
        reason = f"; first skipped: {rejected[0].where}: {rejected[0].reason}" if rejected else ""
        raise UserError(f"{where}: only {len(usable)} usable sample(s) in {spec.path}, "
                        f"min_samples is {spec.min_samples}{reason}")
    if not usable:
        return PhaseData([], {s: r.pixels[:0] for s, r in prepared.items()}, rejected, str(spec.path))
    pixels, captions, wheres, sizes = {}, None, [], []
    for size, result in prepared.items():
        keep = [i for i, w in enumerate(result.wheres) if w in usable]
        pixels[size] = result.pixels[keep]
        if captions is None:
            captions = [f"{spec.caption_prefix}{result.captions[i]}{spec.caption_suffix}" for i in keep]
            wheres = [result.wheres[i] for i in keep]
            sizes = [result.sizes[i] for i in keep]
    captions = captions or []
    drop, dupes, warnings = apply_dedupe(pixels[max(pixels)], wheres, spec.dedupe)
    rejected += dupes
    digest = hashlib.sha256(json.dumps([sorted(p.key for p in prepared.values()), spec.caption_prefix,
                                        spec.caption_suffix, sorted(usable)]).encode())
    from data_tools.analysis import summary

    everything = PhaseData(captions, pixels, rejected, str(spec.path), digest.hexdigest()[:16], wheres,
                           warnings=warnings, stats=summary(sizes, captions))
    train = [i for i in range(len(captions)) if i not in drop and not in_validation(wheres[i], spec.validation_fraction)]
    held = [i for i in range(len(captions)) if i not in drop and in_validation(wheres[i], spec.validation_fraction)]
    if enforce and len(train) < spec.min_samples:
        raise UserError(f"{where}: only {len(train)} usable training sample(s) in {spec.path} after "
                        f"duplicates and the validation split; min_samples is {spec.min_samples}")
    data = everything.subset(train)
    data.rejected, data.warnings, data.stats = rejected, warnings, everything.stats
    data.validation = everything.subset(held) if held else None
    return data
