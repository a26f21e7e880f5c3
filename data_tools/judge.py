"""The judge: scores an image against the synthetic world's ground truth by classical image
analysis (no model): foreground mask -> connected components -> per attribute.

- count:    components larger than a noise floor
- colour:   the nearest palette colour to the components' mean RGB
- shape:    best IoU between the largest component and each shape's template, drawn by the
            same renderer and scaled to the component's bounding box
- position: the 3x3 cell holding the component's centroid (single-object scenes only)
"""
from __future__ import annotations

from collections import deque
from functools import lru_cache

import numpy as np
from PIL import Image

from .synth import BACKGROUND, COLOURS, COUNT_WORDS, Scene, position_name, render

ATTRIBUTES = ("colour", "shape", "count", "position")
ALL_SHAPES = ("circle", "square", "triangle", "star", "cross")


def background_colour(img: np.ndarray) -> np.ndarray:
    """The median colour of the image border: the world's backgrounds are plain, but a
    generated image's background may drift from the exact training colour."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def foreground(img: np.ndarray, threshold: float = 60.0, background=None) -> np.ndarray:
    background = np.array(BACKGROUND if background is None else background, np.float32)
    diff = np.abs(img.astype(np.float32) - background).sum(-1)
    return diff > threshold


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components as lists of (row, col) pixels, largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    found = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        queue, pixels = deque([(r0, c0)]), []
        seen[r0, c0] = True
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        found.append(np.array(pixels))
    return sorted(found, key=len, reverse=True)


@lru_cache(maxsize=None)
def _template(shape: str) -> np.ndarray:
    img = render(Scene(shape, "red", 1, "center"), 96, np.random.default_rng(0), supersample=2)
    mask = foreground(np.asarray(img))
    rows, cols = np.nonzero(mask)
    return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def classify_shape(mask: np.ndarray, pixels: np.ndarray, shapes=ALL_SHAPES) -> str:
    r0, c0 = pixels.min(0)
    r1, c1 = pixels.max(0) + 1
    crop = mask[r0:r1, c0:c1]
    best, best_iou = shapes[0], -1.0
    for shape in shapes:
        tmpl = np.asarray(Image.fromarray(_template(shape)).resize(
            (crop.shape[1], crop.shape[0]), Image.Resampling.NEAREST))
        iou = (tmpl & crop).sum() / max(1, (tmpl | crop).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def analyse(image) -> dict:
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    size = img.shape[0]
    mask = foreground(img, background=background_colour(img))
    floor = max(4, int(0.004 * size * size))
    comps = [c for c in components(mask) if len(c) >= floor]
    if not comps:
        return {"count": 0, "colour": None, "shape": None, "position": None}
    pixels = np.concatenate(comps)
    mean = img[pixels[:, 0], pixels[:, 1]].astype(np.float32).mean(0)
    colour = min(COLOURS, key=lambda name: float(((np.array(COLOURS[name]) - mean) ** 2).sum()))
    main = comps[0]
    cy, cx = main.mean(0) / size * 3
    return {"count": len(comps), "colour": colour, "shape": classify_shape(mask, main),
            "position": position_name(min(2, int(cy)), min(2, int(cx)))}


def judge(image, truth: dict) -> dict[str, bool]:
    """Per-attribute correctness of one image against its ground truth (a Scene as dict)."""
    seen = analyse(image)
    result = {"colour": seen["colour"] == truth["colour"],
              "shape": seen["shape"] == truth["shape"],
              "count": seen["count"] == truth["count"]}
    if truth["count"] == 1:
        result["position"] = seen["position"] == truth["position"]
    return result


def accuracy(images, truths) -> dict[str, float]:
    """Per-attribute and overall (all attributes right) accuracy over a set of images."""
    tallies = {a: [] for a in ATTRIBUTES}
    overall = []
    for image, truth in zip(images, truths):
        verdict = judge(image, truth)
        for attr, ok in verdict.items():
            tallies[attr].append(ok)
        overall.append(all(verdict.values()))
    out = {a: float(np.mean(v)) for a, v in tallies.items() if v}
    out["overall"] = float(np.mean(overall)) if overall else 0.0
    return out


__all__ = ["accuracy", "analyse", "judge", "COUNT_WORDS"]
