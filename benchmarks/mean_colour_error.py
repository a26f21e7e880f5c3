"""How far a stage I UNet's estimate of the clean image is off in mean colour, per noise level,
and how far its samples' backgrounds drift from the training data's plain grey.

A sampler fixes an image's mean colour in its first, noisiest steps; later steps treat it as
signal. An epsilon-predicting model's small noise errors at high noise become large errors
in the image it implies (divided by sqrt(alpha_bar), 13x at t = 950), so its samples come out
tinted. This measures both ends of that story for any cascade:

- per timestep: |mean colour of the predicted clean image - true mean colour|, in 0-255 units
  per channel, on held-out general images (same noise for every cascade);
- sampled: the mean |background - grey| (0-255 units, summed over RGB) of stage I samples of
  held-out general prompts (the judge reads the background from the border).

    python benchmarks/mean_colour_error.py builtin:tiny /tmp/tiny-vpred
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TIMESTEPS = (950, 900, 800, 700, 500, 300)


def drawn_images(scenes, size: int):
    """The scenes drawn at `size`, as a [-1, 1] batch (seeded: the same for every cascade)."""
    import numpy as np
    import torch

    from data_tools.synth import render

    rng = np.random.default_rng(0)
    return torch.stack([torch.from_numpy(np.asarray(render(s, size, rng), np.float32) / 127.5 - 1)
                        .permute(2, 0, 1) for s in scenes])


def clean_image_errors(cascade, images, captions) -> dict[int, float]:
    """{t: mean-colour error of the predicted clean image (0-255 per channel)} for stage I."""
    import torch

    from finetune.diffusion import clean_from_epsilon, epsilon_from, split_prediction
    from finetune.text_cache import MAX_LENGTH

    unet = cascade.load_unet("I").float().eval()
    scheduler = cascade.load_scheduler("I")
    tokens = cascade.load_tokenizer()(captions, padding="max_length", max_length=MAX_LENGTH,
                                      truncation=True, return_tensors="pt")
    errors = {}
    with torch.no_grad():
        text = cascade.load_text_encoder()(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        for step in TIMESTEPS:
            t = torch.full((len(images),), step)
            noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(step))
            x_t = scheduler.add_noise(images, noise, t)
            prediction, _ = split_prediction(unet(x_t, t, encoder_hidden_states=text).sample)
            eps = epsilon_from(scheduler.config.prediction_type, scheduler.alphas_cumprod, prediction, x_t, t)
            x0 = clean_from_epsilon(scheduler.alphas_cumprod, x_t, t, eps)
            errors[step] = float((x0.mean((2, 3)) - images.mean((2, 3))).abs().mean() * 127.5)
    return errors


def background_drift(cascade, captions) -> float:
    """Mean summed-RGB distance of stage I samples' backgrounds from the plain grey."""
    import numpy as np

    from data_tools.judge import background_colour
    from data_tools.synth import BACKGROUND
    from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings

    sampler = CascadeSampler(cascade, CascadeVariant("base"), stages=["I"])
    images = sampler.generate(captions, SampleSettings(steps=20, guidance_scale=4.0, batch_size=32))
    grey = np.array(BACKGROUND, np.float32)
    return float(np.mean([np.abs(background_colour(np.asarray(i)) - grey).sum() for i in images]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cascades", nargs="+", help="cascade locations (builtin:tiny, a folder)")
    parser.add_argument("--n", type=int, default=32, help="held-out general images / prompts")
    args = parser.parse_args()

    from data_tools.synth import synth_prompts
    from finetune.cascade import Cascade

    scenes = synth_prompts(f"synth:general?n={args.n}&seed=7")
    captions = [scene.caption() for scene in scenes]
    print("| cascade | predicts | " + " | ".join(f"t={t}" for t in TIMESTEPS) + " | sampled background drift |")
    print("|---" * (len(TIMESTEPS) + 3) + "|")
    for location in args.cascades:
        cascade = Cascade.from_spec(location)
        errors = clean_image_errors(cascade, drawn_images(scenes, cascade.resolution("I")), captions)
        drift = background_drift(cascade, captions)
        predicts = cascade.load_scheduler("I").config.prediction_type
        print(f"| {location} | {predicts} | " + " | ".join(f"{errors[t]:.1f}" for t in TIMESTEPS)
              + f" | {drift:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
