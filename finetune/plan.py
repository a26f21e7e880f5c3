"""`finetune plan`: what a recipe will train, before it trains - parameters per stage
(total, trainable, frozen) with LoRA attached, data counts and steps per phase."""
from __future__ import annotations

from pathlib import Path

from .cascade import Cascade, default_cache_dir
from .lora import attach_lora, count_parameters


def stage_parameter_counts(cascade: Cascade, stage: str, recipe):
    unet = cascade.load_unet(stage)
    if recipe.method == "lora":
        lora = recipe.lora
        attach_lora(unet, lora.rank_for(stage), lora.alpha_for(stage), lora.dropout, lora.target_modules)
    return count_parameters(unet)


def student_parameter_counts(cascade: Cascade, stage: str, student_spec) -> tuple[int, int]:
    """(teacher, student) parameter counts, from the configs alone (no weights allocated)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from .distill import student_config

    teacher_cfg = cascade.unet_config(stage)
    with init_empty_weights():
        teacher = UNet2DConditionModel.from_config(teacher_cfg)
        student = UNet2DConditionModel.from_config(student_config(teacher_cfg, student_spec))
    return (sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters()))


def make_plan(loaded) -> str:
    from data_tools.ingest import ingest

    from .phase_data import resolve_data_path

    recipe = loaded.recipe
    cache_dir = default_cache_dir() if recipe.cache_dir is None else Path(recipe.cache_dir).expanduser()
    cascade = Cascade.from_spec(recipe.cascade.path, recipe.cascade.stage_paths,
                                recipe.cascade.revision, cache_dir)
    lines = [f"recipe {recipe.name} (sha256 {loaded.hash[:12]}) -> {recipe.output_dir}",
             f"{'stage':<6}{'res':>5}{'total':>14}{'trainable':>12}{'frozen':>14}{'frozen %':>10}"]
    for stage in recipe.cascade.stages:
        counts = stage_parameter_counts(cascade, stage, recipe)
        lines.append(f"{stage:<6}{cascade.resolution(stage):>5}{counts.total:>14,}{counts.trainable:>12,}"
                     f"{counts.frozen:>14,}{counts.frozen_fraction:>10.2%}")
    if recipe.method == "lora":
        lines.append(f"lora {recipe.lora.describe(recipe.cascade.stages)}, minimum frozen "
                     f"{recipe.lora.min_frozen_fraction:.0%}")
    else:
        lines.append("method full: every UNet weight trains")
    for phase in recipe.phases:
        found = ingest(resolve_data_path(phase.data, cache_dir), phase.data.format,
                       phase.data.caption_column, phase.data.image_column, phase.data.split)
        work = ", ".join(f"stage {s} {phase.steps_for(s)} steps x batch "
                         f"{phase.batch_for(s, recipe.optim.batch_size)}" for s in recipe.cascade.stages)
        lines.append(f"phase {phase.name}: {len(found.records)} samples listed "
                     f"({len(found.rejected)} rejected before decoding); {work}")
    if recipe.distill is not None:
        spec = recipe.distill
        for stage in recipe.distill_stages():
            teacher, student = student_parameter_counts(cascade, stage, spec.student)
            steps = spec.steps if isinstance(spec.steps, int) else spec.steps[stage]
            lines.append(f"distill stage {stage}: teacher {teacher:,} -> student {student:,} parameters "
                         f"({student / teacher:.0%}); {steps} steps")
    return "\n".join(lines)
