"""FID/KID with the offline extractor, CLIP score from a tiny local CLIP, validation loss per
stage, and all of them in a run's eval.json and report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.cli import main
from finetune.metrics import RandomConvFeatures, clip_score, distribution_metrics


def build_tiny_clip(folder: Path) -> Path:
    """A random CLIP with the transformers classes, saved like a hub folder (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    words = ("a red green blue yellow purple orange circle circles square squares triangle triangles star"
             " stars cross crosses two three at the top bottom left right center middle").split()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1} | {w + "</w>": i + 2 for i, w in enumerate(words)}
    bpe = Tokenizer(models.BPE(vocab, [], unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = CLIPTokenizerFast(tokenizer_object=bpe, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = CLIPConfig(projection_dim=16, text_config=dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1), vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8))
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _split_images(split: str, n: int, seed: int):
    from data_tools.synth import SPLITS, random_scene, render

    rng = np.random.default_rng(seed)
    spec = SPLITS[split]
    return [render(random_scene(rng, spec["shapes"], spec["colours"]), 32, rng) for _ in range(n)]


def test_offline_extractor_is_fixed_and_fid_kid_rank_distributions():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(RandomConvFeatures()(images), RandomConvFeatures()(images))
    assert RandomConvFeatures()(images).shape == (4, 256)

    real = _split_images("general", 48, 1)
    same_world = _split_images("general", 48, 2)
    other_world = _split_images("domain", 48, 3)
    extractor = RandomConvFeatures()
    identical = distribution_metrics(real, real, extractor, ["fid"])
    near = distribution_metrics(real, same_world, extractor, ["fid", "kid"])
    far = distribution_metrics(real, other_world, extractor, ["fid", "kid"])
    assert identical["fid"] < 1e-3
    assert near["fid"] < far["fid"] and near["kid"] < far["kid"]
    assert far["kid_std"] >= 0


def test_clip_score_from_a_local_folder_matches_the_model(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = build_tiny_clip(tmp_path / "clip")
    images = _split_images("general", 6, 4)
    prompts = ["a red circle", "two blue squares", "a green triangle at the top", "three yellow circles",
               "a red square at the bottom left", "a blue circle"]
    got = clip_score(images, prompts, str(folder))
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert got == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-3)
    with pytest.raises(Exception, match="not a CLIP folder"):
        clip_score(images, prompts, str(tmp_path))


def test_eval_json_and_report_carry_fid_kid_clip_and_validation_loss_per_stage(recipe_factory, tmp_path):
    clip = build_tiny_clip(tmp_path / "clip")
    path = recipe_factory(stages="[I, II]", steps=2, extra=f"""eval:
  prompt_sets: {{held: "synth:domain?n=6"}}
  sample: {{steps: 2, steps_II: 2}}
  clip_model: {clip}
""")
    assert main(["run", str(path)]) == 0
    run = path.parent / "run"
    results = json.loads((run / "eval.json").read_text())["results"]["held"]
    for variant in ("base", "adapted"):
        r = results[variant]
        assert {"fid", "kid", "kid_std", "clip_score", "val_loss_I", "val_loss_II", "overall"} <= set(r)
        assert r["extractor"] == "kit-random-conv-v1"
        assert all(np.isfinite(r[k]) for k in ("fid", "kid", "clip_score", "val_loss_I", "val_loss_II"))
    # the adapter changes stage I's weights, so its denoising loss on the same draws changes too
    assert results["base"]["val_loss_I"] != results["adapted"]["val_loss_I"]
    report = (run / "report.md").read_text()
    assert "| overall | fid | kid | clip_score | val_loss_I | val_loss_II | n |" in report
    assert "kit-random-conv-v1" in report


@pytest.mark.parametrize("extra,expected", [
    ("eval: {prompt_sets: {held: 'synth:domain?n=2'}, feature_extractor: /nope/inception.pth}", "eval.feature_extractor"),
    ("eval: {prompt_sets: {held: 'synth:domain?n=2'}, clip_model: /nope}", "eval.clip_model"),
    ("eval: {prompt_sets: {held: 'synth:domain?n=2'}, reference_images: {other: /tmp}}", "no prompt set named 'other'"),
])
def test_missing_metric_inputs_are_named_before_training(recipe_factory, capsys, extra, expected):
    path = recipe_factory(extra=extra)
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_reference_images_from_a_data_folder(synth_general):
    from finetune.evaluate import References

    refs = References.for_folder(str(synth_general), "eval.reference_images.held")
    assert len(refs.captions) == 24
    assert refs.at(64).shape == (24, 3, 64, 64) and refs.at(32).shape == (24, 3, 32, 32)
    assert len(refs.pil(32)) == 24 and refs.pil(32)[0].size == (32, 32)
    with pytest.raises(Exception, match="does not exist"):
        References.for_folder(str(synth_general / "nope"), "eval.reference_images.held")


def test_inception_weights_file_reaches_torchmetrics_and_names_the_numbers(tmp_path, monkeypatch):
    """The Inception path up to torchmetrics: the user's file is what NoTrainInceptionV3 loads
    and the extractor's name in eval.json carries the file name. (The real network needs
    torch-fidelity and a torchvision built for this torch; PyPI's torchvision is CUDA-built
    and does not import next to the CPU torch here, so a stand-in network takes its place.)"""
    import inspect

    import torchmetrics.image.fid as fid

    from finetune.metrics import feature_extractor

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"weights")
    loaded = []
    real_signature = inspect.signature(fid.NoTrainInceptionV3)

    class StandIn(RandomConvFeatures):
        def __init__(self, *args, **kwargs):
            super().__init__()
            call = real_signature.bind(*args, **kwargs)  # the real class accepts the kit's call
            loaded.append((call.arguments["name"], call.arguments["features_list"],
                           call.arguments["feature_extractor_weights_path"]))

    monkeypatch.setattr(fid, "NoTrainInceptionV3", StandIn)
    network, name = feature_extractor(str(weights))
    assert loaded == [("inception-v3-compat", ["2048"], str(weights))]
    assert name == "inception-v3 (pt_inception-2015-12-05-6726825d.pth)"
    real, fake = _split_images("general", 12, 1), _split_images("domain", 12, 2)
    assert distribution_metrics(real, fake, network, ["fid"])["fid"] > 0


def test_inception_without_torch_fidelity_is_a_clear_error(tmp_path, monkeypatch, recipe_factory, capsys):
    import importlib.util

    import torchmetrics.image.fid as fid

    from finetune.errors import UserError
    from finetune.metrics import feature_extractor

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")

    class Missing:  # what torchmetrics' class does when torch-fidelity is absent
        def __init__(self, *args, **kwargs):
            raise ModuleNotFoundError("NoTrainInceptionV3 module requires that `Torch-fidelity` is installed")

    monkeypatch.setattr(fid, "NoTrainInceptionV3", Missing)
    with pytest.raises(UserError, match="eval.feature_extractor: Inception features need torch-fidelity"):
        feature_extractor(str(weights))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch_fidelity" else real(n, *a))
    path = recipe_factory(extra=f"eval: {{prompt_sets: {{held: 'synth:domain?n=2'}}, feature_extractor: {weights}}}")
    assert main(["validate", str(path)]) == 2
    assert "eval.feature_extractor: Inception features need torch-fidelity" in capsys.readouterr().err
