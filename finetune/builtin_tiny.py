"""Ship a pretrained tiny cascade as `builtin:tiny`: fp16 copy, evaluation, model card.

    finetune run recipes/pretrain-tiny.yaml                 # full-parameter pretraining, both stages
    finetune run recipes/pretrain-tiny-vpred.yaml           # stage I from random weights (takes stage II from above)
    finetune run recipes/pretrain-tiny-count.yaml           # the shipped stage I: continues the one above
    python -m finetune.builtin_tiny export runs/pretrain-tiny-count [--to finetune/builtin/tiny]

A run whose `cascade.path` is another finished run's `cascade/` continues that run, and a run
may take a stage it does not train from a finished run (`cascade.stage_paths`, as
recipes/pretrain-tiny-vpred.yaml takes stage II); the card lists every run that led to the
weights (each run's time and resolved recipe).

`export` copies the run's `cascade/` (whole IF pipeline folders) with every weight stored in
fp16 (halves the package; the pipelines load them into fp32 on CPU), then judges the fp16
cascade on held-out prompts of the general split (which it was trained on) and of the domain
split (which it never saw) and writes the numbers into the model card `README.md`.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from .atomic import atomic_dir
from .cascade import SHIPPED_DIR, Cascade
from .errors import UserError

EVAL_SETS = {"general": "synth:general?n=96&seed=7", "domain": "synth:domain?n=96&seed=7"}


def to_fp16(folder: Path) -> None:
    """Rewrite every safetensors file under `folder` with floating tensors in fp16."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in folder.rglob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            meta = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(file), metadata=meta)


def _recipe(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "resolved_recipe.yaml").read_text())


def _finished_run_of(location: str) -> Path | None:
    """The finished run whose cascade/ (or one of its stage folders) `location` names."""
    path = Path(location)
    for folder in (path, path.parent):
        if folder.name == "cascade" and (folder.parent / "finished.json").exists():
            return folder.parent
    return None


def source_runs(run: Path) -> list[Path]:
    """The finished runs whose weights `run` started from: its cascade.path or a
    cascade.stage_paths entry names their cascade/ folder."""
    spec = _recipe(run).get("cascade", {})
    found = [_finished_run_of(loc) for loc in [spec.get("path") or "", *(spec.get("stage_paths") or {}).values()]]
    return list(dict.fromkeys(r for r in found if r is not None))


def run_chain(run: Path, _depth: int = 0) -> list[Path]:
    """The pretraining runs that led to `run`, sources before the runs that continued them:
    a run whose cascade.path (or one stage's cascade.stage_paths) names a finished run's
    cascade/ folder started from that run's weights."""
    chain: list[Path] = []
    if _depth < 16:
        for source in source_runs(run):
            chain += [r for r in run_chain(source, _depth + 1) if r not in chain]
    return chain + [run]


def untrained_stages(run: Path) -> dict[str, Path]:
    """Stage folders the run did not train but ships: those its recipe took from a finished
    run. A stage the run neither trained nor took from one would be random weights."""
    spec = _recipe(run).get("cascade", {})
    cascade = Cascade.from_spec(spec.get("path"), spec.get("stage_paths") or {})
    extra = {}
    for stage, folder in cascade.stage_dirs.items():
        if (run / "cascade" / f"stage_{stage}").is_dir():
            continue
        if _finished_run_of(str(folder)) is None:
            raise UserError(f"{run}: stage {stage} was not trained by this run and does not come from"
                            f" a finished pretraining run ({folder}); its weights would be random:"
                            f" train it, or point cascade.stage_paths.{stage} at a finished run's"
                            f" cascade/stage_{stage}")
        extra[stage] = folder
    return extra


def _history(chain: list[Path]) -> tuple[str, str, str]:
    """(how long, the commands, the resolved recipes) of a chain of pretraining runs."""
    import yaml

    seconds, commands, recipes, steps = [], [], [], []
    for run in chain:
        text = (run / "resolved_recipe.yaml").read_text()
        recipe = yaml.safe_load(text)
        seconds.append(json.loads((run / "finished.json").read_text())["seconds"])
        # the kit's pretraining recipes are named after their files (recipes/pretrain-tiny*.yaml)
        commands.append(f"finetune run recipes/{recipe['name']}.yaml")
        recipes.append(f"```yaml\n{text.rstrip()}\n```")
        lr = recipe["optim"]["lr"]
        per_phase = "; ".join(
            (", ".join(f"stage {k} {v}" for k, v in p["steps"].items()) if isinstance(p["steps"], dict)
             else f"{p['steps']} per stage") + " steps" for p in recipe["phases"])
        steps.append(f"`{recipe['name']}` ({seconds[-1]:.0f} s: {per_phase}, lr {lr['start']:g}"
                     f" decaying to {lr['end']:g} every {lr['decay_every']} steps)")
    commands.append(f"python -m finetune.builtin_tiny export {chain[-1]}")
    how = f"{sum(seconds):.0f} s in total, in {len(chain)} run(s): " + ", then ".join(steps)
    return how, "\n".join(commands), "\n\n".join(recipes)


PREDICTS = {"epsilon": "noise", "v_prediction": "velocity (v-prediction)"}


def unet_summary(stage_dir: Path) -> str:
    """'UNet of 2.2M parameters, attention at 8 and 4px, predicts noise' from a saved stage
    folder (its scheduler says what the UNet predicts)."""
    from safetensors import safe_open

    config = json.loads((stage_dir / "unet" / "config.json").read_text())
    count = 0
    for file in (stage_dir / "unet").glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            count += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    prediction = json.loads((stage_dir / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    predicts = f"predicts {PREDICTS.get(prediction, prediction)}"
    size = config["sample_size"]
    grids = [size // 2 ** level for level, kind in enumerate(config["down_block_types"]) if "Attn" in kind]
    if not grids:
        return f"UNet of {count / 1e6:.1f}M parameters, no attention, {predicts}"
    names = [str(g) for g in grids]
    where = ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]
    return f"UNet of {count / 1e6:.1f}M parameters, attention at {where}px, {predicts}"


def card(run: Path, target: Path, scores: dict, settings: dict, untrained: dict[str, Path]) -> str:
    """The model card; `untrained` is untrained_stages(run), computed once by export."""
    how_long, commands, recipes = _history(run_chain(run))
    origin = {stage.name.removeprefix("stage_"): run.name for stage in sorted((run / "cascade").glob("stage_*"))}
    origin.update({stage: _finished_run_of(str(folder)).name for stage, folder in untrained.items()})
    shipped_from = ", ".join(f"stage {stage} from `{name}`" for stage, name in sorted(origin.items()))
    rows = []
    for label, by_set in scores.items():
        for name, spec in EVAL_SETS.items():
            r = by_set[name]
            rows.append(f"| {label} | {name} (`{spec}`) | " + " | ".join(
                f"{r[a]:.1%}" for a in ("colour", "shape", "count", "position", "overall")) + " |")
    size = sum(f.stat().st_size for f in target.rglob("*.safetensors"))
    return f"""---
license: apache-2.0
library_name: diffusers
pipeline_tag: text-to-image
tags: [deepfloyd-if, tiny, synthetic, cascade-adaptation-kit]
---
# builtin:tiny, a tiny pretrained IF-layout cascade

A two-stage DeepFloyd-IF-layout cascade small enough to train and sample on a laptop CPU, made
so the kit's quickstart adapts a *real pretrained* model with no downloads.

- **stage_I**: `IFPipeline`, text to 32x32 pixels, {unet_summary(target / "stage_I")}.
- **stage_II**: `IFSuperResolutionPipeline`, 32 to 64 pixels with noise-conditioning
  augmentation, {unet_summary(target / "stage_II")}.
- **text encoder**: a 2-layer `T5EncoderModel` (d_model 32) with random, frozen weights and
  the kit's own `T5Tokenizer` (finetune/tiny_tokenizer.py); the UNets learn to read it.

## How it was made

Full-parameter training of both UNets on the synthetic world's **general** split (shapes
circle/square/triangle; colours red/green/blue/yellow; 1-3 objects; nine positions), from
random weights, on this kit's own trainer, on a 2-core CPU: {how_long}.
The shipped weights are {shipped_from}.
Weights are the EMA of training (decay in the recipe), stored in fp16 ({size / 1e6:.1f} MB).

```bash
{commands}
```

## How good it is

Judge accuracy (data_tools/judge.py, classical image analysis) on held-out prompts, of stage
I's 32px output alone and of the whole cascade's 64px output (stage I {settings['steps']} steps,
stage II {settings['steps_II']} steps, guidance {settings['guidance_scale']}). The domain split's
shapes (star, cross) and colour (purple) were never seen: low scores there are what adaptation
is for.

Honest limits: the base is weak. Stage II, trained for the few steps above, adds pixel noise
and colour shifts that cost the judge colour and count accuracy at 64px; stage I alone is the
better-judged output, which is why the quickstart judges stage I (`eval.stages: [I]`).
docs/quickstart.md says what more pretraining gave. Sample it at low guidance (the quickstart
uses 1.5): at higher scales it draws extra objects for "two" and "three" prompts, so count
and overall fall (docs/quickstart.md, session 8, measures guidance 1 to 8).

| sampled through | prompts | colour | shape | count | position | overall |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Chance: colour 1/6, shape 1/5, position 1/9.

## Recipes

{recipes}
"""


def export(run: Path, target: Path) -> dict:
    from .evaluate import evaluate_variants, load_prompt_set
    from .recipe.schema import EvalSpec, SampleSpec
    from .sampling import CascadeVariant

    source = run / "cascade"
    if not (run / "finished.json").exists() or not (source / "stage_I").is_dir():
        raise UserError(f"{run}: not a finished full-parameter run (no finished.json or cascade/stage_I)")
    extra = untrained_stages(run)
    with atomic_dir(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("finetune.json"))
        for stage, folder in extra.items():
            shutil.copytree(folder, tmp / f"stage_{stage}", ignore=shutil.ignore_patterns("finetune.json"))
        to_fp16(tmp)
    sample = SampleSpec(steps=30, steps_II=50, batch_size=32)
    prompt_sets = {name: load_prompt_set(spec) for name, spec in EVAL_SETS.items()}
    cascade = Cascade.from_spec(str(target))
    scores = {}
    for label, stages in (("stage I (32px)", ["I"]), ("cascade (64px)", ["I", "II"])):
        spec = EvalSpec(sample=sample, stages=stages, metrics=["judge"])
        result = evaluate_variants(cascade, [CascadeVariant("trained")], prompt_sets, spec,
                                   run / "export" / label.split()[0])
        scores[label] = {name: r["trained"] for name, r in result.items()}
    (target / "README.md").write_text(card(run, target, scores, sample.model_dump(), extra))
    (target / "eval.json").write_text(json.dumps({"results": scores, "prompt_sets": EVAL_SETS,
                                                  "sample": sample.model_dump()}, indent=2))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.builtin_tiny", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("export", help="fp16 copy of a pretraining run's cascade + model card")
    cmd.add_argument("run", type=Path)
    cmd.add_argument("--to", type=Path, default=SHIPPED_DIR / "tiny")
    args = parser.parse_args(argv)
    try:
        scores = export(args.run, args.to)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(scores, indent=2))
    print(f"written: {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
