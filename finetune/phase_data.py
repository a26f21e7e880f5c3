"""A phase's data, ready for training: ingested, checked against the recipe's policy,
prepared at each stage's resolution, with the caption template applied."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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

    def report(self) -> dict:
        return {"path": self.source, "fingerprint": self.fingerprint,
                "usable": len(self.captions), "skipped": len(self.rejected),
                "skipped_samples": [{"where": r.where, "reason": r.reason} for r in self.rejected]}


def resolve_data_path(spec, cache_dir: Path) -> Path:
    if spec.path.startswith("synth:"):
        from data_tools.synth import materialize

        return materialize(spec.path, cache_dir)
    return Path(spec.path).expanduser()


def load_phase_data(spec, resolutions: list[int], cache_dir: Path, where: str,
                    progress_factory=None) -> PhaseData:
    root = resolve_data_path(spec, cache_dir)
    found = ingest(root, spec.format, spec.caption_column, spec.image_column)
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
    if rejected and spec.on_bad_sample == "fail":
        first = rejected[0]
        raise UserError(f"{where}: {len(rejected)} bad sample(s) in {spec.path} and on_bad_sample is "
                        f"'fail'; first: {first.where}: {first.reason} (run `finetune-data inspect "
                        f"{spec.path}` for all, or set on_bad_sample: skip)")
    if len(usable) < spec.min_samples:
        reason = f"; first skipped: {rejected[0].where}: {rejected[0].reason}" if rejected else ""
        raise UserError(f"{where}: only {len(usable)} usable sample(s) in {spec.path}, "
                        f"min_samples is {spec.min_samples}{reason}")
    pixels, captions = {}, None
    for size, result in prepared.items():
        keep = [i for i, w in enumerate(result.wheres) if w in usable]
        pixels[size] = result.pixels[keep]
        if captions is None:
            captions = [f"{spec.caption_prefix}{result.captions[i]}{spec.caption_suffix}" for i in keep]
    digest = hashlib.sha256(json.dumps([sorted(p.key for p in prepared.values()), spec.caption_prefix,
                                        spec.caption_suffix, sorted(usable)]).encode())
    return PhaseData(captions or [], pixels, rejected, str(spec.path), digest.hexdigest()[:16])
