"""Contrastive terms: values on hand-made inputs, hard negatives, and training integration."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import rewind_unit
from finetune.cli import main
from finetune.contrastive import DEFAULT_SWAPS, _word_swaps, denoising_contrast, info_nce
from finetune.recipe import load_recipe
from finetune.train import run_recipe
from finetune.unet_blocks import resolve_block


def _pairs(n=8, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, dim, generator=g)
    image = text + 0.1 * torch.randn(n, dim, generator=g)
    return image, text


def test_info_nce_prefers_aligned_batches_and_temperature_sharpens():
    image, text = _pairs()
    aligned = info_nce(image, text, 0.1)
    shuffled = info_nce(image, text.roll(1, dims=0), 0.1)
    assert float(aligned) < 0.05 and float(shuffled) > 0.05
    assert info_nce(image, text, 0.01) < aligned  # colder: the right pair dominates more
    assert float(info_nce(image, text, 100.0)) == pytest.approx(math.log(8.0), abs=0.02)  # hot: chance


def test_info_nce_does_not_treat_identical_captions_as_negatives():
    image, text = _pairs(4)
    text[1] = text[0]
    image[1] = image[0]
    same = torch.tensor([[a == b for b in "aabc"] for a in "aabc"])
    assert info_nce(image, text, 0.05, same) < info_nce(image, text, 0.05)


def test_denoising_contrast_lower_when_the_true_caption_denoises_best():
    right = torch.tensor([[0.10, 0.20, 0.25], [0.30, 0.50, 0.45]])
    wrong = right[:, [1, 0, 2]]
    assert denoising_contrast(right, 0.1) < denoising_contrast(wrong, 0.1)
    assert denoising_contrast(right, 0.05) < denoising_contrast(right, 0.5)
    # only relative errors matter: the scale of the error (it varies with t) does not
    assert float(denoising_contrast(right * 100, 0.1)) == pytest.approx(float(denoising_contrast(right, 0.1)))


def test_hard_negatives_swap_exactly_one_attribute_word():
    swaps = _word_swaps("two red stars", DEFAULT_SWAPS)
    assert "two blue stars" in swaps and "two red circles" in swaps and "three red stars" in swaps
    assert "two red stars" not in swaps
    assert all(sum(a != b for a, b in zip("two red stars".split(), s.split())) == 1 for s in swaps)
    assert _word_swaps("a photo", [["cat", "dog"]]) == []


def test_block_names_resolve_or_fail_clearly(tiny_cascade):
    from finetune.cascade import Cascade

    unet = Cascade.from_spec(str(tiny_cascade)).load_unet("I")
    assert resolve_block(unet, "mid") is unet.mid_block and resolve_block(unet, "up.1") is unet.up_blocks[1]
    with pytest.raises(ValueError, match="down.9"):
        resolve_block(unet, "down.9")


@pytest.mark.parametrize("kind,extra", [("feature_infonce", ""), ("denoising", ", samples: 2, negatives: 2")])
def test_training_with_each_kind_resumes_exactly_and_keeps_heads_out_of_the_adapter(recipe_factory, kind, extra):
    path = recipe_factory(steps=4, general_steps=1, out=kind,
                          extra=f"losses: {{contrastive: {{kind: {kind}, weight: 0.5, warmup_steps: 2{extra}}}}}")
    loaded = load_recipe(path, ["optim.grad_accum=2"])
    run = run_recipe(loaded).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_contrastive" in r for r in rows)
    adapter = load_file(str(run / "adapters/stage_I/pytorch_lora_weights.safetensors"))
    assert not any("contrastive" in k for k in adapter)
    state = load_file(str(run / "checkpoints/domain-stage_I-step_000004/state.safetensors"))
    assert any(k.startswith("contrastive.") for k in state) == (kind == "feature_infonce")

    # forget the last checkpoint and the result, resume from step 2: the same adapter
    rewind_unit(run, "domain-stage_I", "domain", "domain-stage_I-step_000004")
    assert main(["run", str(path), "--set", "optim.grad_accum=2", "--resume"]) == 0
    again = load_file(str(run / "adapters/stage_I/pytorch_lora_weights.safetensors"))
    assert all(torch.equal(adapter[k], again[k]) for k in adapter)  # train.deterministic: bit-exact


@pytest.mark.parametrize("kind", ["feature_infonce", "denoising"])
def test_each_kind_trains_stage_II_on_its_noise_augmented_conditioning(recipe_factory, kind):
    # stage II's UNet takes the low-resolution image as 3 more input channels and the noise
    # level as class labels: both terms must use the stage's own inputs, not stage I's
    extra = ", samples: 2, negatives: 1" if kind == "denoising" else ""
    path = recipe_factory(stages="[II]", steps=2, general_steps=1, out=kind, checkpoint_every=100,
                          extra=f"losses: {{contrastive: {{kind: {kind}, weight: 0.5{extra}}}}}")
    run = run_recipe(load_recipe(path)).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    contrast = [r["loss_contrastive"] for r in rows if r["stage"] == "II" and r["phase"] == "domain"]
    assert contrast and all(math.isfinite(v) and v > 0 for v in contrast)
    assert (run / "adapters/stage_II/pytorch_lora_weights.safetensors").exists()


def test_a_bare_off_in_yaml_means_off(recipe_factory):
    path = recipe_factory(extra="losses: {contrastive: {kind: off}}")
    assert load_recipe(path).recipe.losses.contrastive.kind == "off"
    assert load_recipe(path, ["losses.contrastive.kind=off"]).recipe.losses.contrastive.kind == "off"
