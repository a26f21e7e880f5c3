"""Preparation: decode every usable image once, resize and centre-crop it to a stage's
resolution, and keep the result as one uint8 tensor file in the cache.

Decoding everything up front is what makes a run immune to a bad file: a truncated JPEG is
found here, reported with its reason, and skipped (or fails the run before any step, by
policy) - never discovered at step 40,000. The cache key covers each file's path, size and
modification time and the resolution, so a second run on the same data starts immediately
and an edited file is prepared again.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.atomic import atomic_path

from .images import ImageProblem, load_rgb, resize_center_crop
from .ingest import Record, Rejection

PREPARE_VERSION = 2  # 2: original sizes kept


@dataclass
class Prepared:
    pixels: torch.Tensor            # (N, 3, S, S) uint8
    captions: list[str]
    wheres: list[str]
    rejected: list[Rejection] = field(default_factory=list)
    from_cache: bool = False
    sizes: list = field(default_factory=list)  # original (width, height) of each usable image
    key: str = ""                   # fingerprint of the files (paths, sizes, mtimes) and settings


def _cache_key(records: list[Record], resolution: int, too_small: str) -> str:
    digest = hashlib.sha256(f"v{PREPARE_VERSION}:{resolution}:{too_small}".encode())
    for rec in records:
        if rec.data is not None:
            digest.update(f"{rec.where}|{hashlib.sha1(rec.data).hexdigest()}|{rec.caption}\n".encode())
            continue
        stat = rec.image.stat()
        digest.update(f"{rec.image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{rec.caption}\n".encode())
    return digest.hexdigest()[:24]


def decode_record(rec: Record, resolution: int, too_small: str = "upscale") -> tuple[np.ndarray, tuple[int, int]]:
    """(3, S, S) uint8 pixels and the original (width, height)."""
    img = load_rgb(io.BytesIO(rec.data) if rec.data is not None else rec.image)
    if min(img.size) < resolution and too_small == "skip":
        raise ImageProblem(f"too small ({img.size[0]}x{img.size[1]}) for resolution {resolution}"
                           " (data.too_small: upscale to keep it)")
    return np.asarray(resize_center_crop(img, resolution), dtype=np.uint8).transpose(2, 0, 1), img.size


def prepare(records: list[Record], resolution: int, cache_dir: Path | None,
            too_small: str = "upscale", progress=None) -> Prepared:
    key = _cache_key(records, resolution, too_small)
    cache_file = Path(cache_dir) / "prepared" / f"{key}.safetensors" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        with safe_open(cache_file, "pt") as handle:
            meta = json.loads(handle.metadata()["prepared"])
            pixels = handle.get_tensor("pixels")
        return Prepared(pixels, meta["captions"], meta["wheres"],
                        [Rejection(**r) for r in meta["rejected"]], from_cache=True,
                        sizes=[tuple(s) for s in meta["sizes"]], key=key)
    arrays, captions, wheres, rejected, sizes = [], [], [], [], []
    for rec in records:
        try:
            array, size = decode_record(rec, resolution, too_small)
            arrays.append(array)
            sizes.append(size)
            captions.append(rec.caption)
            wheres.append(rec.where)
        except ImageProblem as exc:
            rejected.append(Rejection(rec.where, str(exc)))
        if progress is not None:
            progress.update(1)
    # Contiguous NCHW, as read back from the cache: np.stack keeps the transposed (channels-last)
    # layout of the decoded arrays, and convolutions sum in another order on that layout, so a
    # first run on cold data would differ (~1e-6) from every later run on cached data.
    pixels = (torch.from_numpy(np.stack(arrays)).contiguous() if arrays
              else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8))
    if cache_file is not None:
        meta = {"captions": captions, "wheres": wheres, "sizes": sizes,
                "rejected": [r.__dict__ for r in rejected]}
        with atomic_path(cache_file) as tmp:
            save_file({"pixels": pixels}, str(tmp), metadata={"prepared": json.dumps(meta)})
    return Prepared(pixels, captions, wheres, rejected, sizes=sizes, key=key)


def to_model_range(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float [-1, 1], the range IF's UNets work in."""
    return pixels_uint8.float().div(127.5).sub(1.0)
