"""Reading a team's folder into (image, caption) records, with a reason for every rejection.

Layouts (selected by `data.format`, `auto` picks by what the folder holds):

- `imagefolder`: `metadata.jsonl` or `metadata.csv` files (any sub-folder) with a `file_name`
  column relative to the metadata file and a caption column (`data.caption_column`,
  default: the first of text, caption, prompt) - the `datasets` imagefolder convention.
- `pairs`: `photo.png` + `photo.txt` side by side, in any sub-folder.
- `parquet`: `*.parquet` files (any sub-folder) with an image column holding encoded bytes
  (raw bytes, or the {bytes, path} struct `datasets` writes) and a caption column.
- `save_to_disk`: a folder written by `datasets`' `Dataset.save_to_disk` (or a DatasetDict:
  `data.split` picks the split, default train), same columns as parquet.

For the last two the image bytes are kept in the record and decoded by preparation, where a
bad row is reported like a bad file ("train.parquet:row 12: unreadable or truncated image").
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_COLUMNS = ("text", "caption", "prompt")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass
class Record:
    image: Path  # the image file, or the file holding its bytes (parquet, arrow)
    caption: str
    where: str  # where the record came from, for messages: "metadata.jsonl:12"
    data: bytes | None = None  # encoded image bytes of a table row


@dataclass
class Rejection:
    where: str
    reason: str


@dataclass
class IngestResult:
    records: list[Record] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _metadata_rows(meta: Path):
    if meta.suffix == ".jsonl":
        with open(meta, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, None, f"invalid JSON ({exc.msg})"
                    continue
                yield lineno, row if isinstance(row, dict) else None, (
                    None if isinstance(row, dict) else "row is not a JSON object")
    else:
        with open(meta, encoding="utf-8", newline="") as handle:
            for lineno, row in enumerate(csv.DictReader(handle), 2):
                yield lineno, row, None


def read_imagefolder(root: Path, caption_column: str | None, image_column: str) -> IngestResult:
    result = IngestResult()
    metas = sorted(p for name in METADATA_NAMES for p in root.rglob(name))
    for meta in metas:
        rel_meta = meta.relative_to(root)
        for lineno, row, problem in _metadata_rows(meta):
            where = f"{rel_meta}:{lineno}"
            if problem:
                result.rejected.append(Rejection(where, problem))
                continue
            name = row.get(image_column)
            if not name:
                result.rejected.append(Rejection(where, f"no '{image_column}' value"))
                continue
            column = caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
            caption = row.get(column) if column else None
            image = meta.parent / str(name)
            if Path(str(name)).is_absolute() or not _inside(root, image):
                result.rejected.append(Rejection(where, f"path '{name}' points outside the dataset folder (refused)"))
            elif not image.is_file():
                result.rejected.append(Rejection(where, f"image '{name}' does not exist"))
            elif caption is None or not str(caption).strip():
                wanted = caption_column or "/".join(CAPTION_COLUMNS)
                result.rejected.append(Rejection(where, f"missing or empty caption (column {wanted})"))
            else:
                result.records.append(Record(image, str(caption).strip(), where))
    return result


def read_pairs(root: Path) -> IngestResult:
    result = IngestResult()
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        where = str(image.relative_to(root))
        caption_file = image.with_suffix(".txt")
        if not _inside(root, image) or not _inside(root, caption_file):
            result.rejected.append(Rejection(where, "a symlink pointing outside the dataset folder (refused)"))
            continue
        if not caption_file.is_file():
            result.rejected.append(Rejection(where, f"missing caption file {caption_file.name}"))
            continue
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            result.rejected.append(Rejection(where, f"caption file {caption_file.name} is not UTF-8"))
            continue
        if not caption:
            result.rejected.append(Rejection(where, f"empty caption in {caption_file.name}"))
            continue
        result.records.append(Record(image, caption, where))
    return result


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def _table_records(rows, source: Path, root: Path, caption_column: str | None,
                   image_column: str | None, result: IngestResult) -> None:
    """Rows of a parquet/arrow table -> records (bytes kept) or rejections."""
    image_column = image_column or "image"
    rel = source.relative_to(root) if source != root else Path(source.name)
    for index, row in enumerate(rows):
        where = f"{rel}:row {index}"
        if image_column not in row:
            raise UserError(f"{source}: no image column '{image_column}' (columns: {', '.join(row)});"
                            " set data.image_column")
        column = caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
        caption = row.get(column) if column else None
        data = _image_bytes(row[image_column])
        if data is None:
            result.rejected.append(Rejection(where, f"no image bytes in column '{image_column}'"))
        elif caption is None or not str(caption).strip():
            wanted = caption_column or "/".join(CAPTION_COLUMNS)
            result.rejected.append(Rejection(where, f"missing or empty caption (column {wanted})"))
        else:
            result.records.append(Record(source, str(caption).strip(), where, data))


def read_parquet(root: Path, caption_column: str | None, image_column: str | None) -> IngestResult:
    import pyarrow.parquet as pq

    result = IngestResult()
    for file in sorted(root.rglob("*.parquet")):
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            result.rejected.append(Rejection(str(file.relative_to(root)), f"unreadable parquet file ({exc})"))
            continue
        _table_records(table.to_pylist(), file, root, caption_column, image_column, result)
    return result


def read_saved_dataset(root: Path, caption_column: str | None, image_column: str | None,
                       split: str = "train") -> IngestResult:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(root))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise UserError(f"{root}: not a readable save_to_disk folder ({exc})") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{root}: no split '{split}' (splits: {', '.join(dataset)}); set data.split")
        dataset = dataset[split]
    table = dataset.with_format("arrow")[:]  # raw arrow: image bytes are not decoded here
    result = IngestResult()
    _table_records(table.to_pylist(), root, root, caption_column, image_column, result)
    return result


def detect_format(root: Path) -> str:
    if (root / "dataset_dict.json").exists() or (root / "state.json").exists():
        return "save_to_disk"
    if any(next(root.rglob(name), None) is not None for name in METADATA_NAMES):
        return "imagefolder"
    if next(root.rglob("*.parquet"), None) is not None:
        return "parquet"
    return "pairs"


def ingest(path: str | Path, fmt: str = "auto", caption_column: str | None = None,
           image_column: str | None = None, split: str = "train") -> IngestResult:
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{path}: dataset folder does not exist")
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "imagefolder":
        return read_imagefolder(root, caption_column, image_column or "file_name")
    if fmt == "pairs":
        return read_pairs(root)
    if fmt == "parquet":
        return read_parquet(root, caption_column, image_column)
    if fmt == "save_to_disk":
        return read_saved_dataset(root, caption_column, image_column, split)
    raise UserError(f"{path}: unknown data format '{fmt}' (auto, imagefolder, pairs, parquet, save_to_disk)")
