"""Models: loading with mlx-lm, multi-adapter LoRA, scalar heads, adapter files."""

from .load import ModelInfo, load, model_info

__all__ = ["ModelInfo", "load", "model_info"]
