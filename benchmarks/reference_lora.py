"""The baseline: a plain diffusers + peft LoRA training loop for one IF stage, written the way
diffusers' own text-to-image / DreamBooth LoRA examples do it.

Per step it reads and decodes the batch's image files, resizes and centre-crops them, tokenizes
the captions and runs the frozen T5 encoder on them, noises the images, runs the UNet in fp32
with the default attention, and takes an AdamW step on the LoRA weights with gradient
clipping at 1.0. The loss is the examples' MSE on the first half of IF's 6-channel output
against the noise, or against the velocity when the scheduler says `v_prediction` (as the
examples do).
For stage II it builds the super-resolution conditioning as the kit does (down-sample,
up-sample, noise with the image-noising scheduler at a random level passed as class_labels),
so both loops do the same UNet work.

It shares nothing with the kit's training code on purpose; it only uses the kit to resolve a
cascade folder. `train_reference(...)` returns the wall-clock time after every step.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IF_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def _load_image(path: Path, size: int) -> torch.Tensor:
    """Resize (shorter side) + centre crop + to [-1, 1], as the examples' transforms do."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _rows(data_dir: Path) -> list[tuple[Path, str]]:
    rows = []
    for line in (data_dir / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.append((data_dir / row["file_name"], row["text"]))
    return rows


def train_reference(stage_dir: Path, text_dir: Path, data_dir: Path, batch_size: int, steps: int,
                    rank: int, seed: int = 0, low_size: int | None = None,
                    on_step=None) -> list[float]:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import AutoTokenizer, T5EncoderModel

    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(text_dir / "tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(text_dir / "text_encoder").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(stage_dir / "unet").requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(stage_dir / "scheduler")
    noising = None
    if (stage_dir / "image_noising_scheduler").exists():
        noising = DDPMScheduler.from_pretrained(stage_dir / "image_noising_scheduler")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=IF_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    rows = _rows(data_dir)
    size = unet.config.sample_size
    unet.train()
    times = []
    for step in range(steps):
        batch = random.sample(rows, batch_size)
        images = torch.stack([_load_image(path, size) for path, _ in batch])
        tokens = tokenizer([caption for _, caption in batch], padding="max_length", max_length=77,
                           truncation=True, return_tensors="pt")
        with torch.no_grad():
            embeds = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        noise = torch.randn_like(images)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy = scheduler.add_noise(images, noise, t)
        kwargs = {}
        if noising is not None:
            low = F.interpolate(images, size=low_size, mode="bilinear", antialias=True)
            low = F.interpolate(low, size=size, mode="bilinear")
            level = torch.randint(0, 1000, (batch_size,))
            low = noising.add_noise(low, torch.randn_like(low), level)
            noisy = torch.cat([noisy, low], dim=1)
            kwargs["class_labels"] = level
        pred = unet(noisy, t, encoder_hidden_states=embeds, **kwargs).sample
        prediction, _ = pred.chunk(2, dim=1)
        target = noise
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(images, noise, t)
        loss = F.mse_loss(prediction.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter())
        if on_step is not None:
            on_step(step, loss.item())
    return times
