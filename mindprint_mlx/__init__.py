"""mindprint-mlx: align an open LLM to one person's voice with LoRA SFT, a learned
reward model and PPO on MLX, exportable to the Hugging Face stack."""

__version__ = "0.1.0"
