"""Sampling through the whole cascade with the stock diffusers pipelines.

`CascadeSampler` loads `IFPipeline` (stage I) and `IFSuperResolutionPipeline` (stage II) from
the cascade's stage folders, shares one text encoder between them, applies each stage's
adapter (fused at the requested scale: no LoRA overhead per step; `fuse=False` keeps peft's
layers, as `benchmarks/fused_lora.py` compares) or swaps in a student UNet,
and generates stage I then stage II for a list of prompts, in batches, from a seed.

Each prompt i uses its own generator seeded (seed, i), so image i is the same whatever the
batch size and whichever variant (base, adapted, student) draws it: before/after grids and
evaluations compare like with like.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .cascade import Cascade
from .errors import UserError


@dataclass
class SampleSettings:
    steps: int = 50                  # stage I denoising steps
    steps_II: int = 25               # stage II denoising steps
    guidance_scale: float = 4.0
    guidance_scale_II: float = 4.0
    noise_level: int = 250           # stage II noise augmentation of the stage I image (IF's default)
    negative_prompt: str | None = None
    seed: int = 0
    batch_size: int = 16
    adapter_scale: float = 1.0


@dataclass
class CascadeVariant:
    """What to sample: the base cascade, plus per stage an adapter folder or a student UNet folder."""
    name: str = "base"
    adapters: dict[str, Path] = field(default_factory=dict)
    unets: dict[str, Path] = field(default_factory=dict)


def _generators(seed: int, start: int, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed * 1_000_003 + start + i) for i in range(count)]


class CascadeSampler:
    def __init__(self, cascade: Cascade, variant: CascadeVariant, stages: list[str] | None = None,
                 device: str | torch.device = "cpu", adapter_scale: float = 1.0, fuse: bool = True):
        from diffusers import IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
        from diffusers.utils import logging as diffusers_logging

        # Loading IF LoRA files warns that the text encoder has no LoRA keys: by design here.
        diffusers_logging.set_verbosity_error()
        self.stages = stages or [s for s in ("I", "II") if s in cascade.stage_dirs]
        if "I" not in self.stages:
            raise UserError("sampling needs stage I (text to image); the cascade has none")
        text_encoder = cascade.load_text_encoder()
        tokenizer = cascade.load_tokenizer()
        self.pipes = {}
        kinds = {"I": IFPipeline, "II": IFSuperResolutionPipeline}
        for stage in self.stages:
            extra = {}
            if stage in variant.unets:
                extra["unet"] = UNet2DConditionModel.from_pretrained(variant.unets[stage],
                                                                     use_safetensors=True)
            pipe = kinds[stage].from_pretrained(
                cascade.stage_dirs[stage], text_encoder=text_encoder, tokenizer=tokenizer,
                safety_checker=None, feature_extractor=None, watermarker=None,
                requires_safety_checker=False, use_safetensors=True, **extra)
            if stage in variant.adapters:
                pipe.load_lora_weights(str(variant.adapters[stage]), adapter_name="adapted")
                if fuse:
                    pipe.fuse_lora(components=["unet"], lora_scale=adapter_scale)
                    pipe.unload_lora_weights()  # the fused weights stay; peft layers go
                else:  # peft's LoRA layers stay and run beside the base at every step
                    pipe.set_adapters(["adapted"], adapter_weights=[adapter_scale])
            pipe.set_progress_bar_config(disable=True)
            self.pipes[stage] = pipe.to(device)
        self.device = device

    @torch.no_grad()
    def generate(self, prompts: list[str], settings: SampleSettings, progress=None) -> list[Image.Image]:
        """Images of the last stage, one per prompt, as PIL."""
        from diffusers.utils import pt_to_pil

        images: list[Image.Image] = []
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start:start + settings.batch_size]
            negative = [settings.negative_prompt] * len(batch) if settings.negative_prompt else None
            embeds, negative_embeds = self.pipes["I"].encode_prompt(
                batch, do_classifier_free_guidance=True, num_images_per_prompt=1,
                device=self.device, negative_prompt=negative, clean_caption=False)
            out = self.pipes["I"](
                prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                generator=_generators(settings.seed, start, len(batch)), output_type="pt").images
            if "II" in self.pipes:
                out = self.pipes["II"](
                    image=out, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                    num_inference_steps=settings.steps_II, guidance_scale=settings.guidance_scale_II,
                    noise_level=settings.noise_level,
                    generator=_generators(settings.seed + 1, start, len(batch)), output_type="pt").images
            images.extend(pt_to_pil(out))
            if progress is not None:
                progress.update(len(batch))
        return images


def image_grid(images: list[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (same size) into one picture, row by row."""
    if not images:
        raise ValueError("no images to tile")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return grid
