"""Which attention kernel makes a LoRA training step of a cascade's UNet fastest on this machine.

Times one training step (forward, backward, AdamW) of a LoRA-adapted UNet of `builtin:tiny`
at batch 16 under each kernel, interleaved (A, B, C, A, B, C, ...) so drift in the machine's
speed hits every kernel alike, and prints the median milliseconds per step:

- sdpa:     diffusers' default processor, torch's scaled_dot_product_attention, free to pick
            its fused kernel (on a CPU: the flash-attention kernel)
- sdpa-math: the same processor with SDPA held to its reference (math) implementation
- classic:  diffusers' pre-2.0 processor (baddbmm, softmax, bmm as separate operators)

    python benchmarks/attention_kernels.py --stage I [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KERNELS = ("sdpa", "sdpa-math", "classic")


def kernel_context(kernel: str):
    """The context a step runs in for `kernel` (only sdpa-math needs one)."""
    if kernel != "sdpa-math":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def build_step(stage: str, kernel: str, batch: int, rank: int, compile_unet: bool = False):
    """A closure running one LoRA training step of the stage's UNet with `kernel`; it returns
    the step's loss. Weights and inputs are seeded alike for every kernel."""
    import torch
    from diffusers.models.attention_processor import AttnAddedKVProcessor
    from peft import LoraConfig

    from finetune.cascade import Cascade

    torch.manual_seed(0)
    cascade = Cascade.from_spec("builtin:tiny")
    unet = cascade.load_unet(stage).requires_grad_(False)
    if kernel == "classic":
        unet.set_attn_processor(AttnAddedKVProcessor())
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model = torch.compile(unet) if compile_unet else unet
    config = unet.config
    size, channels = config.sample_size, config.in_channels
    x = torch.randn(batch, channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, 77, cascade.text_dim())
    kwargs = {"class_labels": torch.randint(0, 1000, (batch,))} if channels == 6 else {}

    def step() -> float:
        with kernel_context(kernel):
            out = model(x, t, encoder_hidden_states=text, **kwargs).sample
            loss = out.float().pow(2).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="I")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per kernel per round")
    parser.add_argument("--compile", action="store_true", help="torch.compile each UNet (inductor)")
    args = parser.parse_args()

    steps = {}
    for kernel in KERNELS:
        steps[kernel] = build_step(args.stage, kernel, args.batch, args.rank, args.compile)
        for _ in range(2):  # warm-up (and compilation)
            steps[kernel]()
    timings = {kernel: [] for kernel in KERNELS}
    for _ in range(args.rounds):
        for kernel in KERNELS:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[kernel]()
            timings[kernel].append((time.perf_counter() - start) / args.steps * 1000)
    base = statistics.median(timings["sdpa"])
    print(f"stage {args.stage}, batch {args.batch}, LoRA rank {args.rank}, compiled: {args.compile}; "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print("| kernel | ms per step | vs sdpa |")
    print("|---|---|---|")
    for kernel in KERNELS:
        ms = statistics.median(timings[kernel])
        print(f"| {kernel} | {ms:.0f} | {base / ms:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
