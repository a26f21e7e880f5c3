"""Shared fixtures: one tiny IF-layout cascade per session, built locally (nothing downloaded),
and an isolated cache directory so tests never touch the user's cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["FINETUNE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory, cache_dir) -> Path:
    from finetune.cascade import build_tiny

    return build_tiny(tmp_path_factory.mktemp("cascade") / "tiny", seed=0)


@pytest.fixture(scope="session")
def synth_general(tmp_path_factory) -> Path:
    from data_tools.synth import write_split

    return write_split(tmp_path_factory.mktemp("data") / "general", "general", n=24, size=64, seed=1)


@pytest.fixture(scope="session")
def synth_domain(tmp_path_factory) -> Path:
    from data_tools.synth import write_split

    return write_split(tmp_path_factory.mktemp("data") / "domain", "domain", n=24, size=64, seed=2)


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def recipe_factory(tmp_path, tiny_cascade, synth_general, synth_domain, cache_dir):
    """Write a small two-phase recipe over the tiny cascade; keyword args replace parts."""
    def make(stages="[I]", steps=4, general_steps=None, extra="", name="r.yaml", out="run",
             batch=4, checkpoint_every=2, train=""):
        text = f"""
name: test
seed: 0
output_dir: {tmp_path / out}
cache_dir: {cache_dir}
cascade: {{path: {tiny_cascade}, stages: {stages}}}
lora: {{rank: 4, alpha: 8}}
optim: {{batch_size: {batch}}}
train: {{checkpoint_every: {checkpoint_every}, log_every: 1, device: cpu, deterministic: true{train}}}
phases:
  - {{name: general, data: {{path: {synth_general}}}, steps: {general_steps or steps}}}
  - {{name: domain, data: {{path: {synth_domain}}}, steps: {steps}}}
{extra}"""
        return write_recipe(tmp_path / name, text)
    return make


def copy_predicting(source: Path, target: Path, prediction_type: str) -> Path:
    """A copy of a cascade or stage folder whose schedulers say the UNets predict
    `prediction_type` (every scheduler/scheduler_config.json under it is rewritten)."""
    import json
    import shutil

    shutil.copytree(source, target)
    for config in target.rglob("scheduler/scheduler_config.json"):
        config.write_text(json.dumps(dict(json.loads(config.read_text()), prediction_type=prediction_type)))
    return target


def rewind_unit(run: Path, unit: str, phase: str, last_checkpoint: str) -> None:
    """Make a finished run look as if it died just before `last_checkpoint` was written:
    that checkpoint, the phase's result and the finished marker go; `--resume` redoes them."""
    import json
    import shutil

    shutil.rmtree(run / "checkpoints" / last_checkpoint)
    shutil.rmtree(run / "phases" / phase)
    (run / "finished.json").unlink()
    progress = json.loads((run / "progress.json").read_text())
    progress["completed"].remove(unit)
    (run / "progress.json").write_text(json.dumps(progress))
