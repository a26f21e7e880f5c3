"""finetune-data inspect on a messy folder; parquet and save_to_disk layouts; duplicates,
long captions, statistics and the validation split."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as data_main
from finetune.phase_data import in_validation, load_phase_data
from finetune.recipe.schema import DataSpec


def _png(colour, size=(96, 72), shape=True) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 235))
    if shape:
        from PIL import ImageDraw

        ImageDraw.Draw(img).ellipse([8, 8, 40, 40], fill=colour)
    return img


def _bytes(img: Image.Image, fmt="PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def messy_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 160, 40)]):
        _png(colour).save(root / f"ok{i}.png")
        rows.append({"file_name": f"ok{i}.png", "text": f"a shape number {i}"})
    _png((200, 30, 30)).save(root / "copy.png")                     # exact duplicate of ok0
    _png((200, 30, 30)).save(root / "recoded.jpg", quality=95)      # near duplicate of ok0
    (root / "truncated.jpg").write_bytes(_bytes(_png((1, 2, 3)), "JPEG")[:200])
    (root / "empty.png").write_bytes(b"")
    _png((9, 9, 9), size=(16, 16)).save(root / "tiny.png")
    _png((240, 200, 20)).rotate(180).save(root / "long.png")
    rows += [{"file_name": "copy.png", "text": "a copy"},
             {"file_name": "recoded.jpg", "text": "a re-encoded copy"},
             {"file_name": "truncated.jpg", "text": "broken"},
             {"file_name": "empty.png", "text": "nothing"},
             {"file_name": "tiny.png", "text": "too small"},
             {"file_name": "ok1.png", "text": " "},
             {"file_name": "long.png", "text": "word " * 120},
             {"file_name": "../outside.png", "text": "escape"},
             {"file_name": "gone.png", "text": "missing"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_inspect_messy_folder_lists_every_reason_and_statistics(tmp_path, capsys):
    folder = messy_folder(tmp_path / "messy")
    assert data_main(["inspect", str(folder), "--too-small", "skip", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    reasons = {r["where"]: r["reason"] for r in report["skipped_samples"]}
    assert "exact duplicate of metadata.jsonl:1" in reasons["metadata.jsonl:4"]
    assert "unreadable or truncated" in reasons["metadata.jsonl:6"]
    assert "empty file" in reasons["metadata.jsonl:7"]
    assert "too small (16x16)" in reasons["metadata.jsonl:8"]
    assert "missing or empty caption" in reasons["metadata.jsonl:9"]
    assert "outside the dataset folder" in reasons["metadata.jsonl:11"]
    assert "does not exist" in reasons["metadata.jsonl:12"]
    warnings = {w["where"]: w["warning"] for w in report["warnings"]}
    assert "near-duplicate of metadata.jsonl:1" in warnings["metadata.jsonl:5"]
    assert "tokens lost" not in warnings["metadata.jsonl:10"] and "lost" in warnings["metadata.jsonl:10"]
    assert report["usable"] == 5  # ok0-2, recoded (near duplicates are kept by default), long
    stats = report["stats"]
    assert stats["width"]["max"] == 96 and stats["aspect_ratio"]["median"] == pytest.approx(96 / 72)
    assert dict(stats["top_words"])["word"] == 120

    assert data_main(["inspect", str(folder), "--too-small", "skip"]) == 0
    table = capsys.readouterr().out
    assert "skipped" in table and "reason" in table and "most frequent words" in table
    assert data_main(["inspect", str(folder), "--dedupe", "near", "--json"]) == 0
    reasons = {r["where"]: r["reason"] for r in json.loads(capsys.readouterr().out)["skipped_samples"]}
    assert "near-duplicate" in reasons["metadata.jsonl:5"]


def _table_rows(n=4):
    return [{"image": {"bytes": _bytes(_png((20 * i, 60, 200 - 20 * i))), "path": None},
             "text": f"picture {i}"} for i in range(n)] + [
        {"image": {"bytes": b"not an image", "path": None}, "text": "bad bytes"},
        {"image": {"bytes": _bytes(_png((1, 1, 1))), "path": None}, "text": ""}]


def test_parquet_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq" / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_table_rows()), tmp_path / "pq" / "sub" / "train.parquet")
    data = load_phase_data(DataSpec(path=str(tmp_path / "pq")), [32], tmp_path / "cache", "data")
    assert data.captions == [f"picture {i}" for i in range(4)]
    assert data.pixels[32].shape == (4, 3, 32, 32)
    reasons = {r.where: r.reason for r in data.rejected}
    assert "unreadable" in reasons["sub/train.parquet:row 4"]
    assert "missing or empty caption" in reasons["sub/train.parquet:row 5"]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, Value

    features = Features({"image": ImageFeature(), "caption": Value("string")})
    rows = [{"image": r["image"], "caption": r["text"]} for r in _table_rows()]
    Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    data = load_phase_data(DataSpec(path=str(tmp_path / "ds")), [32], None, "data")
    assert len(data.captions) == 4 and len(data.rejected) == 2
    DatasetDict({"train": Dataset.from_list(rows[:2], features=features)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_phase_data(DataSpec(path=str(tmp_path / "dd")), [32], None, "d").captions) == 2
    from finetune.errors import UserError

    with pytest.raises(UserError, match="no split 'valid'"):
        load_phase_data(DataSpec(path=str(tmp_path / "dd"), split="valid"), [32], None, "d")


def test_validation_split_is_deterministic_and_stable(tmp_path):
    from data_tools.synth import write_split

    folder = write_split(tmp_path / "g", "general", n=60, size=32, seed=3)
    spec = DataSpec(path=str(folder), validation_fraction=0.25)
    a = load_phase_data(spec, [32], None, "d")
    b = load_phase_data(spec, [32], None, "d")
    assert a.validation.wheres == b.validation.wheres and 5 <= len(a.validation.captions) <= 25
    assert not set(a.wheres) & set(a.validation.wheres)
    # stable: a sample's side of the split depends only on where it comes from
    assert all(in_validation(w, 0.25) for w in a.validation.wheres)
    assert in_validation("x", 0.0) is False


def test_near_duplicate_hash_tolerates_reencoding_but_not_other_images():
    from data_tools.analysis import find_duplicates

    base = np.asarray(_png((200, 30, 30), size=(64, 64)))
    recoded = np.asarray(Image.open(io.BytesIO(_bytes(Image.fromarray(base), "JPEG"))))
    other = np.asarray(_png((30, 30, 200), size=(64, 64)).rotate(90))
    blank = np.asarray(_png((0, 0, 0), size=(64, 64), shape=False))
    found = find_duplicates(np.stack([base, recoded, base, other, blank]).transpose(0, 3, 1, 2))
    assert found[2] == (0, "exact", 0)
    assert found[1][:2] == (0, "near")
    assert 3 not in found and 4 not in found
