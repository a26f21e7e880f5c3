"""Judge accuracy of a cascade and of finished runs' adapters at several guidance scales.

Every scale samples the same prompts with the same seeds as a run's report (stage I only,
like the quickstart's evaluation), so the rows differ only by the guidance scale. Prints one
row per (variant, scale): colour / shape / count / position / overall, per prompt set.

    python benchmarks/guidance_sweep.py builtin:tiny --runs runs/quickstart --guidance 1,1.5,2,3,4,8

`--by-count` also scores the one-, two- and three-object prompts apart and says how many
objects the judge saw for each count asked (where a count goes wrong, and which way).
`--adapters` takes stage I adapter folders directly (e.g. a phase's `ema/` weights);
`--n 256 --seed 11` is the larger held-out set used to compare recipes (docs/quickstart.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ATTRIBUTES = ("colour", "shape", "count", "position")


def subsets(prompts: list, by_count: bool) -> dict[str, list[int]]:
    """Indices of the prompts each row scores: all of them, then (by_count) each object count."""
    groups = {"": list(range(len(prompts)))}
    if by_count:
        for count in sorted({p.truth["count"] for p in prompts if p.truth}):
            groups[f" x{count}"] = [i for i, p in enumerate(prompts) if p.truth and p.truth["count"] == count]
    return groups


def counts_seen(images, prompts) -> dict[int, dict[int, int]]:
    """{count asked: {count the judge saw: prompts}}."""
    from data_tools.judge import analyse

    seen: dict[int, dict[int, int]] = {}
    for image, prompt in zip(images, prompts):
        if prompt.truth:
            row = seen.setdefault(prompt.truth["count"], {})
            found = analyse(image)["count"]
            row[found] = row.get(found, 0) + 1
    return seen


def sweep(cascade_spec: str, runs: list[Path], scales: list[float], prompt_specs: dict[str, str],
          steps: int = 20, batch_size: int = 32, adapters: list[Path] = (), by_count: bool = False) -> list[dict]:
    """[{variant, guidance, set, scores}] for the base cascade, each run's adapters and each
    stage I adapter folder; with by_count, per-count rows too and a seen_counts entry."""
    from finetune.cascade import Cascade
    from finetune.evaluate import judge_images, load_prompt_set
    from finetune.publish import run_adapters
    from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings

    cascade = Cascade.from_spec(cascade_spec)
    prompt_sets = {name: load_prompt_set(spec) for name, spec in prompt_specs.items()}
    groups = {name: subsets(prompts, by_count) for name, prompts in prompt_sets.items()}
    variants = ([CascadeVariant("base")] + [CascadeVariant(str(run), adapters=run_adapters(run)) for run in runs]
                + [CascadeVariant(str(folder), adapters={"I": folder}) for folder in adapters])
    rows = []
    for variant in variants:
        sampler = CascadeSampler(cascade, variant, stages=["I"])
        for scale in scales:
            settings = SampleSettings(steps=steps, batch_size=batch_size, guidance_scale=scale)
            for name, prompts in prompt_sets.items():
                images = sampler.generate([p.text for p in prompts], settings)
                for suffix, picked in groups[name].items():
                    rows.append({"variant": variant.name, "guidance": scale, "set": name + suffix,
                                 "scores": judge_images([images[i] for i in picked], [prompts[i] for i in picked])})
                    if by_count and not suffix:  # the whole set's row
                        rows[-1]["seen_counts"] = counts_seen(images, prompts)
    return rows


def format_row(row: dict) -> str:
    scores = row["scores"]
    cells = " / ".join(f"{100 * scores[a]:.0f}" if a in scores else "-" for a in ATTRIBUTES)
    return f"| {row['variant']} | {row['guidance']:g} | {row['set']} | {cells} | {100 * scores['overall']:.1f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cascade", help="cascade folder or builtin:NAME")
    parser.add_argument("--runs", default="", help="comma-separated finished LoRA runs (their adapters)")
    parser.add_argument("--guidance", default="1,1.5,2,3,4,8", help="comma-separated scales")
    parser.add_argument("--n", type=int, default=64, help="prompts per set")
    parser.add_argument("--seed", type=int, default=7, help="prompt set seed (the quickstart's eval uses 7)")
    parser.add_argument("--adapters", default="", help="comma-separated stage I adapter folders")
    parser.add_argument("--by-count", action="store_true", help="score each object count apart too")
    parser.add_argument("--steps", type=int, default=20, help="stage I sampling steps")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    from finetune.adapters import WEIGHT_NAME

    specs = {name: f"synth:{name}?n={args.n}&seed={args.seed}" for name in ("domain", "general")}
    runs = [Path(r) for r in args.runs.split(",") if r]
    adapters = [Path(a) for a in args.adapters.split(",") if a]
    for folder in adapters:
        if not (folder / WEIGHT_NAME).is_file():
            parser.error(f"--adapters: {folder} holds no {WEIGHT_NAME}; give a stage I adapter folder")
    rows = sweep(args.cascade, runs, [float(g) for g in args.guidance.split(",")], specs, args.steps,
                 adapters=adapters, by_count=args.by_count)
    print("| variant | guidance | prompts | colour / shape / count / position | overall |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))
    for row in rows:
        if "seen_counts" in row:
            asked = "; ".join(f"{count} -> " + ", ".join(f"{seen}: {n}" for seen, n in sorted(found.items()))
                              for count, found in sorted(row["seen_counts"].items()))
            print(f"objects seen ({row['variant']}, guidance {row['guidance']:g}, {row['set']}): {asked}")
    if args.json:
        from finetune import atomic

        atomic.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
