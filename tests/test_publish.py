"""Publishing a run: hub-ready folder with a model card whose usage snippet runs, upload
without leaking the token, and merging adapters into a cascade that loads without peft."""
from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from finetune.cli import main
from finetune.recipe import load_recipe
from finetune.train import run_recipe

EVAL = ("eval: {prompt_sets: {domain: 'synth:domain?n=2&seed=7'}, grid: 2, "
        "sample: {steps: 2, steps_II: 2, batch_size: 2}}")
SECRET = "hf_SecretTokenThatMustNeverBeWritten123"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_cascade, synth_general, synth_domain, cache_dir):
    root = tmp_path_factory.mktemp("publish")
    path = root / "r.yaml"
    path.write_text(f"""
name: shapes
output_dir: {root / 'run'}
cache_dir: {cache_dir}
cascade: {{path: {tiny_cascade}, stages: [I, II]}}
lora: {{rank: {{I: 4, II: 2}}, alpha: {{I: 8, II: 4}}}}
optim: {{batch_size: 4, lr: {{start: 1.0e-2, end: 1.0e-3}}}}
train: {{device: cpu}}
phases:
  - {{name: general, data: {{path: {synth_general}}}, steps: 1}}
  - {{name: domain, data: {{path: {synth_domain}, caption_prefix: 'sks '}}, steps: 2}}
{EVAL}""")
    return run_recipe(load_recipe(path)).run_dir


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_publish_writes_adapters_card_recipe_and_samples(finished_run, tmp_path):
    from finetune.adapters import read_adapter

    out = tmp_path / "pub"
    assert main(["publish", str(finished_run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "diffusers" and "lora" in front["tags"]
    assert len(front["base_model"]) == 2 and front["instance_prompt"] == "sks"
    assert "| variant | colour | shape | count |" in card
    for image in re.findall(r"!\[.*?\]\((.*?)\)", card):
        assert (out / image).exists()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "shapes"
    # per-stage LoRA settings reach each stage's adapter, its provenance and the card
    assert "(stage I rank 4, alpha 8; stage II rank 2, alpha 4)" in card
    for stage, rank, alpha in (("I", 4, 8.0), ("II", 2, 4.0)):
        _, config, provenance = read_adapter(out / f"stage_{stage}")
        assert config["r"] == rank and config["lora_alpha"] == alpha
        assert (provenance["rank"], provenance["alpha"]) == (rank, alpha)
        for key in ("recipe_hash", "data_fingerprint", "kit_version", "base_cascade", "rank", "alpha"):
            assert provenance.get(key) not in (None, ""), key


def test_usage_snippet_in_the_card_runs_with_stock_diffusers(finished_run, tmp_path, monkeypatch):
    out = tmp_path / "pub"
    assert main(["publish", str(finished_run), "--out", str(out)]) == 0
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)[1]
    assert "import finetune" not in snippet and "from finetune" not in snippet
    monkeypatch.chdir(out)
    exec(compile(snippet, "model-card-snippet", "exec"), {})
    from PIL import Image

    assert Image.open(out / "sample.png").size == (64, 64)


def test_push_uploads_and_never_writes_the_token(finished_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))
    out = tmp_path / "pub"
    assert main(["publish", str(finished_run), "--out", str(out), "--push", "team/shapes-lora"]) == 0
    assert calls[0] == ("create", "team/shapes-lora") and calls[1][:2] == ("upload", "team/shapes-lora")
    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    for folder in (out, finished_run):
        for file in folder.rglob("*"):
            if file.is_file():
                assert SECRET.encode() not in file.read_bytes(), file
    assert "team/shapes-lora" in (out / "README.md").read_text()


def test_merge_fuses_adapters_into_a_cascade_that_loads_without_peft(finished_run, tmp_path):
    from diffusers import IFPipeline

    from finetune.cascade import Cascade
    from finetune.publish import run_cascade
    from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings

    out = tmp_path / "merged"
    assert main(["merge", str(finished_run), "--out", str(out)]) == 0
    pipe = IFPipeline.from_pretrained(out / "stage_I", safety_checker=None, feature_extractor=None,
                                      watermarker=None, requires_safety_checker=False)
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())
    settings = SampleSettings(steps=2, steps_II=2)
    merged = CascadeSampler(Cascade.from_spec(str(out)), CascadeVariant()).generate(["a red star"], settings)
    base, _ = run_cascade(finished_run)
    adapters = {s: finished_run / "adapters" / f"stage_{s}" for s in ("I", "II")}
    fused = CascadeSampler(base, CascadeVariant("a", adapters=adapters)).generate(["a red star"], settings)
    assert np.abs(np.asarray(merged[0], np.int16) - np.asarray(fused[0], np.int16)).max() <= 1


def test_publish_refuses_an_unfinished_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["publish", str(tmp_path / "run")]) == 2
    assert "not a finished run" in capsys.readouterr().err
