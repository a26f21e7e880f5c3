"""LoRA on a stage's UNet through peft (diffusers' `add_adapter`), and parameter accounting."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

ADAPTER_NAME = "default"


@dataclass
class ParamCounts:
    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def frozen_fraction(self) -> float:
        return self.frozen / self.total if self.total else 1.0


def count_parameters(model) -> ParamCounts:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamCounts(total, trainable)


def unmatched_targets(model, target_modules: list[str]) -> list[str]:
    """Targets that match no module (peft matches by name suffix)."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in target_modules
            if not any(n == t or n.endswith("." + t) for n in names)]


def lora_config(rank: int, alpha: float, dropout: float, target_modules: list[str]):
    from peft import LoraConfig

    # Gaussian A and zero B: the adapted model starts exactly at the base model.
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target_modules), init_lora_weights="gaussian")


def attach_lora(unet, rank: int, alpha: float, dropout: float, target_modules: list[str],
                where: str = "lora.target_modules"):
    """Freeze the UNet and add a LoRA adapter; returns the peft LoraConfig."""
    missing = unmatched_targets(unet, target_modules)
    if missing:
        raise UserError(f"{where}: {', '.join(missing)} match no module of this UNet; "
                        "IF attention uses to_q, to_k, to_v, to_out.0, add_k_proj, add_v_proj")
    unet.requires_grad_(False)
    config = lora_config(rank, alpha, dropout, target_modules)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    return config


def lora_parameters(unet):
    return [p for n, p in unet.named_parameters() if p.requires_grad and "lora_" in n]


def check_frozen_fraction(counts: ParamCounts, minimum: float, stage: str) -> None:
    if counts.frozen_fraction < minimum:
        raise UserError(
            f"lora: stage {stage} would train {counts.trainable:,} of {counts.total:,} parameters "
            f"({counts.frozen_fraction:.1%} frozen, below lora.min_frozen_fraction={minimum}); "
            "lower lora.rank, target fewer modules, or lower lora.min_frozen_fraction")
