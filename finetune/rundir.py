"""The run directory: what a run owns and how a second run on it is refused.

    resolved_recipe.yaml   the recipe after env expansion, overrides and defaults
    recipe.sha256          its hash (a resume must match it)
    versions.json          python, torch, diffusers, transformers, peft, accelerate, kit
    metrics.jsonl          one JSON object per logged step
    progress.json          finished (phase, stage) units
    data_report.json       what each phase trains on and what it skipped, and why
    checkpoints/           resumable state (see checkpoint.py)
    phases/<phase>/stage_<S>/   each phase's adapter
    adapters/stage_<S>/    the final adapters (diffusers LoRA format)
    students/stage_<S>/    distilled student UNets (save_pretrained folders), when the recipe distils
    finished.json          written last; a finished run is never overwritten unless asked
"""
from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from . import atomic
from .errors import UserError

RUN_FILES = ("recipe.sha256", "resolved_recipe.yaml")
STUDENTS = "students"


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
                 "cascade-adaptation-kit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return (self.path / "finished.json").exists()

    def recorded_hash(self) -> str | None:
        file = self.path / "recipe.sha256"
        return file.read_text().strip() if file.exists() else None

    def prepare(self, loaded, resume: bool, overwrite: bool) -> None:
        """Claim the directory for this recipe, refusing anything that would lose work."""
        path = self.path
        existing = path.exists() and any(path.iterdir())
        if existing and overwrite:
            shutil.rmtree(path)
            existing = False
        if existing:
            recorded = self.recorded_hash()
            if recorded is None:
                raise UserError(f"{path}: output_dir exists and is not a run directory; "
                                "choose another output_dir or pass --overwrite")
            if not resume:
                state = "a finished run" if self.finished else "an unfinished run"
                raise UserError(f"{path}: output_dir holds {state}; pass --resume to continue it, "
                                "--overwrite to start again, or set another output_dir")
            if recorded != loaded.hash:
                raise UserError(f"{path}: the recipe changed since this run started (hash "
                                f"{recorded[:12]} vs {loaded.hash[:12]}); resume needs the same "
                                "recipe, or start a new run with another output_dir")
            return
        path.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path / "resolved_recipe.yaml", loaded.resolved_yaml())
        atomic.write_text(path / "recipe.sha256", loaded.hash + "\n")
        atomic.write_json(path / "versions.json", library_versions())

    # -- progress --------------------------------------------------------------------------
    def completed_units(self) -> list[str]:
        file = self.path / "progress.json"
        return json.loads(file.read_text())["completed"] if file.exists() else []

    def mark_completed(self, unit: str) -> None:
        done = self.completed_units()
        if unit not in done:
            atomic.write_json(self.path / "progress.json", {"completed": done + [unit]})

    # -- metrics ---------------------------------------------------------------------------
    def truncate_metrics(self, unit: str, done_steps: int) -> None:
        """Drop entries of `unit` beyond `done_steps` (those steps are re-run after a resume)."""
        file = self.path / "metrics.jsonl"
        if not file.exists():
            return
        kept = []
        for line in file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if entry.get("unit") == unit and entry.get("step", 0) > done_steps:
                continue
            kept.append(line)
        atomic.write_text(file, "".join(k + "\n" for k in kept))

    def log_metrics(self, entry: dict) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
