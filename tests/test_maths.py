"""Schedule and diffusion maths on hand-made tensors."""
from __future__ import annotations

import math

import pytest
import torch

from finetune.diffusion import (degrade_for_super_resolution, epsilon_from, gaussian_kl, min_snr_weight,
                                prediction_mse, regression_target, variance_vlb)
from finetune.schedule import step_decay_lr


def test_step_decay_defaults():
    lr = lambda s: step_decay_lr(s, 1e-4, 1e-5, 50_000)  # noqa: E731
    assert lr(0) == 1e-4 and lr(49_999) == 1e-4
    assert lr(50_000) == pytest.approx(1e-5) and lr(200_000) == pytest.approx(1e-5)


def test_step_decay_factor_floor_and_warmup():
    assert step_decay_lr(25, 1e-3, 1e-6, 10, factor=10) == pytest.approx(1e-5)
    assert step_decay_lr(95, 1e-3, 5e-5, 10, factor=10) == 5e-5
    assert step_decay_lr(0, 1e-4, 1e-5, 100, warmup_steps=4) == pytest.approx(2.5e-5)
    assert step_decay_lr(4, 1e-4, 1e-5, 100, warmup_steps=4) == 1e-4


def test_gaussian_kl_known_values():
    zero = torch.zeros(1)
    assert gaussian_kl(zero, zero, zero, zero).item() == 0.0
    # KL(N(1,1) || N(0,1)) = 0.5
    assert gaussian_kl(torch.ones(1), zero, zero, zero).item() == pytest.approx(0.5)


def _schedule():
    from finetune.cascade import if_scheduler

    return if_scheduler().alphas_cumprod


def test_vlb_zero_when_mean_and_variance_are_right():
    abar = _schedule()
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 20])  # early steps, where beta_t and the posterior variance differ
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    # v = -1 selects exactly the posterior variance; the true noise gives the true mean.
    vlb = variance_vlb(abar, x0, x_t, t, noise, -torch.ones_like(x0))
    assert vlb.abs().max().item() < 1e-4
    worse = variance_vlb(abar, x0, x_t, t, noise, torch.ones_like(x0))
    assert (worse > 1e-3).all()


def test_vlb_is_zero_at_t0_and_only_trains_variance():
    abar = _schedule()
    x0 = torch.randn(2, 3, 4, 4)
    eps = torch.randn_like(x0, requires_grad=True)
    v = torch.zeros_like(x0, requires_grad=True)
    vlb = variance_vlb(abar, x0, x0.clone(), torch.tensor([0, 300]), eps, v)
    assert vlb[0].item() == 0.0
    vlb.sum().backward()
    assert eps.grad is None  # the mean is stopped (Improved DDPM, Section 3.1)
    assert v.grad.abs().sum() > 0


def test_super_resolution_conditioning_is_blurred_same_size():
    img = torch.zeros(1, 3, 16, 16)
    img[..., ::2, :] = 1.0  # stripes at the highest frequency vanish at half resolution
    low = degrade_for_super_resolution(img, 8)
    assert low.shape == img.shape
    assert low.std().item() < img.std().item() / 4
    assert math.isclose(low.mean().item(), img.mean().item(), abs_tol=0.05)


def test_velocity_target_and_its_noise_follow_diffusers_conventions():
    """The kit's velocity target is the scheduler's get_velocity, and a perfect velocity
    prediction gives back the clean image through the stock DDPMScheduler's step (so what
    is trained is what diffusers samples with)."""
    from finetune.cascade import if_scheduler

    scheduler = if_scheduler("v_prediction")
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([40, 900])
    x_t = scheduler.add_noise(x0, noise, t)
    velocity = regression_target("v_prediction", scheduler.alphas_cumprod, x0, noise, t)
    assert torch.allclose(velocity, scheduler.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.allclose(epsilon_from("v_prediction", scheduler.alphas_cumprod, velocity, x_t, t), noise, atol=1e-4)
    assert regression_target("epsilon", scheduler.alphas_cumprod, x0, noise, t) is noise
    with pytest.raises(ValueError, match="sample"):
        regression_target("sample", scheduler.alphas_cumprod, x0, noise, t)
    scheduler.set_timesteps(1000)
    for i in range(2):
        out = torch.cat([velocity[i:i + 1], torch.zeros_like(x0[i:i + 1])], dim=1)  # + learned variance
        step = scheduler.step(out, int(t[i]), x_t[i:i + 1], generator=torch.Generator().manual_seed(0))
        assert torch.allclose(step.pred_original_sample, x0[i:i + 1], atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighted_loss_is_the_clean_image_error_weighted_min_snr_gamma(prediction_type):
    """Hang et al. 2023: whatever the UNet predicts, the weighted loss is min(SNR, gamma) times
    the squared error of the clean image the prediction implies."""
    from finetune.cascade import if_scheduler

    scheduler = if_scheduler(prediction_type)
    abar_all = scheduler.alphas_cumprod
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 200, 600, 990])  # SNR from far above gamma to far below it
    x_t = scheduler.add_noise(x0, noise, t)
    target = regression_target(prediction_type, abar_all, x0, noise, t)
    prediction = target + 0.1 * torch.randn_like(target)
    gamma = 5.0
    weighted = prediction_mse(prediction, target) * min_snr_weight(prediction_type, abar_all, t, gamma)

    abar = abar_all[t].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        x0_hat = (x_t - (1 - abar).sqrt() * prediction) / abar.sqrt()
    else:
        x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * prediction
    snr = (abar / (1 - abar)).view(-1)
    expected = snr.clamp(max=gamma) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    assert (snr[0] > gamma) and (snr[-1] < 1)
    assert torch.allclose(weighted, expected, rtol=1e-3)
