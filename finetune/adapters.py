"""Adapters: one stage's LoRA weights in the file format stock diffusers pipelines load.

    adapters/stage_I/pytorch_lora_weights.safetensors

Keys are peft's own names under the `unet.` prefix (what `IFPipeline.save_lora_weights`
writes for a peft state dict). They are NOT passed through
`convert_state_dict_to_diffusers`: for IF's attention blocks that older key style loads only
the `add_k_proj`/`add_v_proj` layers and silently drops to_q/k/v/out (measured with
diffusers 0.42; the adapter test counts every key to catch such losses).

The safetensors metadata carries `lora_adapter_metadata` (the peft LoraConfig, read by
diffusers so rank != alpha loads with the right scale) and `finetune` (our provenance:
stage, rank, alpha, recipe hash, base cascade, data fingerprints, kit version).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .faults import crash_point
from .lora import ADAPTER_NAME

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_PREFIX = "unet."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
KIT_METADATA_KEY = "finetune"


def adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {UNET_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_adapter(unet, out_dir: str | Path, provenance: dict,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter file atomically; `state` overrides the UNet's weights (EMA)."""
    state = adapter_state_dict(unet) if state is None else state
    config = unet.peft_config[ADAPTER_NAME].to_dict()
    # diffusers stores each component's LoraConfig under its prefix ("unet.r", ...).
    config = {UNET_PREFIX + k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(config, sort_keys=True, default=str),
        KIT_METADATA_KEY: json.dumps(provenance, sort_keys=True, default=str),
    }
    target = Path(out_dir) / WEIGHT_NAME
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        crash_point("adapter-save")
    return target


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, peft config dict, provenance dict) of an adapter folder or file."""
    from .cascade import PICKLE_SUFFIXES
    from .errors import UserError

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if path.suffix in PICKLE_SUFFIXES:
        raise UserError(f"{path}: a pickle-based file; adapters are read only from safetensors"
                        " (pickle can run code when loaded)")
    if not path.is_file():
        raise UserError(f"{path}: no adapter file here (expected {WEIGHT_NAME})")
    with safe_open(path, "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata() or {}
    config = {k[len(UNET_PREFIX):]: v for k, v in
              json.loads(meta.get(DIFFUSERS_METADATA_KEY, "{}")).items() if k.startswith(UNET_PREFIX)}
    return tensors, config, json.loads(meta.get(KIT_METADATA_KEY, "{}"))


def load_adapter_weights(unet, tensors: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (as written by `save_adapter`) into a UNet that already has the
    same LoRA attached; every key must match."""
    from peft.utils import set_peft_model_state_dict

    from .errors import UserError

    state = {k[len(UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    expected = adapter_state_dict(unet)
    for key, value in state.items():
        mine = expected.get(UNET_PREFIX + key)
        if mine is None:
            raise UserError(f"adapter does not match this UNet: key {UNET_PREFIX + key} is not in it"
                            " (an adapter of another model, stage or target_modules?)")
        if mine.shape != value.shape:
            raise UserError(f"adapter does not match this UNet: {UNET_PREFIX + key} has shape "
                            f"{tuple(value.shape)}, the model expects {tuple(mine.shape)} (another rank or model?)")
    missing = sorted(set(expected) - {UNET_PREFIX + k for k in state})
    if missing:
        raise UserError(f"adapter does not match this UNet: {missing[0]} is missing from it")
    set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
