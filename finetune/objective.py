"""One training objective per stage: how a batch becomes UNet inputs and a loss.

Stage I (text to image):  unet(x_t, t, text)
Stage II (super-resolution, Imagen's noise-conditioning augmentation, Saharia et al. 2022 §2.4):
    low = up(down(x0))                     the previous stage's output, simulated
    low_t = image_noising_scheduler.add_noise(low, n, s),  s ~ U[aug_min, aug_max]
    unet(cat[x_t, low_t], t, text, class_labels=s)
exactly the inputs `IFSuperResolutionPipeline` builds at sampling time (it uses s = 250).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusion import (PREDICTION_TYPES, degrade_for_super_resolution, epsilon_from, min_snr_weight,
                        prediction_mse, regression_target, split_prediction, variance_vlb)
from .errors import UserError


@dataclass
class StageObjective:
    scheduler: object                       # the stage's DDPMScheduler
    image_noising_scheduler: object = None  # set for a super-resolution stage
    low_size: int | None = None             # previous stage's resolution (super-resolution)
    noise_aug_min: int = 0
    noise_aug_max: int = 999
    variance: str = "vlb"                   # "vlb" trains the learned variance; "ignore" does not
    vlb_weight: float = 1.0
    snr_gamma: float | None = None          # Min-SNR-gamma weighting of the prediction loss

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts, as the stage's scheduler config says (diffusers reads it)."""
        return self.scheduler.config.prediction_type

    @property
    def super_resolution(self) -> bool:
        return self.image_noising_scheduler is not None

    def draw(self, images_shape: tuple, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every random number one global batch needs, drawn on the CPU from `generator`.

        Drawing for the whole global batch and slicing per process makes a run's numbers
        independent of how many processes share the batch (1 vs N processes match)."""
        batch = images_shape[0]
        num_t = self.scheduler.config.num_train_timesteps
        draws = {"noise": torch.randn(images_shape, generator=generator),
                 "t": torch.randint(0, num_t, (batch,), generator=generator)}
        if self.super_resolution:
            draws["level"] = torch.randint(self.noise_aug_min, self.noise_aug_max + 1, (batch,),
                                           generator=generator)
            draws["low_noise"] = torch.randn(images_shape, generator=generator)
        return draws

    def unet_inputs(self, images: torch.Tensor, draws: dict[str, torch.Tensor]):
        """Noise a batch: returns (model_input, t, noise, x_t, unet kwargs)."""
        device, dtype = images.device, images.dtype
        noise = draws["noise"].to(device, dtype)
        t = draws["t"].to(device)
        x_t = self.scheduler.add_noise(images, noise, t)
        kwargs = {}
        model_input = x_t
        if self.super_resolution:
            low = degrade_for_super_resolution(images, self.low_size)
            level = draws["level"].to(device)
            low = self.image_noising_scheduler.add_noise(low, draws["low_noise"].to(device, dtype), level)
            model_input = torch.cat([x_t, low], dim=1)
            kwargs["class_labels"] = level
        return model_input, t, noise, x_t, kwargs

    def loss(self, unet, images: torch.Tensor, text_embeds: torch.Tensor,
             draws: dict[str, torch.Tensor]):
        """Per-sample loss (B,) and a dict of scalar metrics."""
        model_input, t, noise, x_t, kwargs = self.unet_inputs(images, draws)
        out = unet(model_input, t, encoder_hidden_states=text_embeds, **kwargs).sample
        return self.prediction_loss(out, images, noise, x_t, t)

    def _error(self, prediction: torch.Tensor, images: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        target = regression_target(self.prediction_type, self.scheduler.alphas_cumprod, images.float(),
                                   noise.float(), t)
        return prediction_mse(prediction, target)

    def prediction_error(self, out: torch.Tensor, images: torch.Tensor, noise: torch.Tensor,
                         t: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE of the UNet output's first half against its target (noise or velocity)."""
        return self._error(split_prediction(out, channels=images.shape[1])[0], images, noise, t)

    def prediction_loss(self, out: torch.Tensor, images: torch.Tensor, noise: torch.Tensor,
                        x_t: torch.Tensor, t: torch.Tensor):
        """The denoising loss of a UNet output (noise or velocity MSE, plus the learned
        variance's VLB)."""
        prediction, v = split_prediction(out, channels=images.shape[1])
        mse = self._error(prediction, images, noise, t)
        loss = mse
        if self.snr_gamma is not None:
            loss = mse * min_snr_weight(self.prediction_type, self.scheduler.alphas_cumprod, t, self.snr_gamma)
        metrics = {"loss_pred": mse.mean().detach()}  # unweighted, comparable across settings
        if v is not None and self.variance == "vlb":
            eps = epsilon_from(self.prediction_type, self.scheduler.alphas_cumprod, prediction.float(),
                               x_t.float(), t)
            vlb = variance_vlb(self.scheduler.alphas_cumprod, images.float(), x_t.float(), t,
                               eps, v.float())
            loss = loss + self.vlb_weight * vlb
            metrics["loss_vlb"] = vlb.mean().detach()
        return loss, metrics


def low_resolution(cascade, stage: str, train) -> int:
    """The size a super-resolution stage's input is degraded to: the recipe's
    `train.stage_II.low_size`, else stage I's resolution, else a quarter of this stage's."""
    if train.stage_II.low_size is not None:
        return train.stage_II.low_size
    return cascade.resolution("I") if "I" in cascade.stage_dirs else cascade.resolution(stage) // 4


def stage_objective(cascade, stage: str, train, vlb_weight: float | None = None) -> StageObjective:
    """The objective of one stage of a cascade under the recipe's `train` settings."""
    vlb_weight = train.vlb_weight if vlb_weight is None else vlb_weight
    scheduler = cascade.load_scheduler(stage)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"cascade stage {stage}: scheduler/scheduler_config.json has prediction_type"
                        f" '{scheduler.config.prediction_type}'; the kit trains {' or '.join(PREDICTION_TYPES)}")
    common = dict(variance=train.variance, vlb_weight=vlb_weight, snr_gamma=train.snr_gamma)
    if not cascade.is_super_resolution(stage):
        return StageObjective(scheduler, **common)
    return StageObjective(scheduler, cascade.load_image_noising_scheduler(stage), low_resolution(cascade, stage, train),
                          train.stage_II.noise_aug_min, train.stage_II.noise_aug_max, **common)
