"""Checks that need the file system: data folders exist, the cascade resolves offline and
holds the stages the recipe adapts. No model is loaded here."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .schema import Recipe


def check_resources(recipe: Recipe) -> list[tuple[tuple, str]]:
    from ..cascade import BUILTIN_PREFIX, Cascade

    problems: list[tuple[tuple, str]] = []
    for i, phase in enumerate(recipe.phases):
        data_path = phase.data.path
        if data_path.startswith("synth:"):
            continue
        if not Path(data_path).expanduser().is_dir():
            problems.append((("phases", i, "data", "path"),
                             f"dataset folder '{data_path}' does not exist"))
    spec = recipe.cascade
    if spec.path and spec.path.startswith(BUILTIN_PREFIX) and not spec.stage_paths:
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
    return problems
