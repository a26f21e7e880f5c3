"""Sampling with a LoRA adapter fused into the UNet's weights against peft's unfused layers.

The kit fuses each stage's adapter before sampling (`CascadeSampler`, `fuse=True`): the LoRA
update is added to the base weights once, so a denoising step costs what the base's does.
Unfused, peft runs the low-rank matmuls (and, with convolution targets, low-rank convolutions)
beside every adapted layer at every step. This times both, interleaved, on an adapter shaped
like the quickstart's (its ranks and target modules, random non-zero weights), and checks
that they draw the same images.

    python benchmarks/fused_lora.py                    # builtin:tiny, whole cascade, 16 images
    python benchmarks/fused_lora.py --stages I --reps 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def quickstart_like_adapters(cascade, stages: list[str], out: Path, recipe_path: Path, seed: int = 0) -> dict:
    """One adapter folder per stage with the recipe's LoRA ranks and targets; the weights are
    random (LoRA B is zero at initialisation, which would make fusing a no-op)."""
    import torch

    from finetune import adapters
    from finetune.lora import attach_lora, lora_parameters
    from finetune.recipe import load_recipe

    spec = load_recipe(recipe_path, check_resources=False).recipe.lora
    torch.manual_seed(seed)
    folders = {}
    for stage in stages:
        unet = cascade.load_unet(stage)
        attach_lora(unet, spec.rank_for(stage), spec.alpha_for(stage), 0.0, spec.target_modules)
        with torch.no_grad():
            for p in lora_parameters(unet):
                p.normal_(0.0, 0.02)
        adapters.save_adapter(unet, out / stage, {"stage": stage})
        folders[stage] = out / stage
    return folders


def time_sampling(cascade_spec: str, stages: list[str], reps: int, images: int, steps: int,
                  steps_II: int, recipe_path: Path) -> dict:
    """Median seconds to sample `images` images, fused and unfused, and the largest pixel
    difference between what the two drew (0-255 scale)."""
    import numpy as np

    from finetune.cascade import Cascade
    from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings

    cascade = Cascade.from_spec(cascade_spec)
    folders = quickstart_like_adapters(cascade, stages, Path(tempfile.mkdtemp(prefix="fused-")), recipe_path)
    variant = CascadeVariant("adapted", adapters=folders)
    samplers = {fuse: CascadeSampler(cascade, variant, stages=stages, fuse=fuse) for fuse in (True, False)}
    prompts = ["two red circles at the top"] * images
    settings = SampleSettings(steps=steps, steps_II=steps_II, batch_size=images)
    for sampler in samplers.values():  # warm-up: first-call allocations are not sampling time
        sampler.generate(prompts[:2], SampleSettings(steps=2, steps_II=2))
    drawn, times = {}, {True: [], False: []}
    for _ in range(max(reps, 1)):
        for fuse, sampler in samplers.items():
            started = time.perf_counter()
            drawn[fuse] = sampler.generate(prompts, settings)
            times[fuse].append(time.perf_counter() - started)
    difference = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
                     for a, b in zip(drawn[True], drawn[False]))
    return {"fused_s": statistics.median(times[True]), "unfused_s": statistics.median(times[False]),
            "max_pixel_difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cascade", default="builtin:tiny")
    parser.add_argument("--stages", nargs="+", default=["I", "II"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--steps-II", type=int, default=10)
    parser.add_argument("--recipe", type=Path, default=HERE.parent / "recipes" / "quickstart.yaml",
                        help="the recipe whose LoRA ranks and targets the adapter copies")
    args = parser.parse_args(argv)
    result = time_sampling(args.cascade, args.stages, args.reps, args.images, args.steps,
                           args.steps_II, args.recipe)
    print(f"Sampling {args.images} images, stages {'+'.join(args.stages)} ({args.steps} stage I steps, "
          f"{args.steps_II} stage II steps), median of {args.reps}; adapter shaped like {args.recipe.name}'s\n")
    print("| LoRA at sampling | seconds | vs unfused |\n|---|---|---|")
    print(f"| unfused (peft layers) | {result['unfused_s']:.2f} | 1.00x |")
    print(f"| fused (the kit) | {result['fused_s']:.2f} | {result['unfused_s'] / result['fused_s']:.2f}x |")
    print(f"\nlargest pixel difference between the two: {result['max_pixel_difference']} of 255")
    return 0


if __name__ == "__main__":
    sys.exit(main())
