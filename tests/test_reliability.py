"""Reliability: run locks, graceful stop, non-finite steps, resource faults, hostile files."""
from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main
from finetune.guards import lock_path
from finetune.recipe import load_recipe
from finetune.train import run_recipe

ADAPTER = "pytorch_lora_weights.safetensors"


def _out(path) -> Path:
    return Path(load_recipe(path).recipe.output_dir)


def _write_lock(run: Path, pid: int) -> Path:
    lock = lock_path(run)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    return lock


def test_second_run_on_the_same_directory_is_refused_and_stale_locks_are_taken_over(
        recipe_factory, capsys):
    path = recipe_factory(steps=1, general_steps=1)
    run = _out(path)
    _write_lock(run, os.getpid())  # a live owner: this very process
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"in use by pid {os.getpid()}" in err and err.count("\n") == 1
    assert not run.exists(), "a refused run writes nothing"

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    _write_lock(run, int(dead))
    assert main(["run", str(path)]) == 0
    assert "stale lock" in capsys.readouterr().out
    assert not lock_path(run).exists(), "the lock is released at the end"


def test_sigterm_checkpoints_at_the_next_step_and_resume_matches(recipe_factory):
    reference = recipe_factory(steps=40, general_steps=1, out="ref", name="ref.yaml", checkpoint_every=100)
    run_recipe(load_recipe(reference))
    path = recipe_factory(steps=40, general_steps=1, out="stopped", name="stopped.yaml", checkpoint_every=100)
    out = _out(path)
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "run", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"domain"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("domain-stage_I-step_*"))
    assert ckpts and ckpts[-1] != "domain-stage_I-step_000040", "stopped before the end"
    assert main(["run", str(path), "--resume"]) == 0
    ref = load_file(str(_out(reference) / "adapters/stage_I" / ADAPTER))
    got = load_file(str(out / "adapters/stage_I" / ADAPTER))
    assert all(ref[k].equal(got[k]) for k in ref)


def _poison_step(monkeypatch, at_calls: set[int]):
    """Make the objective's loss NaN on the given calls (counting from 0)."""
    from finetune.objective import StageObjective

    real = StageObjective.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        value, metrics = real(self, *args, **kwargs)
        n = calls["n"]
        calls["n"] += 1
        return (value * float("nan"), metrics) if n in at_calls else (value, metrics)

    monkeypatch.setattr(StageObjective, "loss", loss)


def test_nonfinite_step_is_skipped_and_counted(recipe_factory, monkeypatch):
    _poison_step(monkeypatch, {2})  # general: calls 0-1, domain: call 2 = domain step 1
    run = run_recipe(load_recipe(recipe_factory(steps=3, general_steps=2))).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0]
    assert rows[-1]["skipped_total"] == 1
    adapter = load_file(str(run / "adapters/stage_I" / ADAPTER))
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_nonfinite_step_stops_the_run_when_asked(recipe_factory, monkeypatch, capsys):
    _poison_step(monkeypatch, {4})
    path = recipe_factory(steps=4, general_steps=2, train=", on_nonfinite: stop")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss or gradient in domain-stage_I at step 3" in err
    assert "last good checkpoint: domain-stage_I-step_000002" in err


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(recipe_factory, monkeypatch, capsys):
    import finetune.checkpoint as checkpoint

    real = checkpoint.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    path = recipe_factory(steps=4, general_steps=4)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "disk full while writing the checkpoint of general-stage_I at step 4" in err
    ckpts = _out(path) / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["general-stage_I-step_000002"]
    assert checkpoint.load_latest(ckpts, "general-stage_I").step == 2


def test_out_of_memory_names_the_settings_that_reduce_memory(recipe_factory, monkeypatch, capsys):
    from finetune.objective import StageObjective

    def loss(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StageObjective, "loss", loss)
    assert main(["run", str(recipe_factory(steps=1))]) == 2
    err = capsys.readouterr().err
    assert "out of memory during general-stage_I step 1" in err and "gradient_checkpointing" in err


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was (not) loaded."""

    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_pickle_weights_are_refused_never_loaded(tiny_cascade, tmp_path, capsys):
    import shutil

    from finetune.adapters import read_adapter
    from finetune.errors import UserError

    evil = tmp_path / "evil"
    shutil.copytree(tiny_cascade, evil)
    marker = tmp_path / "was-unpickled"
    _Boom.marker = str(marker)
    for weights in (evil / "stage_I" / "unet").glob("*.safetensors"):
        weights.unlink()
    (evil / "stage_I" / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    assert main(["plan", str(_recipe_for(tmp_path, evil))]) == 2
    assert "pickle-based weight file" in capsys.readouterr().err
    (tmp_path / "adapter.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(UserError, match="pickle"):
        read_adapter(tmp_path / "adapter.bin")
    assert not marker.exists()


def _recipe_for(tmp_path: Path, cascade: Path) -> Path:
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: e\noutput_dir: {tmp_path / 'run'}\ncascade: {{path: {cascade}}}\n"
                    "phases: [{name: a, data: {path: 'synth:general?n=4&size=32'}, steps: 1}]\n")
    return path


def test_mismatched_adapter_is_refused_with_the_first_mismatch(recipe_factory, tiny_cascade):
    from finetune.adapters import load_adapter_weights, read_adapter
    from finetune.cascade import Cascade
    from finetune.errors import UserError
    from finetune.lora import attach_lora

    run = run_recipe(load_recipe(recipe_factory(steps=1, general_steps=1))).run_dir
    tensors = read_adapter(run / "adapters" / "stage_I")[0]
    unet = Cascade.from_spec(str(tiny_cascade)).load_unet("I")
    attach_lora(unet, 8, 8, 0.0, ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"])
    with pytest.raises(UserError, match=r"has shape \(4, \d+\), the model expects \(8, \d+\)"):
        load_adapter_weights(unet, tensors)
    other = Cascade.from_spec(str(tiny_cascade)).load_unet("I")
    attach_lora(other, 4, 8, 0.0, ["to_q"])
    with pytest.raises(UserError, match="is not in it"):
        load_adapter_weights(other, tensors)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_cascade, synth_general, synth_domain, cache_dir):
    """The adapter a run gives when nothing goes wrong (reference for every crash point)."""
    from conftest import write_recipe

    root = tmp_path_factory.mktemp("faults")

    def recipe(name: str) -> Path:
        return write_recipe(root / f"{name}.yaml", f"""
name: faults
output_dir: {root / name}
cache_dir: {cache_dir}
cascade: {{path: {tiny_cascade}, stages: [I]}}
lora: {{rank: 4, alpha: 8}}
optim: {{batch_size: 4}}
train: {{checkpoint_every: 2, device: cpu, deterministic: true, ema: {{decay: 0.9}}}}
phases:
  - {{name: general, data: {{path: {synth_general}}}, steps: 2}}
  - {{name: domain, data: {{path: {synth_domain}}}, steps: 4}}
""")

    # Every run of this test is a CLI process, as a user's would be.
    path = recipe("reference")
    subprocess.run([sys.executable, "-m", "finetune", "run", str(path)], check=True,
                   capture_output=True, timeout=300)
    return recipe, load_file(str(_out(path) / "adapters/stage_I" / ADAPTER))


@pytest.mark.parametrize("point", ["step:5", "checkpoint-write:2", "between-phases:1", "adapter-save:2"])
def test_sigkill_at_each_fault_point_then_resume_gives_the_same_adapter(uninterrupted, point):
    recipe, reference = uninterrupted
    path = recipe(point.replace(":", "-"))
    env = dict(os.environ, FINETUNE_CRASH_AT=point)
    proc = subprocess.run([sys.executable, "-m", "finetune", "run", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out = _out(path)
    assert not (out / "finished.json").exists()
    for ckpt in (out / "checkpoints").glob("*-step_*"):
        assert (ckpt / "manifest.json").exists(), f"{ckpt} is visible but incomplete"
    resumed = subprocess.run([sys.executable, "-m", "finetune", "run", str(path), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = load_file(str(out / "adapters/stage_I" / ADAPTER))
    # Bit-exact: train.deterministic keeps the kernels independent of memory layout (without
    # it, a fresh process can differ by ~1e-6 from the reference; see docs/reliability.md).
    assert all(torch.equal(reference[k], got[k]) for k in reference)


def test_dataset_files_cannot_reach_outside_the_folder(tmp_path):
    from PIL import Image

    from data_tools.ingest import ingest

    secret = tmp_path / "secret.png"
    Image.new("RGB", (64, 64)).save(secret)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "link.png").symlink_to(secret)
    (pairs / "link.txt").write_text("a caption")
    found = ingest(pairs)
    assert not found.records and "outside the dataset folder" in found.rejected[0].reason
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "inside.png").symlink_to(secret)
    (meta / "metadata.jsonl").write_text(
        json.dumps({"file_name": str(secret), "text": "absolute"}) + "\n"
        + json.dumps({"file_name": "inside.png", "text": "symlink out"}) + "\n")
    found = ingest(meta)
    assert not found.records
    assert all("outside the dataset folder" in r.reason for r in found.rejected)
