"""Adapters load in stock diffusers pipelines: every tensor, and the trained outputs exactly.

A table of (stage, target modules, rank, alpha) cases through one shared check."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from finetune import adapters
from finetune.lora import attach_lora

ALL = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
CASES = [
    ("I", ALL, 4, 4.0),
    ("I", ALL, 4, 8.0),           # rank != alpha: the scale must survive the round trip
    ("I", ["to_q", "to_v"], 2, 1.0),
    ("II", ALL, 8, 16.0),
    ("II", ["add_k_proj", "add_v_proj"], 4, 2.0),
    ("I", ALL + ["conv1", "conv2"], 4, 8.0),  # the quickstart's targets: resnet convs too
]


def _perturbed_lora_unet(cascade_dir, stage, targets, rank, alpha):
    from finetune.cascade import Cascade

    unet = Cascade.from_spec(str(cascade_dir)).load_unet(stage)
    attach_lora(unet, rank, alpha, 0.0, targets)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero; give the adapter a visible effect
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return unet.eval()


def _inputs(stage, size):
    gen = torch.Generator().manual_seed(1)
    channels = 6 if stage == "II" else 3
    kwargs = {"class_labels": torch.tensor([250, 100])} if stage == "II" else {}
    return (torch.randn(2, channels, size, size, generator=gen), torch.tensor([10, 700]),
            torch.randn(2, 77, 32, generator=gen), kwargs)


@pytest.mark.parametrize("stage,targets,rank,alpha", CASES)
def test_adapter_loads_in_stock_pipeline(tiny_cascade, tmp_path, stage, targets, rank, alpha):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    unet = _perturbed_lora_unet(tiny_cascade, stage, targets, rank, alpha)
    out_dir = tmp_path / f"stage_{stage}"
    path = adapters.save_adapter(unet, out_dir, {"stage": stage, "rank": rank, "alpha": alpha})

    with safe_open(path, "pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
    assert keys == set(adapters.adapter_state_dict(unet))
    assert '"unet.r": %d' % rank in meta[adapters.DIFFUSERS_METADATA_KEY]

    cls = IFSuperResolutionPipeline if stage == "II" else IFPipeline
    pipe = cls.from_pretrained(tiny_cascade / f"stage_{stage}")
    base_lora = sum(1 for n, _ in pipe.unet.named_parameters() if "lora_" in n)
    assert base_lora == 0
    pipe.load_lora_weights(out_dir)
    loaded = {n for n, _ in pipe.unet.named_parameters() if "lora_" in n}
    assert len(loaded) == len(keys), "every tensor of the adapter file must be loaded"

    x, t, text, kwargs = _inputs(stage, unet.config.sample_size)
    pipe.unet.eval()
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=text, **kwargs).sample
        got = pipe.unet(x, t, encoder_hidden_states=text, **kwargs).sample
        base = pipe.unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={"scale": 0.0},
                         **kwargs).sample
    assert (expected - got).abs().max().item() < 1e-5
    assert (expected - base).abs().max().item() > 1e-3, "the adapter must change the outputs"


def test_read_adapter_returns_provenance(tiny_cascade, tmp_path):
    unet = _perturbed_lora_unet(tiny_cascade, "I", ALL, 4, 8.0)
    adapters.save_adapter(unet, tmp_path, {"recipe_hash": "abc", "stage": "I"})
    tensors, config, provenance = adapters.read_adapter(tmp_path)
    assert provenance == {"recipe_hash": "abc", "stage": "I"}
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert len(tensors) == len(adapters.adapter_state_dict(unet))
