"""IF-I-XL-shaped stage I LoRA training on one GPU: images/s, peak GPU memory and model FLOP
utilisation (issue 9's GPU half).

    python benchmarks/gpu_if_xl.py                      # on a GPU: batch 4 at 64px, bf16, checkpointing
    python benchmarks/gpu_if_xl.py --peak-tflops 989    # MFU against this dense bf16 peak
    python benchmarks/gpu_if_xl.py --scale 0.0625 --steps 3 --warmup 1   # CPU smoke run (the test)

The UNet has DeepFloyd IF-I-XL's structure with random weights (nothing is downloaded): the
published `unet/config.json` of DeepFloyd/IF-I-XL-v1.0 (704 model channels with multipliers
1-2-3-4, three residual blocks per level, attention at 32, 16 and 8 pixels with 64-channel
heads, 2816-d cross-attention fed by a projection of T5-XXL's 4096-d text). `--scale`
narrows the channels (the CPU smoke run); at scale 1 the parameter count is printed and
checked against the published 4.3B.

The step is the kit's: `LoraMethod` on the kit's default targets (frozen base stored in
bf16, LoRA weights fp32), `StageObjective` (epsilon MSE + learned-variance VLB), bf16
autocast, gradient checkpointing, AdamW on the LoRA weights, and text embeddings taken as
already cached (T5-XXL-shaped, 77 x 4096), as the kit's text cache serves them.

FLOPs of one training step are counted by `torch.utils.flop_counter` on a real step
(forward, backward and recomputation under checkpointing all count: that is the work the
GPU does, so "hardware" FLOP utilisation). MFU counts model FLOPs only: 3x the forward's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IF_I_XL_PARAMETERS = 4.3e9  # published size of IF-I-XL's UNet
TEXT_DIM = 4096  # T5-XXL's hidden size: what the text cache holds for IF


def if_i_xl_config(scale: float = 1.0) -> dict:
    """IF-I-XL's UNet2DConditionModel config, channels multiplied by `scale` (rounded to
    multiples of the 64-channel head and of 32 norm groups)."""
    def width(c):
        return max(64, int(round(c * scale / 64)) * 64)

    channels = [width(704 * m) for m in (1, 2, 3, 4)]
    return dict(
        sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
        block_out_channels=channels,
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                          "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
        up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                        "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=64,
        cross_attention_dim=channels[-1], encoder_hid_dim=TEXT_DIM, encoder_hid_dim_type="text_proj",
        cross_attention_norm="group_norm",
        addition_embed_type="text", addition_embed_type_num_heads=64, act_fn="gelu",
        resnet_time_scale_shift="scale_shift", upcast_attention=False, use_linear_projection=False)


def build_unet(scale: float, device):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**if_i_xl_config(scale)).to(device)


def count_on_meta(scale: float = 1.0) -> int:
    """Parameters of the config without allocating them (instant even at 4.3B)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**if_i_xl_config(scale)).parameters())


def run(args) -> dict:
    import torch
    from diffusers import DDPMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    from finetune.methods import LoraMethod
    from finetune.objective import StageObjective
    from finetune.recipe.schema import LoraSpec

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else None  # CPU autocast cannot run a bf16 base (methods.make_method)
    torch.manual_seed(0)
    unet = build_unet(args.scale, device)
    method = LoraMethod(LoraSpec(rank=args.rank, alpha=args.rank, min_frozen_fraction=0.9), dtype)
    method.prepare(unet, "I")
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = method.trainable(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = StageObjective(DDPMScheduler(variance_type="learned_range", beta_schedule="squaredcos_cap_v2"))
    objective.scheduler.alphas_cumprod = objective.scheduler.alphas_cumprod.to(device)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch, 3, 64, 64, generator=generator) * 2 - 1).to(device)
    text = torch.randn(args.batch, 77, TEXT_DIM, generator=generator).to(device)

    def step():
        draws = objective.draw(tuple(images.shape), generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = objective.loss(unet, images, text, draws)
            loss = loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    with FlopCounterMode(display=False) as counter:
        step()
    step_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        draws = objective.draw(tuple(images.shape), generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            objective.loss(unet, images, text, draws)
    model_flops = 3 * counter.get_total_flops()  # forward + backward (2x forward)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "scale": args.scale, "parameters": sum(p.numel() for p in unet.parameters()),
        "trainable": sum(p.numel() for p in params), "batch": args.batch, "steps": args.steps,
        "gradient_checkpointing": args.checkpointing, "seconds_per_step": seconds,
        "images_per_s": args.batch / seconds, "peak_gpu_memory_gib": peak,
        "step_tflop": step_flops / 1e12, "model_tflop": model_flops / 1e12,
        "achieved_tflops": step_flops / seconds / 1e12,
    }
    if args.peak_tflops:
        result["hfu"] = result["achieved_tflops"] / args.peak_tflops
        result["mfu"] = model_flops / seconds / 1e12 / args.peak_tflops
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="channel width multiplier (1 = IF-I-XL)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (H100 SXM and H200: 989)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.scale >= 1:
        count = count_on_meta(args.scale)
        print(f"IF-I-XL-shaped UNet: {count / 1e9:.2f}B parameters (published: 4.3B)")
        if abs(count - IF_I_XL_PARAMETERS) > 0.1 * IF_I_XL_PARAMETERS:
            print("error: the config does not match IF-I-XL's size", file=sys.stderr)
            return 1
    result = run(args)
    for key, value in result.items():
        print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
