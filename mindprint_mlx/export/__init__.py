"""Exports: PEFT adapters, fused Hugging Face checkpoints, hub upload."""
