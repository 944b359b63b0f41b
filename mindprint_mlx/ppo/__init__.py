"""PPO for language models on one base in memory: pure math, rollouts, the trainer."""

from .advantages import gae, kl_penalized_rewards, masked_mean, masked_var, masked_whiten
from .kl import AdaptiveKLController, FixedKLController, kl_estimate
from .losses import entropy_from_logits, ppo_losses
from .rollout import Generation, generate_batch, response_forward
from .trainer import PPOConfig, PPOResult, PPOTrainer, base_weight_bytes, train_ppo

__all__ = ["AdaptiveKLController", "FixedKLController", "Generation", "PPOConfig", "PPOResult",
           "PPOTrainer", "base_weight_bytes", "entropy_from_logits", "gae", "generate_batch",
           "kl_estimate", "kl_penalized_rewards", "masked_mean", "masked_var", "masked_whiten",
           "ppo_losses", "response_forward", "train_ppo"]
