"""Cascade adaptation kit: adapt a pretrained IF-style diffusion cascade to a domain with LoRA."""
__version__ = "0.1.0"
