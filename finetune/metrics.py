"""Image metrics beyond the judge: FID and KID (torchmetrics) with a pluggable feature
extractor, CLIP score from a local CLIP folder, and the validation denoising loss per stage.

Feature extractors (`eval.feature_extractor`):

- `offline` (the default; nothing to download): **kit-random-conv-v1**, a fixed convolutional
  network with seeded random weights (4 stride-2 3x3 convolutions, 32-64-128-256 channels,
  ReLU, global average pool: 256 features, inputs resized to 64x64). Random convolutional
  features are a known stand-in for Inception features (they still separate image
  distributions by colour, edges and layout), but their FID is on another scale: compare it
  only between variants and runs of this kit, never with published FIDs.
- a path to Inception weights as torch-fidelity distributes them
  (`pt_inception-2015-12-05-6726825d.pth`): the standard FID/KID network, loaded from that
  file (needs `pip install torch-fidelity` and the torchvision built for your torch:
  torch-fidelity imports it; on a CPU-only torch that is the CPU torchvision from the
  PyTorch index, PyPI's CUDA build fails to import there).

The report and eval.json name the extractor next to every FID/KID number.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UserError

OFFLINE = "offline"
OFFLINE_NAME = "kit-random-conv-v1"
INCEPTION_NEEDS = ("Inception features need torch-fidelity and a torchvision built for your torch: "
                   "pip install torch-fidelity (or use feature_extractor: offline)")


class RandomConvFeatures(torch.nn.Module):
    """kit-random-conv-v1 (see the module docstring). Takes uint8 (N, 3, H, W) images."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        widths = [3, 32, 64, 128, 256]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, stride=2, padding=1)
                                         for a, b in zip(widths, widths[1:]))
        with torch.no_grad():
            for conv in self.convs:  # He-normal weights from our own generator: same on every machine
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                conv.bias.zero_()
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float() * 2 - 1
        x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x.mean(dim=(2, 3)).double()  # torchmetrics accumulates in float64


def feature_extractor(spec: str):
    """(module, name) for eval.feature_extractor."""
    if spec == OFFLINE:
        return RandomConvFeatures(), OFFLINE_NAME
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"eval.feature_extractor: '{spec}' is neither 'offline' nor an Inception "
                        "weights file (torch-fidelity's pt_inception-2015-12-05-6726825d.pth)")
    try:  # torchmetrics defines the class either way; without torch-fidelity it fails on use
        from torchmetrics.image.fid import NoTrainInceptionV3

        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(path))
    except ImportError:
        raise UserError(f"eval.feature_extractor: {INCEPTION_NEEDS}") from None
    return network, f"inception-v3 ({path.name})"


def to_uint8(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2).contiguous()


def distribution_metrics(real, fake, extractor, kinds: list[str]) -> dict[str, float]:
    """FID and/or KID between two lists of PIL images with one feature extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real_u8, fake_u8 = to_uint8(real), to_uint8(fake)
    out = {}
    if "fid" in kinds:
        fid = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
        fid.update(real_u8, real=True)
        fid.update(fake_u8, real=False)
        out["fid"] = float(fid.compute())
    if "kid" in kinds:
        size = min(len(real_u8), len(fake_u8))
        kid = KernelInceptionDistance(feature=extractor, subsets=20, subset_size=max(2, size // 2))
        kid.update(real_u8, real=True)
        kid.update(fake_u8, real=False)
        mean, std = kid.compute()
        out["kid"], out["kid_std"] = float(mean), float(std)
    return out


def clip_score(images, prompts: list[str], folder: str) -> float:
    """torchmetrics CLIPScore with a CLIP model and processor loaded from a local folder."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"eval.clip_model: '{folder}' is not a CLIP folder (config.json missing); "
                        "give a local copy of e.g. openai/clip-vit-base-patch32")

    def load():
        model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
        return _features_as_tensors(model), CLIPProcessor.from_pretrained(path)

    metric = CLIPScore(model_name_or_path=load)
    metric.update(to_uint8(images), prompts)
    return float(metric.compute())


def _features_as_tensors(model):
    """transformers 5 returns a ModelOutput from get_image_features / get_text_features (the
    projected embedding in .pooler_output); torchmetrics 1.9 expects the tensor itself."""
    for name in ("get_image_features", "get_text_features"):
        original = getattr(model, name)

        def tensor_only(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        setattr(model, name, tensor_only)
    return model


@torch.no_grad()
def validation_loss(unet, objective, images: torch.Tensor, embeds: torch.Tensor, seed: int,
                    batch_size: int = 32) -> float:
    """Mean denoising loss of one stage's UNet on reference images with fixed noise and
    timesteps (the same draws for every variant, so the numbers compare)."""
    draws = objective.draw(tuple(images.shape), torch.Generator().manual_seed(seed))
    device = unet.device
    total = 0.0
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        loss, _ = objective.loss(unet, images[part].to(device), embeds[part].to(device, unet.dtype),
                                 {k: v[part] for k, v in draws.items()})
        total += float(loss.float().sum())
    return total / len(images)
