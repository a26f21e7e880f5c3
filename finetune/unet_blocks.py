"""Naming and capturing the blocks of a diffusers UNet2DConditionModel.

A block is named 'mid', 'down.N' or 'up.N' (N counts from the input side for down blocks and
from the bottom for up blocks, as in `unet.down_blocks` / `unet.up_blocks`). The contrastive
term pools one block's output; distillation matches block outputs of teacher and student.
"""
from __future__ import annotations

import torch


def resolve_block(unet, block: str, where: str = "losses.contrastive.block"):
    """'mid', 'down.N' or 'up.N' -> the UNet module."""
    if block == "mid":
        if unet.mid_block is None:
            raise ValueError(f"{where}: this UNet has no mid block")
        return unet.mid_block
    kind, _, index = block.partition(".")
    blocks = {"down": unet.down_blocks, "up": unet.up_blocks}.get(kind)
    if blocks is None or not index.isdigit() or int(index) >= len(blocks):
        raise ValueError(f"{where}: '{block}' is not mid, down.N or up.N of this UNet")
    return blocks[int(index)]


def block_names(unet) -> list[str]:
    names = [f"down.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid")
    return names + [f"up.{i}" for i in range(len(unet.up_blocks))]


def block_channels(unet, block: str) -> int:
    """Channels of a block's output, from the config."""
    cfg = unet.config
    if block == "mid":
        return cfg.block_out_channels[-1]
    kind, _, index = block.partition(".")
    i = int(index)
    return cfg.block_out_channels[i] if kind == "down" else list(reversed(cfg.block_out_channels))[i]


class FeatureCapture:
    """Forward hooks keeping named blocks' outputs during a forward pass (the hidden state;
    a down block's tuple of skip outputs is dropped)."""

    def __init__(self, unet, blocks: list[str] | str, where: str = "losses.contrastive.block"):
        self.names = [blocks] if isinstance(blocks, str) else list(blocks)
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [resolve_block(unet, name, where).register_forward_hook(self._keeper(name))
                        for name in self.names]

    def _keeper(self, name: str):
        def keep(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return keep

    @property
    def output(self) -> torch.Tensor:
        return self.outputs[self.names[0]]

    def pooled(self) -> torch.Tensor:
        return self.output.float().mean(dim=(-2, -1))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
