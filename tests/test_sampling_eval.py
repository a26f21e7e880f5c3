"""Sampling through stock pipelines, evaluation of before/after, and the run report."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from finetune.cascade import Cascade
from finetune.errors import UserError
from finetune.evaluate import judge_images, load_prompt_set
from finetune.recipe import load_recipe
from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings, image_grid
from finetune.train import run_recipe

FAST = SampleSettings(steps=3, steps_II=2, batch_size=2)
EVAL = ("eval: {prompt_sets: {domain: 'synth:domain?n=3&seed=7'}, grid: 4, "
        "sample: {steps: 2, steps_II: 2, batch_size: 3, guidance_scale: 2.5}}")


@pytest.fixture(scope="module")
def adapted_run(recipe_factory_module):
    path = recipe_factory_module(stages="[I, II]", steps=2, general_steps=1, extra=EVAL)
    return run_recipe(load_recipe(path))


@pytest.fixture(scope="module")
def recipe_factory_module(tmp_path_factory, tiny_cascade, synth_general, synth_domain, cache_dir):
    from conftest import write_recipe

    root = tmp_path_factory.mktemp("eval-run")

    def make(stages, steps, general_steps, extra):
        return write_recipe(root / "r.yaml", f"""
name: eval-test
output_dir: {root / 'run'}
cache_dir: {cache_dir}
cascade: {{path: {tiny_cascade}, stages: {stages}}}
lora: {{rank: 4, alpha: 8}}
optim: {{batch_size: 4, lr: {{start: 1.0e-2, end: 1.0e-3}}}}
train: {{checkpoint_every: 10, device: cpu}}
phases:
  - {{name: general, data: {{path: {synth_general}}}, steps: {general_steps}}}
  - {{name: domain, data: {{path: {synth_domain}}}, steps: {steps}}}
{extra}""")
    return make


def _arrays(images):
    return [np.asarray(i, dtype=np.int16) for i in images]


def test_each_prompt_has_its_own_seed_whatever_the_batch(tiny_cascade):
    sampler = CascadeSampler(Cascade.from_spec(str(tiny_cascade)), CascadeVariant(), stages=["I"])
    prompts = ["a red circle at the top left", "two blue squares", "a green square at the center"]
    one = sampler.generate(prompts, SampleSettings(steps=3, batch_size=1))
    three = sampler.generate(prompts, SampleSettings(steps=3, batch_size=3))
    for a, b in zip(_arrays(one), _arrays(three)):
        assert np.abs(a - b).max() <= 1
    other_seed = sampler.generate(prompts[:1], SampleSettings(steps=3, seed=1))
    assert np.abs(_arrays(other_seed)[0] - _arrays(one)[0]).max() > 10


def test_fused_adapter_samples_like_the_stock_unfused_pipeline(adapted_run, tiny_cascade):
    from diffusers import IFPipeline

    cascade = Cascade.from_spec(str(tiny_cascade))
    adapter = adapted_run.adapters["I"]
    prompts = ["a red star at the center"]
    fused = CascadeSampler(cascade, CascadeVariant("a", adapters={"I": adapter}), stages=["I"])
    base = CascadeSampler(cascade, CascadeVariant(), stages=["I"])
    settings = SampleSettings(steps=3, guidance_scale=1.0)
    ours = fused.generate(prompts, settings)[0]
    assert np.abs(_arrays([ours])[0] - _arrays(base.generate(prompts, settings))[0]).max() > 0

    stock = IFPipeline.from_pretrained(cascade.stage_dirs["I"], safety_checker=None,
                                       feature_extractor=None, watermarker=None,
                                       requires_safety_checker=False)
    stock.load_lora_weights(str(adapter))
    generator = torch.Generator("cpu").manual_seed(0)  # prompt 0 of seed 0 (sampling._generators)
    reference = stock(prompts, num_inference_steps=3, guidance_scale=1.0, generator=[generator],
                      clean_caption=False).images[0]
    assert np.abs(_arrays([ours])[0] - _arrays([reference])[0]).max() <= 2


def test_run_with_eval_writes_scores_grids_and_report(adapted_run):
    run = adapted_run.run_dir
    data = json.loads((run / "eval.json").read_text())
    assert data["variants"] == ["base", "adapted"]
    for variant in ("base", "adapted"):
        scores = data["results"]["domain"][variant]
        assert scores["n"] == 3 and 0.0 <= scores["overall"] <= 1.0
        assert (run / "samples" / variant / "domain.png").exists()
    report = (run / "report.md").read_text()
    assert "| variant | colour | shape | count |" in report
    for target in re.findall(r"!\[.*?\]\((.*?)\)", report):
        assert (run / target).exists(), target
    html = (run / "report.html").read_text()
    assert html.count("<img") == report.count("![") and "<table>" in html


def test_prompt_sets_from_synth_and_files(tmp_path):
    prompts = load_prompt_set("synth:general?n=5&seed=3")
    assert len(prompts) == 5 and all(p.truth and p.text for p in prompts)
    assert [p.text for p in prompts] == [p.text for p in load_prompt_set("synth:general?n=5&seed=3")]
    (tmp_path / "p.txt").write_text("a red circle at the center\n\ntwo blue squares\n")
    assert [p.truth for p in load_prompt_set(str(tmp_path / "p.txt"))] == [None, None]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object"):
        load_prompt_set(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_prompt_set(str(tmp_path / "missing.txt"))


def test_judge_images_scores_ground_truth_renders_and_skips_prompts_without_truth():
    from data_tools.synth import render

    prompts = load_prompt_set("synth:general?n=12&seed=5")
    rng = np.random.default_rng(0)
    from data_tools.synth import Scene

    images = [render(Scene(**p.truth), 64, rng) for p in prompts]
    scores = judge_images(images, prompts)
    assert scores["colour"] == 1.0 and scores["shape"] >= 0.9 and scores["n"] == 12
    assert judge_images(images[:1], [type(prompts[0])("x")]) is None


def test_image_grid_tiles_row_by_row():
    from PIL import Image

    tiles = [Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue")]
    grid = image_grid(tiles, columns=2, pad=1)
    assert grid.size == (11, 11)
    assert grid.getpixel((1, 1)) == (255, 0, 0) and grid.getpixel((6, 1))[1] > 100
    assert grid.getpixel((1, 6)) == (0, 0, 255) and grid.getpixel((6, 6)) == (255, 255, 255)


def test_sample_command_writes_pngs_and_a_grid(adapted_run, tmp_path):
    from PIL import Image

    from finetune.cli import main

    out = tmp_path / "samples"
    assert main(["sample", str(adapted_run.run_dir), "--prompt", "a red star at the center",
                 "--num", "2", "--steps", "2", "--steps-II", "2", "--out", str(out)]) == 0
    assert Image.open(out / "0000.png").size == (64, 64)
    assert (out / "0001.png").exists() and (out / "grid.png").exists()
    assert main(["sample", "--prompt", "x", "--out", str(out)]) == 2  # neither run nor cascade


def test_sample_command_samples_a_run_as_its_report_did_unless_told(adapted_run, tmp_path, capsys):
    """Unset flags come from the run's eval.sample (steps 2, guidance 2.5 here), not from
    generic defaults (50 steps, guidance 4): a hand-drawn sample matches the report's grids."""
    from finetune.cli import main

    out = tmp_path / "as-report"
    assert main(["sample", str(adapted_run.run_dir), "--prompt", "a red star at the center", "--out", str(out)]) == 0
    used = json.loads((out / "settings.json").read_text())
    assert (used["steps"], used["steps_II"], used["guidance_scale"], used["batch_size"]) == (2, 2, 2.5, 3)
    out = tmp_path / "told"
    assert main(["sample", str(adapted_run.run_dir), "--prompt", "x", "--guidance", "1", "--steps-II", "1",
                 "--out", str(out)]) == 0
    used = json.loads((out / "settings.json").read_text())
    assert (used["steps"], used["steps_II"], used["guidance_scale"], used["guidance_scale_II"]) == (2, 1, 1.0, 1.0)
    capsys.readouterr()
    assert main(["sample", str(adapted_run.run_dir), "--prompt", "x", "--steps", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sample --steps:" in err and "Traceback" not in err


def test_eval_command_adds_prompt_sets_and_rewrites_the_report(adapted_run):
    from finetune.cli import main

    run = adapted_run.run_dir
    assert main(["eval", str(run), "--prompts", "general=synth:general?n=2&seed=1"]) == 0
    data = json.loads((run / "eval.json").read_text())
    assert set(data["results"]) == {"domain", "general"}
    assert data["results"]["general"]["adapted"]["n"] == 2
    assert "synth:general?n=2&seed=1" in (run / "report.md").read_text()


def test_html_report_renders_its_images_and_table_in_headless_chromium(adapted_run, tmp_path):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
    copy = tmp_path / "run"
    shutil.copytree(adapted_run.run_dir, copy)

    def render() -> str:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
             "--dump-dom", (copy / "report.html").as_uri()],
            capture_output=True, text=True, timeout=120).stdout

    dom = render()
    images = (copy / "report.md").read_text().count("![")
    assert f'data-images-ok="{images}"' in dom and 'data-images-broken="0"' in dom
    assert "<td>adapted</td>" in dom and "<th>overall</th>" in dom
    (copy / "samples" / "base" / "domain.png").unlink()  # the check itself can fail
    assert 'data-images-broken="1"' in render()
