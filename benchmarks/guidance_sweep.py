"""Judge accuracy of a cascade and of finished runs' adapters at several guidance scales.

Every scale samples the same prompts with the same seeds as a run's report (stage I only,
like the quickstart's evaluation), so the rows differ only by the guidance scale. Prints one
row per (variant, scale): colour / shape / count / position / overall, per prompt set.

    python benchmarks/guidance_sweep.py builtin:tiny --runs runs/quickstart --guidance 1,1.5,2,3,4,8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ATTRIBUTES = ("colour", "shape", "count", "position")


def sweep(cascade_spec: str, runs: list[Path], scales: list[float], prompt_specs: dict[str, str],
          steps: int = 20, batch_size: int = 32) -> list[dict]:
    """[{variant, guidance, set, scores}] for the base cascade and each run's adapters."""
    from finetune.cascade import Cascade
    from finetune.evaluate import judge_images, load_prompt_set
    from finetune.publish import run_adapters
    from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings

    cascade = Cascade.from_spec(cascade_spec)
    prompt_sets = {name: load_prompt_set(spec) for name, spec in prompt_specs.items()}
    variants = [CascadeVariant("base")] + [CascadeVariant(str(run), adapters=run_adapters(run)) for run in runs]
    rows = []
    for variant in variants:
        sampler = CascadeSampler(cascade, variant, stages=["I"])
        for scale in scales:
            settings = SampleSettings(steps=steps, batch_size=batch_size, guidance_scale=scale)
            for name, prompts in prompt_sets.items():
                images = sampler.generate([p.text for p in prompts], settings)
                rows.append({"variant": variant.name, "guidance": scale, "set": name,
                             "scores": judge_images(images, prompts)})
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
    parser.add_argument("--steps", type=int, default=20, help="stage I sampling steps")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    specs = {name: f"synth:{name}?n={args.n}&seed=7" for name in ("domain", "general")}
    runs = [Path(r) for r in args.runs.split(",") if r]
    rows = sweep(args.cascade, runs, [float(g) for g in args.guidance.split(",")], specs, args.steps)
    print("| variant | guidance | prompts | colour / shape / count / position | overall |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))
    if args.json:
        from finetune import atomic

        atomic.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
