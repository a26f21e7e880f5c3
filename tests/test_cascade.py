"""Cascades load from the IF layout, per-stage paths or the local hub cache; never download."""
from __future__ import annotations

import pytest

from finetune.cascade import Cascade
from finetune.errors import UserError


def test_tiny_cascade_loads_in_stock_pipelines(tiny_cascade):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    stage_i = IFPipeline.from_pretrained(tiny_cascade / "stage_I")
    stage_ii = IFSuperResolutionPipeline.from_pretrained(tiny_cascade / "stage_II")
    assert stage_i.unet.config.out_channels == 6 and stage_i.unet.config.in_channels == 3
    assert stage_ii.unet.config.in_channels == 6 and stage_ii.unet.config.class_embed_type == "timestep"
    assert stage_ii.image_noising_scheduler is not None
    embeds, _ = stage_i.encode_prompt("a red circle", do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77, 32)


def test_folder_and_per_stage_paths(tiny_cascade):
    cascade = Cascade.from_spec(str(tiny_cascade))
    assert set(cascade.stage_dirs) == {"I", "II"}
    assert cascade.resolution("I") == 32 and cascade.resolution("II") == 64
    assert cascade.is_super_resolution("II") and not cascade.is_super_resolution("I")
    only_ii = Cascade.from_spec(None, {"II": str(tiny_cascade / "stage_II")})
    assert set(only_ii.stage_dirs) == {"II"}
    assert only_ii.load_tokenizer()("a red circle").input_ids[-1] == 1  # T5's </s>


def test_hub_id_missing_from_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        Cascade.from_spec(None, {"I": "DeepFloyd/IF-I-XL-v1.0"})
    message = str(info.value)
    assert "DeepFloyd/IF-I-XL-v1.0" in message and "not in the local hub cache" in message


def test_hub_id_found_in_local_cache(monkeypatch, tmp_path, tiny_cascade):
    # Lay the tiny stage out as a hub cache snapshot: models--org--name/snapshots/<sha>/...
    import shutil

    hub = tmp_path / "hub"
    repo = hub / "models--acme--tiny-if"
    sha = "0" * 40
    shutil.copytree(tiny_cascade / "stage_I", repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    cascade = Cascade.from_spec(None, {"I": "acme/tiny-if"})
    assert cascade.resolution("I") == 32


def test_missing_folder_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Cascade.from_spec(str(tmp_path / "nope"))
