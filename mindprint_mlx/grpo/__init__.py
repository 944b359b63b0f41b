"""Critic-free policy optimisation on one base in memory: GRPO (and Dr. GRPO, DAPO's token
averaging) and RLOO, pure math and the trainer."""

from .advantages import group_advantages, group_std_is_zero, rloo_advantages
from .losses import GRPO_LOSS_TYPES, grpo_loss, k3_kl, loss_denominator
from .trainer import GRPOConfig, GRPOResult, GRPOTrainer, train_grpo

__all__ = ["GRPOConfig", "GRPOResult", "GRPOTrainer", "GRPO_LOSS_TYPES", "group_advantages",
           "group_std_is_zero", "grpo_loss", "k3_kl", "loss_denominator", "rloo_advantages",
           "train_grpo"]
