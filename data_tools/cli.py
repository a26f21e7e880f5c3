"""`finetune-data` command line.

    finetune-data inspect PATH [--json]            what a run would train on, and what it would skip
    finetune-data synth OUT --split general -n 256 write a synthetic benchmark split
                      [--style S] [--background B] [--plural P]
    finetune-data judge FOLDER [--json]            judge accuracy of images against their truth
"""
from __future__ import annotations

import argparse
import json
import sys

from finetune.errors import UserError


def cmd_inspect(args) -> int:
    from finetune.phase_data import load_phase_data
    from finetune.recipe.schema import DataSpec
    from finetune.text_cache import MAX_LENGTH

    from .analysis import token_overflow

    spec = DataSpec(path=args.path, format=args.format, caption_column=args.caption_column,
                    image_column=args.image_column, split=args.split, too_small=args.too_small,
                    dedupe=args.dedupe)
    data = load_phase_data(spec, [args.resolution], None, args.path, enforce=False)
    tokenizer, source = _tokenizer(args.cascade)
    for i, (tokens, lost) in token_overflow(data.captions, tokenizer, MAX_LENGTH).items():
        data.warnings.append({"where": data.wheres[i], "warning": (
            f"caption has {tokens} tokens ({source}), the text encoder reads {MAX_LENGTH}: {lost} lost")})
    report = dict(data.report(), resolution=args.resolution, tokenizer=source)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.path}: {report['usable']} usable, {report['skipped']} skipped, "
          f"{len(report['warnings'])} warning(s) (at {args.resolution}px)")
    if report["skipped_samples"]:
        print(_table(["skipped", "reason"], [[r["where"], r["reason"]] for r in report["skipped_samples"]]))
    if report["warnings"]:
        print(_table(["used, but", "warning"], [[w["where"], w["warning"]] for w in report["warnings"]]))
    stats = report["stats"]
    if stats:
        rows = [[name, f"{v['min']:.3g}", f"{v['median']:.3g}", f"{v['max']:.3g}"]
                for name, v in stats.items() if isinstance(v, dict) and v]
        print(_table(["statistic", "min", "median", "max"], rows))
        print("most frequent words: " + ", ".join(f"{w} ({n})" for w, n in stats["top_words"]))
    return 0


def _tokenizer(cascade: str | None):
    if cascade:
        from finetune.cascade import Cascade

        return Cascade.from_spec(cascade).load_tokenizer(), f"tokenizer of {cascade}"
    from finetune.tiny_tokenizer import build_tokenizer

    return build_tokenizer(), "the kit's tiny tokenizer; pass --cascade for yours"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_synth(args) -> int:
    from .synth import write_prompt_set, write_split

    out = write_split(args.out, args.split, args.n, args.size, args.seed, args.style, args.background,
                      args.plural)
    print(f"wrote {args.n} images of split '{args.split}' to {out}")
    if args.heldout:
        target = write_prompt_set(args.heldout, args.split, args.heldout_n, args.seed,
                                  args.style, args.background, args.plural)
        print(f"wrote {args.heldout_n} held-out prompts with ground truth to {target} "
              f"(eval.prompt_sets: {{{args.split}: {target}}})")
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
    ins.add_argument("--format", default="auto", choices=["auto", "imagefolder", "pairs", "parquet", "save_to_disk"])
    ins.add_argument("--caption-column", default=None)
    ins.add_argument("--image-column", default=None)
    ins.add_argument("--split", default="train", help="split of a saved DatasetDict")
    ins.add_argument("--resolution", type=int, default=64, help="the stage resolution to check against")
    ins.add_argument("--too-small", default="upscale", choices=["upscale", "skip"])
    ins.add_argument("--dedupe", default="exact", choices=["off", "exact", "near"])
    ins.add_argument("--cascade", default=None, help="cascade whose tokenizer counts caption tokens")
    ins.add_argument("--json", action="store_true", help="the report as JSON")
    syn = sub.add_parser("synth", help="write a synthetic benchmark split")
    syn.add_argument("out")
    syn.add_argument("--split", default="general")
    syn.add_argument("-n", type=int, default=256)
    syn.add_argument("--size", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--style", default=None, help="flat or outline (default: the split's own)")
    syn.add_argument("--background", default=None,
                     help="plain, white, black or gradient (default: the split's own)")
    syn.add_argument("--plural", type=float, default=None,
                     help="share of images with two or three objects (default 0.4)")
    syn.add_argument("--heldout", metavar="FILE.jsonl", help="also write held-out prompts with their ground truth")
    syn.add_argument("--heldout-n", type=int, default=64)
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
