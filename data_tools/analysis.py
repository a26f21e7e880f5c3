"""Dataset analysis on prepared pixels: exact and near duplicates (perceptual hash), caption
token overflow, and summary statistics.

pHash: grey 32x32 -> 2-D DCT -> the 8x8 lowest frequencies without the DC term -> one bit per
coefficient above their median (63 bits). Robust to re-encoding, small resizes and mild
colour shifts; two images are near-duplicates when the Hamming distance is at most
NEAR_DISTANCE and their 8x8 colour thumbnails agree within COLOUR_TOLERANCE (pHash is
grey-level only: a red and a blue circle would otherwise be "duplicates"). Candidates are found by splitting the hash into 8 bands of 8 bits: two hashes
within distance 7 share at least one band exactly (pigeonhole), so no pair is missed and the
comparison stays near-linear.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter

import numpy as np

NEAR_DISTANCE = 4
BANDS = 8
COLOUR_TOLERANCE = 12.0  # mean |difference| of 8x8 colour thumbnails, out of 255


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(pixels: np.ndarray) -> int:
    """64-bit perceptual hash of one (3, S, S) uint8 image."""
    from PIL import Image

    grey = Image.fromarray(pixels.transpose(1, 2, 0)).convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    coeffs = _DCT32 @ np.asarray(grey, dtype=np.float64) @ _DCT32.T
    low = coeffs[:8, :8].flatten()[1:]
    bits = low > np.median(low)
    return int("".join("1" if b else "0" for b in bits), 2)


def _thumbnail(pixels: np.ndarray) -> np.ndarray:
    from PIL import Image

    small = Image.fromarray(pixels.transpose(1, 2, 0)).resize((8, 8), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def find_duplicates(pixels: np.ndarray, near: bool = True) -> dict[int, tuple[int, str, int]]:
    """{index: (index of the first copy, "exact" | "near", hamming distance)} for every image
    that repeats an earlier one."""
    found: dict[int, tuple[int, str, int]] = {}
    first_by_digest: dict[str, int] = {}
    for i, image in enumerate(pixels):
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        if digest in first_by_digest:
            found[i] = (first_by_digest[digest], "exact", 0)
        else:
            first_by_digest[digest] = i
    if not near:
        return found
    hashes = [phash(np.asarray(image)) for image in pixels]
    thumbs = [_thumbnail(np.asarray(image)) for image in pixels]
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, h in enumerate(hashes):
        if i in found:
            continue
        candidates = set()
        for band in range(BANDS):
            key = (band, (h >> (band * 8)) & 0xFF)
            candidates.update(buckets.get(key, ()))
        best = min(((bin(h ^ hashes[j]).count("1"), j) for j in candidates
                    if np.abs(thumbs[i] - thumbs[j]).mean() <= COLOUR_TOLERANCE), default=None)
        if best is not None and best[0] <= NEAR_DISTANCE:
            found[i] = (best[1], "near", best[0])
            continue
        for band in range(BANDS):
            buckets.setdefault((band, (h >> (band * 8)) & 0xFF), []).append(i)
    return found


def token_overflow(captions: list[str], tokenizer, max_length: int) -> dict[int, tuple[int, int]]:
    """{index: (tokens, tokens lost)} for captions longer than the encoder's limit."""
    from transformers.utils import logging as hf_logging

    out = {}
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the maximum" is what we report
    try:
        for i, caption in enumerate(captions):
            n = len(tokenizer(caption, add_special_tokens=True).input_ids)
            if n > max_length:
                out[i] = (n, n - max_length)
    finally:
        hf_logging.set_verbosity(level)
    return out


def _spread(values) -> dict:
    if not len(values):
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}


def summary(sizes: list[tuple[int, int]], captions: list[str], top: int = 10) -> dict:
    """Image sizes, aspect ratios, caption lengths (words) and the most frequent words."""
    words = Counter(w for c in captions for w in re.findall(r"[\w']+", c.lower()))
    return {
        "width": _spread([w for w, _ in sizes]),
        "height": _spread([h for _, h in sizes]),
        "aspect_ratio": _spread([w / h for w, h in sizes if h]),
        "caption_words": _spread([len(c.split()) for c in captions]),
        "top_words": words.most_common(top),
    }
