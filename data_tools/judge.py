"""The judge: scores an image against the synthetic world's ground truth by classical image
analysis (no model): foreground mask -> connected components -> per attribute.

- count:    components larger than a noise floor
- colour:   the nearest palette colour to the mean RGB of the components' cores
- shape:    analysis by synthesis: each candidate shape drawn (antialiased, by the renderer's
            own geometry) at the largest component's centroid and area, compared with the
            component's soft coverage of the object colour, holes filled (so an outline
            drawing is judged by its silhouette); the closest wins
- position: the 3x3 cell holding the component's centroid (single-object scenes only)
"""
from __future__ import annotations

from collections import deque
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from .synth import BACKGROUND, COLOURS, COUNT_WORDS, draw_shape, position_name

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


SUPERSAMPLE = 8


@lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    """Area of a shape of circumradius 1 (measured on a large drawing)."""
    r = 200
    img = Image.new("L", (2 * r + 4, 2 * r + 4), 0)
    draw_shape(ImageDraw.Draw(img), shape, r + 2, r + 2, r, 255)
    return float(np.asarray(img, np.float64).sum() / 255 / r ** 2)


def _drawn_coverage(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """The fraction of each pixel of a height x width window a shape covers (0..1),
    antialiased by drawing large and averaging down, as the renderer does."""
    img = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(img), shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, 255)
    return np.asarray(img.resize((width, height), Image.Resampling.BOX), np.float32) / 255


def coverage(img: np.ndarray, background: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """How much of each pixel the object colour covers (0..1): the pixel's position on the
    line from the background colour to the object colour. Edge pixels of a small object are
    blends, so this soft mask keeps the shape detail a thresholded mask loses at 32px."""
    axis = colour.astype(np.float32) - background
    t = ((img.astype(np.float32) - background) @ axis) / max(float(axis @ axis), 1e-6)
    return np.clip(t, 0.0, 1.0)


def _filled(window: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """The window's coverage with the object's holes filled: an outline drawing is judged by
    the silhouette it encloses. Holes are the pixels off the object that no path of other
    off-object pixels links to the window's edge."""
    on = np.zeros(window.shape, bool)
    on[pixels[:, 0], pixels[:, 1]] = True
    h, w = window.shape
    filled = window.copy()
    for region in components(~on):
        rows, cols = region[:, 0], region[:, 1]
        if not (rows.min() == 0 or cols.min() == 0 or rows.max() == h - 1 or cols.max() == w - 1):
            filled[rows, cols] = 1.0
    return filled


def classify_shape(cover: np.ndarray, pixels: np.ndarray, shapes=ALL_SHAPES) -> str:
    """The shape whose antialiased drawing best matches the object's coverage, by analysis
    by synthesis: each candidate is drawn at the object's centroid with the size that gives
    its measured area (and 10% either side), and compared pixel by pixel (squared error)."""
    h, w = cover.shape
    r0, c0 = np.maximum(pixels.min(0) - 2, 0)
    r1, c1 = np.minimum(pixels.max(0) + 3, (h, w))
    window = _filled(cover[r0:r1, c0:c1], pixels - (r0, c0))
    total = float(window.sum())
    if total <= 0:
        return shapes[0]
    rows, cols = np.mgrid[r0:r1, c0:c1]
    # pixel (i, j) covers [j, j+1) x [i, i+1): its centre is at +0.5 in drawing coordinates
    cy = float((window * (rows + 0.5)).sum() / total) - r0
    cx = float((window * (cols + 0.5)).sum() / total) - c0
    best, best_error = shapes[0], float("inf")
    for shape in shapes:
        radius = (total / _unit_area(shape)) ** 0.5
        for scale in (0.9, 1.0, 1.1):
            drawn = _drawn_coverage(shape, cx, cy, radius * scale, r1 - r0, c1 - c0)
            error = float(((drawn - window) ** 2).sum())
            if error < best_error:
                best, best_error = shape, error
    return best


def object_colour(img: np.ndarray, pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The mean colour of the objects' cores: the pixels furthest from the background (edge
    pixels are blends with it and would pull a small object's colour towards grey)."""
    values = img[pixels[:, 0], pixels[:, 1]].astype(np.float32)
    distance = np.abs(values - background).sum(-1)
    return values[distance >= 0.75 * distance.max()].mean(0)


def analyse(image) -> dict:
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    size = img.shape[0]
    background = background_colour(img)
    mask = foreground(img, background=background)
    floor = max(4, int(0.004 * size * size))
    comps = [c for c in components(mask) if len(c) >= floor]
    if not comps:
        return {"count": 0, "colour": None, "shape": None, "position": None}
    mean = object_colour(img, np.concatenate(comps), background)
    colour = min(COLOURS, key=lambda name: float(((np.array(COLOURS[name]) - mean) ** 2).sum()))
    main = comps[0]
    cy, cx = main.mean(0) / size * 3
    shape = classify_shape(coverage(img, background, mean), main)
    return {"count": len(comps), "colour": colour, "shape": shape,
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
