"""`finetune` command line.

    finetune validate RECIPE [--set key.path=value ...]   check a recipe, write nothing
    finetune plan RECIPE                                  parameters per stage, data counts
    finetune run RECIPE [--resume] [--overwrite]          train; `accelerate launch -m finetune run ...` for many processes

Exit codes: 0 success, 2 user error (one line per problem, no traceback).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .errors import UserError
from .guards import Stopped


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
    return parser


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
        if summary.report:
            print(f"  report: {summary.report} (and report.html)")
    return 0


COMMANDS = {"validate": cmd_validate, "plan": cmd_plan, "run": cmd_run}


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
