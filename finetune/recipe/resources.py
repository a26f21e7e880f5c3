"""Checks that need the file system: data folders exist, the cascade resolves offline and
holds the stages the recipe adapts. No model is loaded here."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UserError
from .schema import Recipe


def check_resources(recipe: Recipe) -> list[tuple[tuple, str]]:
    from data_tools.synth import parse_synth_path

    from ..cascade import BUILTIN_NAMES, BUILTIN_PREFIX, Cascade
    from ..evaluate import load_prompt_set
    from ..lora import unmatched_targets

    problems: list[tuple[tuple, str]] = []
    for i, phase in enumerate(recipe.phases):
        data_path = phase.data.path
        if data_path.startswith("synth:"):
            try:
                parse_synth_path(data_path)  # checks the split, parameters, style and background
            except UserError as exc:  # "<where>: <problem>"
                problems.append((("phases", i, "data", "path"), str(exc).split(": ", 1)[-1]))
            continue
        if not Path(data_path).expanduser().is_dir():
            problems.append((("phases", i, "data", "path"),
                             f"dataset folder '{data_path}' does not exist"))
    for key, wanted, package, extra in [
            (("optim", "name"), recipe.optim.name == "adamw8bit", "bitsandbytes", "bitsandbytes"),
            (("train", "attention"), recipe.train.attention == "xformers", "xformers", "xformers"),
            (("logging", "wandb", "enabled"), recipe.logging.wandb.enabled, "wandb", "wandb"),
            (("logging", "tensorboard"), recipe.logging.tensorboard, "tensorboard", "tensorboard")]:
        if wanted and importlib.util.find_spec(package) is None:
            problems.append((key, f"needs the {package} package, which is not installed: "
                                  f"pip install -e '.[{extra}]', or turn this off"))
    for name, prompts in recipe.eval.prompt_sets.items():
        try:
            load_prompt_set(prompts)
        except UserError as exc:
            problems.append((("eval", "prompt_sets", name), str(exc).split(": ", 1)[-1]))
    problems += _eval_files(recipe.eval)
    spec = recipe.cascade
    if spec.path and spec.path.startswith(BUILTIN_PREFIX) and not spec.stage_paths:
        name = spec.path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_NAMES:
            problems.append((("cascade", "path"), f"unknown builtin cascade '{name}'; known: "
                             + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)))
        return problems  # builtins are built on demand and hold stages I and II
    try:
        cascade = Cascade.from_spec(spec.path, spec.stage_paths, spec.revision, cache_dir=None)
    except UserError as exc:
        key = "stage_paths" if spec.stage_paths and "stage_paths" in str(exc) else "path"
        problems.append((("cascade", key), str(exc).split(": ", 1)[-1]))
        return problems
    for i, stage in enumerate(spec.stages):
        if stage not in cascade.stage_dirs:
            have = ", ".join(sorted(cascade.stage_dirs)) or "none"
            problems.append((("cascade", "stages", i),
                             f"stage {stage} is not in the cascade (it has: {have})"))
        elif recipe.method == "lora":
            missing = unmatched_targets(_empty_unet(cascade, stage), recipe.lora.target_modules)
            if missing:
                problems.append((("lora", "target_modules"),
                                 f"{', '.join(missing)} match no module of stage {stage}'s UNet; IF "
                                 "attention uses to_q, to_k, to_v, to_out.0, add_k_proj, add_v_proj"))
    if recipe.distill is not None:
        from ..distill import student_config

        for stage in recipe.distill_stages():
            if stage in cascade.stage_dirs:
                try:
                    student_config(cascade.unet_config(stage), recipe.distill.student)
                except UserError as exc:
                    key, _, message = str(exc).partition(": ")
                    problems.append((tuple(key.split(".")), f"stage {stage}: {message}"))
    return problems


def _empty_unet(cascade, stage: str):
    """The stage's UNet structure without weights (meta device: instant even for IF-I-XL)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(cascade.unet_config(stage))


def _eval_files(spec) -> list[tuple[tuple, str]]:
    from ..metrics import INCEPTION_NEEDS, OFFLINE

    problems = []
    if spec.feature_extractor != OFFLINE and not Path(spec.feature_extractor).expanduser().is_file():
        problems.append((("eval", "feature_extractor"), f"'{spec.feature_extractor}' is neither offline nor"
                         " an Inception weights file (torch-fidelity's pt_inception-2015-12-05-6726825d.pth)"))
    elif spec.feature_extractor != OFFLINE and importlib.util.find_spec("torch_fidelity") is None:
        problems.append((("eval", "feature_extractor"), INCEPTION_NEEDS))
    if spec.clip_model and not (Path(spec.clip_model).expanduser() / "config.json").is_file():
        problems.append((("eval", "clip_model"), f"'{spec.clip_model}' is not a local CLIP folder (no config.json)"))
    for name, folder in spec.reference_images.items():
        if name not in spec.prompt_sets:
            problems.append((("eval", "reference_images", name), f"no prompt set named '{name}' in eval.prompt_sets"))
        elif not Path(folder).expanduser().is_dir():
            problems.append((("eval", "reference_images", name), f"folder '{folder}' does not exist"))
    return problems
