"""Resumable checkpoints of one training unit (a phase x stage), written atomically.

    checkpoints/<phase>-stage_<S>-step_<000123>/state.safetensors
    checkpoints/<phase>-stage_<S>-step_<000123>/manifest.json   sha256 of the state file

A checkpoint directory appears only complete (built under a temporary name, then renamed);
the manifest's checksum additionally catches a file damaged after the fact. Loading walks
from the newest checkpoint back and uses the first that verifies, saying why it skipped any.

The state holds the LoRA weights, the optimizer state (flattened to tensors: no pickle) and
the step. Data order and noise are pure functions of (seed, phase, stage, step), so no RNG
state is needed for an exact resume.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir
from .faults import crash_point

STATE = "state.safetensors"
MANIFEST = "manifest.json"
NAME = re.compile(r"^(?P<unit>.+)-step_(?P<step>\d+)$")


def unit_name(phase: str, stage: str) -> str:
    return f"{phase}-stage_{stage}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


NEST = "/"  # joins the keys of nested optimizer state (bitsandbytes packs its state one level down)


def _leaves(entries: dict, path: tuple = ()):
    for key, value in entries.items():
        if isinstance(value, dict):
            yield from _leaves(value, path + (str(key),))
        else:
            yield path + (str(key),), value


def _nest(target: dict, path: list[str], value) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def optimizer_to_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as flat tensors (for safetensors) and JSON scalars, nested
    dictionaries included (bitsandbytes' 8-bit AdamW keeps its state under one key)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for path, value in _leaves(entries):
            name = f"{pid}.{NEST.join(path)}"
            if torch.is_tensor(value):
                tensors[f"optim.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    leaves = [(name[len("optim."):], value) for name, value in tensors.items() if name.startswith("optim.")]
    for name, value in leaves + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        _nest(state.setdefault(int(pid), {}), key.split(NEST), value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict


def save_checkpoint(root: Path, unit: str, step: int, tensors: dict[str, torch.Tensor],
                    meta: dict, keep: int) -> Path:
    target = Path(root) / f"{unit}-step_{step:06d}"
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / STATE))
        manifest = {"unit": unit, "step": step, "sha256": _sha256(tmp / STATE), "meta": meta}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        crash_point("checkpoint-write")
    for old in list_checkpoints(root, unit)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: Path, unit: str) -> list[Path]:
    """Checkpoint folders of `unit`, oldest first (temporary folders are ignored)."""
    if not Path(root).is_dir():
        return []
    found = []
    for path in Path(root).iterdir():
        match = NAME.match(path.name)
        if match and match["unit"] == unit and path.is_dir():
            found.append((int(match["step"]), path))
    return [p for _, p in sorted(found)]


def load_latest(root: Path, unit: str, warn=print) -> Checkpoint | None:
    for path in reversed(list_checkpoints(root, unit)):
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if _sha256(path / STATE) != manifest["sha256"]:
                raise ValueError("checksum mismatch")
            tensors = load_file(str(path / STATE))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            warn(f"checkpoint {path.name} is incomplete or corrupted ({exc}); using the previous one")
            continue
        return Checkpoint(path, int(manifest["step"]), tensors, manifest["meta"])
    return None
