"""Diffusion maths for IF-style pixel UNets, as small pure functions.

IF UNets predict 6 channels: epsilon (3) and a variance interpolation value v (3), read by
diffusers' `DDPMScheduler(variance_type="learned_range")` as

    log var = f * log(beta_t) + (1 - f) * log(clamp(beta~_t, 1e-20)),  f = (v + 1) / 2

(Nichol & Dhariwal 2021, "Improved DDPM", eq. 15, in diffusers' clamped form). Training only
the epsilon half would leave v drifting under LoRA (it shares every weight), and the stock
scheduler would then sample with a wrong variance. So by default v is trained with the
Improved-DDPM hybrid objective: MSE on epsilon plus the variational bound term L_t, with the
mean stopped from receiving its gradient (their Section 3.1), in bits per dimension, weight 1
per timestep (equivalent to their lambda = 0.001 on the full sum over 1000 steps).

The first half is epsilon for IF itself; a cascade whose scheduler says
`prediction_type: v_prediction` predicts the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0
instead (Salimans & Ho 2022), as diffusers' schedulers read it. Its loss weights the clean
image's error at high noise, where an epsilon model's small errors become large errors in
the image's mean colour (docs/quickstart.md, session 7).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def split_prediction(model_output: torch.Tensor, channels: int = 3):
    """(eps, v) from a 6-channel IF prediction; v is None for a 3-channel model."""
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels], model_output[:, channels:]
    return model_output, None


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(t.device)[t].float()
    return out.view(-1, *([1] * (ndim - 1)))


def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check(prediction_type: str) -> None:
    # stage_objective refuses other types with a user-facing message; this guards direct calls
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def regression_target(prediction_type: str, alphas_cumprod: torch.Tensor, x0: torch.Tensor,
                      noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet's first half is trained to output: the noise, or the velocity."""
    if prediction_type == "epsilon":
        return noise
    _check(prediction_type)
    abar = _gather(alphas_cumprod, t, x0.ndim)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def min_snr_weight(prediction_type: str, alphas_cumprod: torch.Tensor, t: torch.Tensor,
                   gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weight (Hang et al. 2023, diffusers' `--snr_gamma`).

    Every timestep's loss becomes the clean image's squared error weighted min(SNR, gamma):
    low-noise steps, whose SNR is large, stop dominating the gradient, and training spends
    its updates on the noisier steps where the layout and the shapes are decided. An epsilon
    loss is SNR times x0's error, a velocity loss SNR + 1 times it, hence the two divisors."""
    _check(prediction_type)
    abar = alphas_cumprod.to(t.device)[t].float()
    snr = abar / (1.0 - abar)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)


def epsilon_from(prediction_type: str, alphas_cumprod: torch.Tensor, prediction: torch.Tensor,
                 x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise a prediction implies (the variance bound is written in epsilon):
    eps = sqrt(abar) v + sqrt(1 - abar) x_t for a velocity."""
    if prediction_type == "epsilon":
        return prediction
    _check(prediction_type)
    abar = _gather(alphas_cumprod, t, x_t.ndim)
    return abar.sqrt() * prediction + (1 - abar).sqrt() * x_t


def clean_from_epsilon(alphas_cumprod: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                       eps: torch.Tensor) -> torch.Tensor:
    """The clean image x0 a noise estimate implies: (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    abar = _gather(alphas_cumprod, t, x_t.ndim)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def variance_vlb(alphas_cumprod: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample L_t (bits/dim) of the learned-range variance, mean fixed by `eps` (detached).

    Zero at t = 0: the stock scheduler adds no noise at the last step, so the variance there
    never affects a sample.
    """
    nd = x0.ndim
    abar_t = _gather(alphas_cumprod, t, nd)
    abar_prev = _gather(alphas_cumprod, (t - 1).clamp(min=0), nd)
    abar_prev = torch.where(_gather_mask(t, nd), abar_prev, torch.ones_like(abar_prev))
    beta_t = 1 - abar_t / abar_prev
    post_var = (1 - abar_prev) / (1 - abar_t) * beta_t
    post_logvar = torch.log(post_var.clamp(min=1e-20))
    coef_x0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
    coef_xt = (1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)
    true_mean = coef_x0 * x0 + coef_xt * x_t
    x0_pred = clean_from_epsilon(alphas_cumprod, x_t, t, eps.detach())
    model_mean = coef_x0 * x0_pred + coef_xt * x_t
    frac = (v + 1) / 2
    model_logvar = frac * torch.log(beta_t) + (1 - frac) * post_logvar
    kl = gaussian_kl(true_mean, post_logvar, model_mean, model_logvar)
    kl = kl.flatten(1).mean(1) / math.log(2.0)
    return torch.where(t > 0, kl, torch.zeros_like(kl))


def _gather_mask(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return (t > 0).view(-1, *([1] * (ndim - 1)))


def prediction_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of the prediction (Ho et al. 2020, L_simple)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def degrade_for_super_resolution(images: torch.Tensor, low_size: int) -> torch.Tensor:
    """The conditioning a super-resolution stage sees: the target image down-sampled to the
    previous stage's size, then up-sampled back the way `IFSuperResolutionPipeline` does
    (bilinear, align_corners=True)."""
    size = images.shape[-1]
    low = F.interpolate(images, size=(low_size, low_size), mode="bilinear", antialias=True,
                        align_corners=False)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)
