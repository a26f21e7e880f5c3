"""Data parallel on CPU (gloo): two processes finish, write one run, and match a one-process
run of the same global batch. accelerate picks the launch up from torchrun's environment,
exactly as from `accelerate launch`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from finetune.recipe import load_recipe
from finetune.train import run_recipe

# Same gradients, summed in another order: Adam's normalised updates can differ by a few
# percent of one step (lr 1e-4) on the tiny model's near-zero gradients.
TOLERANCE = 1e-5


@pytest.mark.slow
def test_two_processes_match_one(recipe_factory, tmp_path):
    one = recipe_factory(steps=3, general_steps=2, out="one", name="one.yaml")
    two = recipe_factory(steps=3, general_steps=2, out="two", name="two.yaml")
    run_recipe(load_recipe(one))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "finetune", "run", str(two)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out_one = load_recipe(one).recipe.output_dir
    out_two = load_recipe(two).recipe.output_dir
    a = load_file(f"{out_one}/adapters/stage_I/pytorch_lora_weights.safetensors")
    b = load_file(f"{out_two}/adapters/stage_I/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"1 vs 2 processes: max adapter difference {diff:.2e}")
    assert diff < TOLERANCE
    m_one = [json.loads(x) for x in open(f"{out_one}/metrics.jsonl")]
    m_two = [json.loads(x) for x in open(f"{out_two}/metrics.jsonl")]
    assert len(m_one) == len(m_two) == 5  # only the main process logs
    for x, y in zip(m_one, m_two):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["lr"] == y["lr"]
