"""Reading the folder layouts people use, and turning images into training pixels."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from data_tools.images import load_rgb, resize_center_crop
from data_tools.ingest import ingest
from data_tools.prepare import prepare


def _img(path, size=(80, 40), colour=(200, 10, 10), mode="RGB"):
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def test_imagefolder_jsonl_and_csv(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    _img(tmp_path / "sub" / "b.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a red box"}) + "\n"
        + json.dumps({"file_name": "missing.png", "text": "x"}) + "\n"
        + json.dumps({"file_name": "../etc/passwd", "text": "x"}) + "\n")
    (tmp_path / "sub" / "metadata.csv").write_text("file_name,caption\nb.png,a csv caption\nb.png,\n")
    found = ingest(tmp_path)
    assert sorted(r.caption for r in found.records) == ["a csv caption", "a red box"]
    reasons = {r.where: r.reason for r in found.rejected}
    assert "does not exist" in reasons["metadata.jsonl:2"]
    assert "outside the dataset folder" in reasons["metadata.jsonl:3"]
    assert "empty caption" in reasons["sub/metadata.csv:3"]


def test_pairs_layout(tmp_path):
    _img(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a caption\n")
    _img(tmp_path / "y.jpg")
    found = ingest(tmp_path)
    assert [r.caption for r in found.records] == ["a caption"]
    assert "missing caption file" in found.rejected[0].reason


def test_rgb_conversion_and_centre_crop(tmp_path):
    grey = _img(tmp_path / "g.png", mode="L")
    img = load_rgb(grey)
    assert img.mode == "RGB"
    wide = Image.new("RGB", (90, 30), (0, 0, 0))
    wide.paste((255, 255, 255), (30, 0, 60, 30))  # white centre third
    out = np.asarray(resize_center_crop(wide, 16))
    assert out.shape == (16, 16, 3) and out.mean() > 240  # only the centre survives


def test_prepare_skips_bad_files_and_caches(tmp_path, cache_dir):
    _img(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("broken")
    found = ingest(tmp_path)
    first = prepare(found.records, 32, cache_dir)
    assert first.pixels.shape == (1, 3, 32, 32) and first.captions == ["fine"]
    assert first.rejected[0].where == "broken.png"
    second = prepare(found.records, 32, cache_dir)
    assert second.from_cache and second.pixels.equal(first.pixels)
    # the same memory layout too: convolutions on a channels-last input sum in another order,
    # so a first (cold) run would not reproduce later (cached) runs
    assert first.pixels.stride() == second.pixels.stride() and first.pixels.is_contiguous()
