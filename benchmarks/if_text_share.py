"""What share of a plain IF stage I training step is the T5-XXL text encoding that the kit's
text cache removes, counted in FLOPs on the meta device (nothing is allocated or downloaded).

    python benchmarks/if_text_share.py

A plain loop (benchmarks/reference_lora.py, diffusers' LoRA examples) runs the frozen encoder
on every batch; the kit encodes each caption once, before step 1. The UNet is IF-I-XL's
config (benchmarks/gpu_if_xl.py), the encoder T5 v1.1-XXL's (the encoder IF ships). A LoRA
step costs about 2x the UNet's forward (the backward computes input gradients of the frozen
layers, not their weight gradients), 3x with gradient checkpointing (the forward is redone).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_if_xl import TEXT_DIM, if_i_xl_config  # noqa: E402

T5_V1_1_XXL = dict(d_model=TEXT_DIM, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                   feed_forward_proj="gated-gelu", vocab_size=32128)
TOKENS = 77  # IF pads every caption to 77 tokens


def forward_flops(scale: float = 1.0) -> dict:
    """FLOPs of one sample's forward: IF-I-XL's UNet at 64px and T5-XXL's encoder on 77 tokens
    (`scale` narrows both, for the test)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5Config, T5EncoderModel

    t5 = dict(T5_V1_1_XXL)
    if scale != 1.0:
        t5.update(d_model=max(64, int(t5["d_model"] * scale)), d_ff=max(64, int(t5["d_ff"] * scale)),
                  num_layers=2)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(if_i_xl_config(scale), encoder_hid_dim=t5["d_model"]))
        encoder = T5EncoderModel(T5Config(**t5))
        with FlopCounterMode(display=False) as counter:
            unet(torch.randn(1, 3, 64, 64), torch.tensor([500]),
                 encoder_hidden_states=torch.randn(1, TOKENS, t5["d_model"]))
        unet_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            encoder(input_ids=torch.zeros(1, TOKENS, dtype=torch.long))
        text_flops = counter.get_total_flops()
    return {"unet_forward": unet_flops, "text_forward": text_flops}


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    f = forward_flops()
    print(f"IF-I-XL UNet forward, one 64px image: {f['unet_forward'] / 1e12:.2f} TFLOP")
    print(f"T5-XXL encoder forward, one 77-token caption: {f['text_forward'] / 1e12:.2f} TFLOP")
    for name, factor in (("LoRA step", 2), ("LoRA step, gradient checkpointing", 3)):
        step = factor * f["unet_forward"]
        print(f"{name}: text encoding is {f['text_forward'] / (step + f['text_forward']):.1%} of a plain loop's FLOPs per sample")
    return 0


if __name__ == "__main__":
    sys.exit(main())
