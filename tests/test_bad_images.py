"""Real malformed files: each is either converted correctly or skipped with its reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from data_tools.images import ImageProblem, load_rgb
from data_tools.ingest import ingest
from data_tools.prepare import prepare


def _jpeg_bytes(size=(64, 64), colour=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_truncated_jpeg_and_zero_byte_are_rejected(tmp_path):
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:200])
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageProblem, match="truncated"):
        load_rgb(tmp_path / "cut.jpg")
    with pytest.raises(ImageProblem, match="0 bytes"):
        load_rgb(tmp_path / "empty.png")


def test_cmyk_and_16_bit_become_rgb(tmp_path):
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    rgb = np.asarray(load_rgb(tmp_path / "cmyk.jpg"))
    assert rgb.shape == (40, 40, 3) and rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60
    ramp = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)
    deep = Image.fromarray(ramp)
    assert deep.mode.startswith("I;16")
    deep.save(tmp_path / "deep.png")
    grey = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert grey.min() == 0 and grey.max() == 255  # full range kept, not clipped to white


def test_palette_with_transparency_composites_on_white(tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    img.paste(1, (0, 0, 10, 20))  # left half red, right half index 0 (transparent black)
    img.info["transparency"] = 0
    img.save(tmp_path / "pal.png", transparency=0)
    rgb = np.asarray(load_rgb(tmp_path / "pal.png"))
    assert tuple(rgb[5, 2]) == (255, 0, 0)
    assert tuple(rgb[5, 15]) == (255, 255, 255)  # transparent -> white, not black


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (30, 60)


def test_a_run_skips_every_bad_file_with_its_reason(tmp_path, cache_dir):
    files = {"good.jpg": _jpeg_bytes(), "cut.jpg": _jpeg_bytes()[:200], "empty.png": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).with_suffix(".txt").write_text(f"caption of {name}")
    (tmp_path / "orphan.png").write_bytes(_jpeg_bytes())
    found = ingest(tmp_path)
    prepared = prepare(found.records, 32, cache_dir)
    reasons = {r.where: r.reason for r in found.rejected + prepared.rejected}
    assert prepared.captions == ["caption of good.jpg"]
    assert set(reasons) == {"cut.jpg", "empty.png", "orphan.png"}
    assert "missing caption file" in reasons["orphan.png"]


def test_too_small_policy(tmp_path, cache_dir):
    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    (tmp_path / "small.txt").write_text("tiny")
    found = ingest(tmp_path)
    assert len(prepare(found.records, 32, cache_dir, too_small="upscale").captions) == 1
    skipped = prepare(found.records, 32, cache_dir, too_small="skip")
    assert skipped.captions == [] and "too small (16x16)" in skipped.rejected[0].reason
