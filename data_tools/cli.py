"""`finetune-data` command line.

    finetune-data inspect PATH [--json]            what a run would train on, and what it would skip
    finetune-data synth OUT --split general -n 256 write a synthetic benchmark split
    finetune-data judge FOLDER [--json]            judge accuracy of images against their truth
"""
from __future__ import annotations

import argparse
import json
import sys

from finetune.errors import UserError


def cmd_inspect(args) -> int:
    from .ingest import ingest
    from .prepare import prepare

    found = ingest(args.path, args.format, args.caption_column)
    prepared = prepare(found.records, args.resolution, cache_dir=None)
    rejected = found.rejected + prepared.rejected
    report = {"path": args.path, "listed": len(found.records) + len(found.rejected),
              "usable": len(prepared.captions), "skipped": len(rejected),
              "skipped_samples": [{"where": r.where, "reason": r.reason} for r in rejected]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.path}: {report['usable']} usable, {report['skipped']} skipped")
        for r in rejected:
            print(f"  skip {r.where}: {r.reason}")
    return 0


def cmd_synth(args) -> int:
    from .synth import write_split

    out = write_split(args.out, args.split, args.n, args.size, args.seed)
    print(f"wrote {args.n} images of split '{args.split}' to {out}")
    return 0


def cmd_judge(args) -> int:
    import json as _json
    from pathlib import Path

    from PIL import Image

    from .judge import accuracy

    folder = Path(args.folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"{folder}: no metadata.jsonl with ground truth ('truth' per row, as synth writes)")
    rows = [_json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "truth" in r]
    if not rows:
        raise UserError(f"{meta}: no row carries a 'truth' object to judge against")
    images = [Image.open(folder / r["file_name"]).convert("RGB") for r in rows]
    scores = accuracy(images, [r["truth"] for r in rows])
    print(_json.dumps(scores, indent=2) if args.json else
          "  ".join(f"{k} {v:.1%}" for k, v in scores.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-data")
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="check a dataset folder")
    ins.add_argument("path")
    ins.add_argument("--format", default="auto", choices=["auto", "imagefolder", "pairs"])
    ins.add_argument("--caption-column", default=None)
    ins.add_argument("--resolution", type=int, default=64)
    ins.add_argument("--json", action="store_true")
    syn = sub.add_parser("synth", help="write a synthetic benchmark split")
    syn.add_argument("out")
    syn.add_argument("--split", default="general")
    syn.add_argument("-n", type=int, default=256)
    syn.add_argument("--size", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    jud = sub.add_parser("judge", help="score images against their ground truth (metadata.jsonl)")
    jud.add_argument("folder")
    jud.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        return {"inspect": cmd_inspect, "synth": cmd_synth, "judge": cmd_judge}[args.command](args)
    except UserError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
