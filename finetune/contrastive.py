"""Contrastive text-image terms built from the cascade itself (no CLIP is downloaded).

Two formulations (`losses.contrastive.kind`):

feature_infonce
    z_i = normalize(W_img · pool(h_i)),  u_j = normalize(W_txt · pool(c_j))
    where h_i is the output of one UNet block (`block`) for the noisy training image i (a
    forward hook on the same forward pass as the diffusion loss: no extra UNet evaluation),
    pool is a spatial mean, and pool(c_j) is the mean of caption j's cached T5 embedding
    over its positions. With logits s_ij = z_i·u_j / tau, the symmetric InfoNCE is
        L = 1/2 [ CE(s_i·, i) + CE(s_·j, j) ]   averaged over the micro-batch.
    The two linear heads are trained with the LoRA weights, saved in checkpoints (exact
    resume) and never exported with the adapter. Negatives are the other captions of the
    process's micro-batch (per-process; not gathered across processes). Captions repeated in
    a batch are masked out of each other's negatives.

denoising
    The training-time form of a diffusion classifier. For a sample i with noise eps_i at
    timestep t_i, the error under caption j is
        e_ij = mean || eps_theta(x_t,i, t_i, c_j) - eps_i ||^2
    and, with each row scaled by its mean (the error scale varies with t), the logits are
    -e_ij / (mean_j e_ij * tau) with the true caption as the target:
        L_i = CE(-[e_i0, e_i1, ..., e_iK] / (mean_j e_ij * tau), 0)
    over the true caption (j = 0) and K negatives: other captions of the batch, or hard
    negatives (the caption with one attribute word swapped, see `hard_negatives`). It costs
    (K + 1) extra UNet evaluations per contrasted sample, so only `samples` samples of each
    micro-batch are contrasted (bounded cost; the diffusion loss still uses all).

The total loss is  diffusion + w(step) * contrastive,  with w ramped linearly from 0 to
`weight` over `warmup_steps`.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .unet_blocks import FeatureCapture, block_channels

DEFAULT_SWAPS = [
    ["red", "green", "blue", "yellow", "purple", "orange"],
    ["circle", "square", "triangle", "star", "cross"],
    ["a", "two", "three"],
    ["left", "right", "center"],
    ["top", "middle", "bottom"],
]


def info_nce(image: torch.Tensor, text: torch.Tensor, temperature: float,
             same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised image and text vectors (B, D). `same[i, j]`
    marks pairs with identical captions, which are not negatives of each other."""
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    logits = image @ text.T / temperature
    if same is not None:
        off_diagonal = same & ~torch.eye(len(same), dtype=torch.bool, device=same.device)
        logits = logits.masked_fill(off_diagonal, float("-inf"))
    target = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def denoising_contrast(errors: torch.Tensor, temperature: float) -> torch.Tensor:
    """errors (B, 1 + K): column 0 under the true caption, then K negatives. Each row is
    divided by its mean first, so the temperature acts on relative errors (the raw error
    scale changes by orders of magnitude with the timestep)."""
    errors = errors.float()
    logits = -(errors / errors.mean(dim=1, keepdim=True).clamp(min=1e-8)) / temperature
    return F.cross_entropy(logits, torch.zeros(len(errors), dtype=torch.long, device=errors.device))


def _word_swaps(caption: str, swaps: list[list[str]]) -> list[str]:
    """Every caption that differs from `caption` in exactly one attribute word (plurals kept)."""
    words = re.findall(r"\S+", caption)
    out = []
    for i, word in enumerate(words):
        stem, plural = (word[:-1], "s") if word.endswith("s") and word[:-1] in _all(swaps) else (word, "")
        for group in swaps:
            if stem in group:
                out += [" ".join(words[:i] + [other + plural] + words[i + 1:]) for other in group if other != stem]
    return out


def _all(swaps) -> set[str]:
    return {w for group in swaps for w in group}


def hard_negatives(caption: str, swaps: list[list[str]], count: int, generator: torch.Generator) -> list[str]:
    options = _word_swaps(caption, swaps)
    if not options:
        return []
    picks = torch.randperm(len(options), generator=generator)[:count].tolist()
    return [options[p] for p in picks]


def all_hard_negatives(captions: list[str], swaps: list[list[str]]) -> set[str]:
    """Every negative caption training may ask for (their embeddings are cached up front)."""
    return {n for c in set(captions) for n in _word_swaps(c, swaps)}


class ProjectionHeads(torch.nn.Module):
    def __init__(self, image_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image = torch.nn.Linear(image_dim, dim)
        self.text = torch.nn.Linear(text_dim, dim)


def contrastive_weight(spec, step: int) -> float:
    if spec.warmup_steps <= 0:
        return spec.weight
    return spec.weight * min(1.0, (step + 1) / spec.warmup_steps)


class ContrastiveTerm:
    """The recipe's contrastive term for one training unit (see the module docstring)."""

    PREFIX = "contrastive."

    def __init__(self, spec, unet, text_dim: int, seed: int):
        self.spec = spec
        self.heads = None
        self.capture = None
        self.swaps = spec.swap_words or DEFAULT_SWAPS
        self.seed = seed
        if spec.kind == "feature_infonce":
            torch.manual_seed(seed)
            self.heads = ProjectionHeads(block_channels(unet, spec.block), text_dim, spec.projection_dim)
            self.capture = FeatureCapture(unet, spec.block)

    def to(self, device):
        if self.heads is not None:
            self.heads.to(device)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.heads.parameters()) if self.heads is not None else []

    def state(self) -> dict[str, torch.Tensor]:
        if self.heads is None:
            return {}
        return {self.PREFIX + k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.heads is not None:
            self.heads.load_state_dict({k[len(self.PREFIX):]: v for k, v in tensors.items()
                                        if k.startswith(self.PREFIX)})

    def close(self) -> None:
        if self.capture is not None:
            self.capture.remove()

    def loss(self, model, objective, images, embeds, texts: list[str], draws, text_cache,
             generator: torch.Generator) -> torch.Tensor:
        """The term for one micro-batch; for feature_infonce call it right after the
        diffusion forward pass (it reads the captured block output)."""
        if self.spec.kind == "feature_infonce":
            pooled_text = embeds.float().mean(dim=1)
            same = torch.tensor([[a == b for b in texts] for a in texts], device=embeds.device)
            return info_nce(self.heads.image(self.capture.pooled()), self.heads.text(pooled_text),
                            self.spec.temperature, same)
        return self._denoising(model, objective, images, embeds, texts, draws, text_cache, generator)

    def _denoising(self, model, objective, images, embeds, texts, draws, text_cache, generator):
        n = min(self.spec.samples, len(texts))
        chosen = torch.randperm(len(texts), generator=generator)[:n].tolist()
        k = self.spec.negatives
        negatives = []
        for i in chosen:
            options = hard_negatives(texts[i], self.swaps, k, generator) if self.spec.hard_negatives else []
            others = [t for t in texts if t != texts[i]]
            while len(options) < k and others:
                options.append(others[int(torch.randint(len(others), (1,), generator=generator))])
            while len(options) < k:  # a batch of one caption and no swappable word
                options.append("")
            negatives.append(options)
        sub = {key: v[chosen] for key, v in draws.items()}
        model_input, t, noise, _, kwargs = objective.unet_inputs(images[chosen], sub)
        errors = []
        for j in range(k + 1):
            cond = embeds[chosen] if j == 0 else text_cache.get([neg[j - 1] for neg in negatives]).to(embeds.device, embeds.dtype)
            out = model(model_input, t, encoder_hidden_states=cond, **kwargs).sample
            errors.append(objective.prediction_error(out, images[chosen], noise, t))
        return denoising_contrast(torch.stack(errors, dim=1), self.spec.temperature)
