"""Preference learning on one base in memory: the DPO loss, DPO on pairs, and DITTO
(online DPO of the person's demonstrations over the model's own samples)."""

from .ditto import DITTOConfig, DITTOResult, DITTOTrainer, train_ditto
from .dpo import DPOConfig, DPOResult, DPOTrainer, EncodedPair, encode_pairs, train_dpo
from .losses import DPO_LOSS_TYPES, dpo_loss, rpo_nll, sequence_logps

__all__ = ["DITTOConfig", "DITTOResult", "DITTOTrainer", "DPOConfig", "DPOResult", "DPOTrainer",
           "DPO_LOSS_TYPES", "EncodedPair", "dpo_loss", "encode_pairs", "rpo_nll", "sequence_logps",
           "train_ditto", "train_dpo"]
