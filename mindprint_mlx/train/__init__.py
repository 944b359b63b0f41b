"""Trainers: LoRA SFT and the reward model."""
