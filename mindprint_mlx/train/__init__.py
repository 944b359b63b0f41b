"""Trainers: LoRA SFT and the reward model.

`train_sft(model, tokenizer, records, SFTConfig(...), out_dir)` and
`train_reward_model(model, tokenizer, pairs, RewardConfig(...), out_dir)`; a trained reward
model scores responses through `RewardModel.load(model, tokenizer, dir)`. Both run on one
training loop (`train.loop.TrainingLoop`).
"""

from .reward import RewardConfig, RewardModel, RewardResult, train_reward_model
from .sft import SFTConfig, SFTResult, train_sft

__all__ = ["RewardConfig", "RewardModel", "RewardResult", "SFTConfig", "SFTResult", "train_reward_model",
           "train_sft"]
