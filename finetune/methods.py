"""What a training unit trains and what it writes: LoRA adapters (adaptation) or every UNet
weight (pretraining the builtin tiny cascade, or a distillation student).

The trainer only talks to this interface, so checkpoints, resume and the run directory work
the same for both:

    prepare(unet, stage)        freeze / attach LoRA, check the frozen fraction
    trainable(unet)             the parameters the optimizer updates
    state(unet)                 tensors a checkpoint must hold to resume exactly
    load_state(unet, tensors)   the inverse (also: start a phase from the previous phase)
    export(unet, dir, prov)     the unit's deliverable; `exported(dir)` tells it is complete
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import adapters
from .atomic import atomic_dir
from .lora import attach_lora, check_frozen_fraction, count_parameters, lora_parameters

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


class LoraMethod:
    name = "lora"
    output_folder = "adapters"  # run/adapters/stage_X: diffusers LoRA files

    def __init__(self, spec, frozen_dtype: torch.dtype | None = None):
        self.spec = spec
        self.frozen_dtype = frozen_dtype

    def prepare(self, unet, stage: str) -> None:
        spec = self.spec
        attach_lora(unet, spec.rank_for(stage), spec.alpha_for(stage), spec.dropout, spec.target_modules)
        check_frozen_fraction(count_parameters(unet), spec.min_frozen_fraction, stage)
        if self.frozen_dtype is not None:
            # Under mixed precision the frozen base is stored in the half dtype, as diffusers'
            # LoRA examples do: IF-I-XL's 4.3B weights take 8.6 GB instead of 17.2 GB. The
            # LoRA weights stay fp32, so the optimizer updates them at full precision.
            unet.to(self.frozen_dtype)
            for param in lora_parameters(unet):
                param.data = param.data.float()

    def trainable(self, unet) -> list[torch.nn.Parameter]:
        return lora_parameters(unet)

    def state(self, unet) -> dict[str, torch.Tensor]:
        return adapters.adapter_state_dict(unet)

    def load_state(self, unet, tensors: dict[str, torch.Tensor]) -> None:
        adapters.load_adapter_weights(unet, tensors)

    def load_exported(self, unet, folder: Path) -> None:
        self.load_state(unet, adapters.read_adapter(folder)[0])

    def export(self, unet, out_dir: Path, provenance: dict) -> Path:
        adapters.save_adapter(unet, out_dir, provenance)
        return out_dir

    def exported(self, out_dir: Path) -> bool:
        return (out_dir / adapters.WEIGHT_NAME).exists()

    def publish(self, src: Path, target: Path, base_stage_dir: Path | None = None) -> None:
        """Copy the last phase's adapter to the run's `adapters/stage_X/`."""
        from .atomic import atomic_path

        with atomic_path(target / adapters.WEIGHT_NAME) as tmp:
            shutil.copyfile(src / adapters.WEIGHT_NAME, tmp)


class FullMethod:
    """Every weight of the UNet trains; the deliverable is a `save_pretrained` UNet folder."""

    name = "full"
    output_folder = "cascade"  # run/cascade/stage_X: whole pipeline folders

    def prepare(self, unet, stage: str) -> None:
        unet.requires_grad_(True)

    def trainable(self, unet) -> list[torch.nn.Parameter]:
        return [p for p in unet.parameters() if p.requires_grad]

    def state(self, unet) -> dict[str, torch.Tensor]:
        return {adapters.UNET_PREFIX + k: v.detach().to("cpu").contiguous()
                for k, v in unet.state_dict().items()}

    def load_state(self, unet, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len(adapters.UNET_PREFIX):]: v for k, v in tensors.items()
                 if k.startswith(adapters.UNET_PREFIX)}
        unet.load_state_dict(state, strict=True)

    def load_exported(self, unet, folder: Path) -> None:
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(str(folder / "unet" / UNET_WEIGHTS)), strict=True)

    def export(self, unet, out_dir: Path, provenance: dict) -> Path:
        with atomic_dir(out_dir / "unet") as tmp:
            unet.save_pretrained(tmp, safe_serialization=True)
            (tmp / "finetune.json").write_text(json.dumps(provenance, indent=2, sort_keys=True,
                                                          default=str))
        return out_dir

    def exported(self, out_dir: Path) -> bool:
        return (out_dir / "unet" / UNET_WEIGHTS).exists()

    def publish(self, src: Path, target: Path, base_stage_dir: Path | None = None) -> None:
        """The trained stage as a whole pipeline folder: the base stage's components with the
        trained UNet, so `IFPipeline.from_pretrained(target)` loads it."""
        with atomic_dir(target) as tmp:
            shutil.copytree(base_stage_dir, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("unet"))
            shutil.copytree(src / "unet", tmp / "unet")


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_method(recipe, device_type: str = "cpu"):
    """The recipe's method. On a GPU, mixed precision also stores LoRA's frozen base in the
    half dtype; on CPU it stays fp32 (CPU autocast leaves layer norms to the weights' dtype,
    so a bf16 base fails there, and CPU memory is not the limit this saves)."""
    if recipe.method == "full":
        return FullMethod()
    frozen = HALF_DTYPES.get(recipe.train.mixed_precision) if device_type == "cuda" else None
    return LoraMethod(recipe.lora, frozen)
