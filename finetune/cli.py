"""`finetune` command line.

    finetune validate RECIPE [--set key.path=value ...]   check a recipe, write nothing
    finetune plan RECIPE                                  parameters per stage, data counts
    finetune run RECIPE [--resume] [--overwrite]          train; `accelerate launch -m finetune run ...` for many processes
    finetune sample [RUN | --cascade PATH] --prompt P --out DIR   sample the whole cascade
    finetune eval RUN [--prompts NAME=SPEC]               base vs adapted on held-out prompts
    finetune publish RUN [--out DIR] [--push REPO_ID]     hub-ready folder with model card
    finetune merge RUN --out DIR                          adapters fused into a full cascade

Exit codes: 0 success, 2 user error (one line per problem, no traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .errors import UserError
from .guards import Stopped
from .recipe.schema import SampleSpec

# `finetune sample` flag -> eval.sample key
SAMPLE_KEYS = {"steps": "steps", "steps-II": "steps_II", "guidance": "guidance_scale",
               "adapter-scale": "adapter_scale", "seed": "seed", "batch-size": "batch_size",
               "noise-level": "noise_level"}
SAMPLE_DEFAULTS = SampleSpec().model_dump()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("validate", "check a recipe and its files; writes nothing"),
                            ("plan", "print parameter counts per stage and data counts"),
                            ("run", "run a recipe: train, checkpoint, save adapters")]:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("recipe", help="recipe YAML file, e.g. recipes/quickstart.yaml")
        cmd.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY.PATH=VALUE", help="override a recipe key (repeatable)")
        if name == "run":
            cmd.add_argument("--resume", action="store_true", help="continue the run in output_dir")
            cmd.add_argument("--overwrite", action="store_true",
                             help="delete an existing run in output_dir and start again")
    sample = sub.add_parser("sample", help="generate through the whole cascade (PNGs and a grid)")
    sample.add_argument("run", nargs="?", help="a finished run directory (its cascade and adapters)")
    sample.add_argument("--cascade", help="a cascade folder or builtin:NAME instead of a run (base model)")
    sample.add_argument("--base", action="store_true", help="with a run: ignore its adapters (before adaptation)")
    sample.add_argument("--student", action="store_true", help="with a run: its distilled students replace the stages they were made for")
    group = sample.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help="prompt file (.txt one per line, .jsonl) or synth:SPLIT?n=..")
    sample.add_argument("--out", required=True, help="folder for the PNGs and grid.png")
    sample.add_argument("--num", type=int, default=1, help="images per prompt")
    # Unset flags fall back to the run's eval.sample (how its report was sampled), then to
    # SAMPLE_DEFAULTS: a run sampled by hand looks like the grids in its report.
    for name, kind, text in [("steps", int, "stage I steps"), ("steps-II", int, "stage II steps"),
                             ("guidance", float, "guidance scale"), ("adapter-scale", float, "LoRA scale"),
                             ("seed", int, "seed (image i uses seed and i)"),
                             ("batch-size", int, "prompts per batch"),
                             ("noise-level", int, "stage II noise augmentation")]:
        key = SAMPLE_KEYS[name]
        sample.add_argument(f"--{name}", type=kind, default=None,
                            help=f"{text} (default: the run's eval.sample.{key}, else {SAMPLE_DEFAULTS[key]})")
    sample.add_argument("--negative", default=None, help="negative prompt")
    evaluate = sub.add_parser("eval", help="evaluate a finished run: base vs adapted on held-out prompts")
    evaluate.add_argument("run")
    evaluate.add_argument("--prompts", action="append", default=[], metavar="NAME=SPEC",
                          help="prompt set (default: the recipe's eval.prompt_sets)")
    publish = sub.add_parser("publish", help="write a hub-ready folder: adapters, model card, recipe")
    publish.add_argument("run")
    publish.add_argument("--out", help="folder to write (default RUN/publish)")
    publish.add_argument("--push", metavar="REPO_ID", help="upload with huggingface_hub (token from HF_TOKEN or login)")
    merge = sub.add_parser("merge", help="fuse the adapters into a full cascade folder (no peft needed)")
    merge.add_argument("run")
    merge.add_argument("--out", required=True)
    merge.add_argument("--scale", type=float, default=1.0)
    return parser


def sample_settings(args, run_sample: dict):
    """Flags given on the command line, else the run's eval.sample, else SampleSpec's defaults.
    --guidance sets both stages' scales, as one flag always has."""
    from pydantic import ValidationError

    from .evaluate import settings_from

    given = {key: getattr(args, flag.replace("-", "_")) for flag, key in SAMPLE_KEYS.items()}
    if args.guidance is not None:
        given["guidance_scale_II"] = args.guidance
    given["negative_prompt"] = args.negative
    try:
        values = SampleSpec.model_validate(run_sample).model_dump()
        values.update({key: value for key, value in given.items() if value is not None})
        return settings_from(SampleSpec.model_validate(values))
    except ValidationError as exc:
        key = exc.errors()[0]["loc"][0]
        flag = {k: f for f, k in SAMPLE_KEYS.items()}.get(key, key)
        raise UserError(f"sample --{flag}: {exc.errors()[0]['msg']}") from None


def cmd_sample(args) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from . import atomic
    from .cascade import Cascade
    from .evaluate import load_prompt_set, save_png, student_variant, trained_variant
    from .publish import run_cascade
    from .sampling import CascadeSampler, CascadeVariant, image_grid

    if bool(args.run) == bool(args.cascade):
        raise UserError("sample: give a run directory or --cascade (one of them)")
    if args.base and args.student:
        raise UserError("sample: --base and --student exclude each other")
    if args.run:
        run = Path(args.run)
        cascade, recipe = run_cascade(run)
        variant = CascadeVariant("base") if args.base else trained_variant(run, recipe.get("method", "lora"))
        if args.student:
            variant = student_variant(run, variant)
            if variant is None:
                raise UserError(f"sample --student: {run} has no students/ (add a distill block to the recipe)")
        run_sample = (recipe.get("eval") or {}).get("sample") or {}
    else:
        cascade, variant = Cascade.from_spec(args.cascade), CascadeVariant("base")
        run_sample = {}
    prompts = [args.prompt] if args.prompt else [p.text for p in load_prompt_set(args.prompts, "--prompts")]
    prompts = [p for p in prompts for _ in range(args.num)]
    settings = sample_settings(args, run_sample)
    images = CascadeSampler(cascade, variant, adapter_scale=settings.adapter_scale).generate(prompts, settings)
    out = Path(args.out)
    for i, image in enumerate(images):
        save_png(image, out / f"{i:04d}.png")
    save_png(image_grid(images), out / "grid.png")
    atomic.write_text(out / "prompts.txt", "".join(p + "\n" for p in prompts))
    atomic.write_json(out / "settings.json", asdict(settings))
    print(f"{len(images)} images ({variant.name}) in {out}; grid: {out / 'grid.png'}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from .recipe import load_recipe
    from .train import evaluate_finished_run

    run = Path(args.run)
    loaded = load_recipe(run / "resolved_recipe.yaml")
    sets = dict(loaded.recipe.eval.prompt_sets)
    for item in args.prompts:
        name, _, spec = item.partition("=")
        if not spec:
            raise UserError(f"--prompts {item}: expected NAME=SPEC, e.g. domain=synth:domain?n=48&seed=7")
        sets[name] = spec
    if not sets:
        raise UserError(f"{run}: the recipe has no eval.prompt_sets; give --prompts NAME=SPEC")
    results = evaluate_finished_run(loaded, run, sets)
    print(json.dumps(results, indent=2))
    print(f"written: {run / 'eval.json'}, {run / 'report.md'}")
    return 0


def cmd_publish(args) -> int:
    from pathlib import Path

    from .publish import publish, push

    run = Path(args.run)
    out = publish(run, Path(args.out) if args.out else run / "publish", repo=args.push)
    print(f"published folder: {out}")
    if args.push:
        print(f"uploaded: {push(out, args.push)}")
    return 0


def cmd_merge(args) -> int:
    from pathlib import Path

    from .publish import merge

    out = merge(Path(args.run), Path(args.out), args.scale)
    print(f"merged cascade: {out} (IFPipeline.from_pretrained('{out}/stage_I'))")
    return 0


def cmd_validate(args) -> int:
    from .recipe import load_recipe

    loaded = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok (sha256 {loaded.hash[:12]}, {len(loaded.recipe.phases)} phase(s), "
          f"stages {', '.join(loaded.recipe.cascade.stages)})")
    return 0


def cmd_plan(args) -> int:
    from .plan import make_plan
    from .recipe import load_recipe

    print(make_plan(load_recipe(args.recipe, args.overrides)))
    return 0


def cmd_run(args) -> int:
    from .recipe import load_recipe
    from .train import run_recipe

    loaded = load_recipe(args.recipe, args.overrides)
    summary = run_recipe(loaded, resume=args.resume, overwrite=args.overwrite)
    if summary.adapters:
        print(f"finished in {summary.seconds:.0f}s; run directory: {summary.run_dir}")
        for stage, path in summary.adapters.items():
            if path.parent.name == "adapters":
                print(f"  stage {stage} adapter: {path}  (pipe.load_lora_weights('{path}'))")
            else:
                print(f"  stage {stage} pipeline: {path}  (from_pretrained('{path}'))")
        for stage, path in summary.students.items():
            print(f"  stage {stage} student: {path}  (UNet2DConditionModel.from_pretrained('{path}'))")
        if summary.report:
            print(f"  report: {summary.report} (and report.html)")
    return 0


COMMANDS = {"validate": cmd_validate, "plan": cmd_plan, "run": cmd_run, "sample": cmd_sample,
            "eval": cmd_eval, "publish": cmd_publish, "merge": cmd_merge}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        print(f"stopped by {name} at {stop}; a checkpoint is written; continue with: "
              f"finetune run {getattr(args, 'recipe', 'RECIPE')} --resume", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
