"""Decoding images the way cameras and editors actually write them, into plain RGB.

Every function raises `ImageProblem` with a reason a user can act on; callers turn that into
a skipped sample (or a failure, by policy), never a crash.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # refuse decompression bombs beyond 400 MP


class ImageProblem(Exception):
    """Why an image cannot be used."""


SUPPORTED_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L",
                   "I", "F", "LAB", "HSV"}


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode not in SUPPORTED_MODES:
        raise ImageProblem(f"unsupported image mode {mode}")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the actual range to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA"):
        # Composite transparency onto white: black "invisible" pixels would teach the model
        # dark halos.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path) -> Image.Image:
    """Open, fully decode, apply the EXIF orientation and convert to RGB."""
    try:
        with Image.open(path) as img:
            img.load()  # decodes the whole file: truncated files fail here, not mid-run
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageProblem(f"image too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        size = path.stat().st_size if hasattr(path, "stat") else len(path.getbuffer()) \
            if hasattr(path, "getbuffer") else None
        if size == 0:
            raise ImageProblem("empty file (0 bytes)") from None
        raise ImageProblem(f"unreadable or truncated image ({exc})") from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (aspect ratio kept), then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))
