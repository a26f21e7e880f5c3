"""The shipped pretrained tiny cascade: it loads as `builtin:tiny`, is small, and samples
images the judge recognises (well above chance) through the stock pipelines."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors import safe_open

from finetune.cascade import SHIPPED_DIR, Cascade
from finetune.evaluate import judge_images, load_prompt_set
from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings


def test_shipped_weights_are_fp16_safetensors_and_small():
    files = list((SHIPPED_DIR / "tiny").rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "text_encoder"}
    assert sum(f.stat().st_size for f in files) < 16e6
    with safe_open(files[0], "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype.is_floating_point
    assert not list((SHIPPED_DIR / "tiny").rglob("*.bin"))
    card = (SHIPPED_DIR / "tiny" / "README.md").read_text()
    assert "How it was made" in card and "recipes/pretrain-tiny.yaml" in card
    # the card names the run each shipped stage comes from (export's stage_paths rule)
    assert "stage I from `pretrain-tiny-count`, stage II from `pretrain-tiny`" in card


def test_builtin_tiny_samples_recognisable_images():
    cascade = Cascade.from_spec("builtin:tiny")
    assert cascade.resolution("I") == 32 and cascade.resolution("II") == 64
    assert cascade.load_unet("I").dtype.is_floating_point
    prompts = load_prompt_set("synth:general?n=16&seed=11")
    settings = SampleSettings(steps=20, steps_II=10, batch_size=16)
    images = CascadeSampler(cascade, CascadeVariant(), stages=["I"]).generate([p.text for p in prompts], settings)
    scores = judge_images(images, prompts)
    # chance: colour 1/6, shape 1/5, overall 1/30; the card reports the full numbers (stage I
    # is the better-judged output of this tiny cascade: its stage II adds noise). Here the
    # shipped stage I scores 100% / 100% / 81% overall; session 6's scored 56% colour.
    assert scores["colour"] >= 0.8 and scores["shape"] >= 0.7 and scores["overall"] >= 0.5, scores
    full = CascadeSampler(cascade, CascadeVariant()).generate([p.text for p in prompts[:2]], settings)
    assert full[0].size == (64, 64)
    assert all(np.asarray(img, dtype=np.float32).std() > 5 for img in full)  # not blank


def test_the_card_follows_a_chain_of_pretraining_runs(tmp_path):
    from finetune.builtin_tiny import _history, run_chain

    def fake_run(name, cascade_path, seconds, stage_paths="{}"):
        run = tmp_path / name
        (run / "cascade").mkdir(parents=True)
        (run / "finished.json").write_text(f'{{"seconds": {seconds}}}')
        (run / "resolved_recipe.yaml").write_text(
            f"name: {name}\ncascade: {{path: '{cascade_path}', stage_paths: {stage_paths}}}\n"
            "optim: {lr: {start: 0.0005, end: 5.0e-05, decay_every: 2500}}\n"
            "phases: [{name: p, steps: {I: 10, II: 5}}]\n")
        return run

    first = fake_run("pretrain-tiny", "builtin:tiny-init", 100)
    second = fake_run("pretrain-tiny-anneal", str(first / "cascade"), 50)
    assert run_chain(second) == [first, second]
    assert run_chain(first) == [first]
    how, commands, recipes = _history(run_chain(second))
    assert how.startswith("150 s in total, in 2 run(s): `pretrain-tiny` (100 s: stage I 10, stage II 5 steps")
    assert commands.splitlines() == ["finetune run recipes/pretrain-tiny.yaml",
                                     "finetune run recipes/pretrain-tiny-anneal.yaml",
                                     f"python -m finetune.builtin_tiny export {second}"]
    assert recipes.count("```yaml") == 2 and "name: pretrain-tiny-anneal" in recipes
    # one step count for every stage is also a valid recipe
    text = (first / "resolved_recipe.yaml").read_text().replace("{I: 10, II: 5}", "7")
    (first / "resolved_recipe.yaml").write_text(text)
    assert "(100 s: 7 per stage steps" in _history([first])[0]
    # a run that takes one stage from a finished run (stage_paths) lists it before itself, once
    third = fake_run("pretrain-tiny-attn16", "builtin:tiny-init-attn16", 70,
                     stage_paths=f"{{II: '{second / 'cascade' / 'stage_II'}'}}")
    assert run_chain(third) == [first, second, third]


def _fake_stage(folder):
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    return folder


def test_export_ships_untrained_stages_only_from_finished_runs(tmp_path):
    from finetune.builtin_tiny import untrained_stages
    from finetune.errors import UserError

    source = tmp_path / "first"
    _fake_stage(source / "cascade" / "stage_II")
    (source / "finished.json").write_text('{"seconds": 1}')
    random_base = tmp_path / "init"
    _fake_stage(random_base / "stage_I")
    _fake_stage(random_base / "stage_II")
    run = tmp_path / "second"
    _fake_stage(run / "cascade" / "stage_I")   # the only stage this run trained

    def recipe(stage_paths):
        (run / "resolved_recipe.yaml").write_text(
            f"name: second\ncascade: {{path: '{random_base}', stage_paths: {stage_paths}}}\n")

    recipe(f"{{II: '{source / 'cascade' / 'stage_II'}'}}")
    assert untrained_stages(run) == {"II": source / "cascade" / "stage_II"}
    recipe("{}")   # stage II would be the random base's
    with pytest.raises(UserError, match="stage II was not trained by this run.*cascade.stage_paths.II"):
        untrained_stages(run)


def test_the_card_describes_each_unet_from_its_files(tmp_path):
    from conftest import copy_predicting
    from finetune.builtin_tiny import unet_summary

    shipped = SHIPPED_DIR / "tiny"
    assert unet_summary(shipped / "stage_II") == "UNet of 0.8M parameters, attention at 16px, predicts noise"
    stage_i = unet_summary(shipped / "stage_I")
    assert stage_i.startswith("UNet of 2.2M parameters, attention at ") and "8 and 4px, predicts " in stage_i
    velocity = copy_predicting(shipped / "stage_II", tmp_path / "stage_II", "v_prediction")
    assert unet_summary(velocity).endswith("attention at 16px, predicts velocity (v-prediction)")


def test_shipped_stage_i_sets_the_mean_colour_right_at_high_noise():
    """The velocity-predicting stage I implies the clean image's mean colour within a few
    levels at t = 950, where the sampler fixes it (docs/quickstart.md, session 7: 4.3/255;
    session 6's noise-predicting stage I was off by 40.5 and drew tinted backgrounds)."""
    import sys
    from pathlib import Path

    from data_tools.synth import synth_prompts

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from mean_colour_error import clean_image_errors, drawn_images

    scenes = synth_prompts("synth:general?n=8&seed=7")
    errors = clean_image_errors(Cascade.from_spec("builtin:tiny"), drawn_images(scenes, 32),
                                [s.caption() for s in scenes])
    assert errors[950] < 12, errors
