"""Trainers: LoRA SFT and the reward model.

`train_sft(model, tokenizer, records, SFTConfig(...), out_dir)` and
`train_reward_model(model, tokenizer, pairs, RewardConfig(...), out_dir)`; a trained reward
model scores responses through `RewardModel.load(model, tokenizer, dir)`.
"""

from ..errors import Interrupted
from ..stop import request_stop, stop_requested
from .reward import RewardConfig, RewardModel, RewardResult, train_reward_model
from .sft import SFTConfig, SFTResult, train_sft

__all__ = ["Interrupted", "request_stop", "stop_requested", "RewardConfig", "RewardModel",
           "RewardResult", "SFTConfig", "SFTResult", "train_reward_model", "train_sft"]
