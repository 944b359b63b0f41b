"""Scalar heads (value, reward) over the trunk of an mlx-lm model.

mlx-lm models expose the transformer trunk as `model.model(tokens)` (hidden states
after the final norm) and the output layer as `model.lm_head`, or the tied embedding
`model.model.embed_tokens.as_linear`. One trunk pass gives both logits and the hidden
states the heads read, so PPO's policy and value cost one forward pass.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import MindprintError


class ScalarHead(nn.Module):
    """hidden (..., H) -> scalar (...). Zero-initialised (OpenAI's value head) or
    normal with std 1/sqrt(H + 1) (the reward head of lm-human-preferences).

    bias=False: no bias at all. The reward head has none: a Bradley-Terry loss depends
    on score differences only, so it cannot train a bias (and transformers' `score`
    layer has no place for one)."""

    def __init__(self, hidden_size: int, zero_init: bool = True, bias: bool = True):
        super().__init__()
        # Built with a bias either way, so that a seed draws the same initial weight with
        # or without one (nn.Linear's init draws both); a bias-free head then drops it.
        self.summary = nn.Linear(hidden_size, 1)
        if zero_init:
            self.summary.weight = mx.zeros_like(self.summary.weight)
        else:
            self.summary.weight = mx.random.normal(self.summary.weight.shape) / math.sqrt(hidden_size + 1)
        if bias:
            self.summary.bias = mx.zeros_like(self.summary.bias)
        else:
            del self.summary["bias"]

    @property
    def bias_value(self) -> float:
        """The head's bias as a float (0.0 for a head without one)."""
        if "bias" not in self.summary:
            return 0.0
        return float(self.summary.bias.astype(mx.float32).reshape(-1)[0].item())

    def __call__(self, hidden: mx.array) -> mx.array:
        return self.summary(hidden.astype(mx.float32)).squeeze(-1)


def hidden_size(model: nn.Module) -> int:
    args = getattr(model, "args", None)
    for key in ("hidden_size", "dim", "d_model", "n_embd"):
        v = getattr(args, key, None)
        if isinstance(v, int):
            return v
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if emb is not None:
        return emb.weight.shape[-1] * (32 // emb.bits if isinstance(emb, nn.QuantizedEmbedding) else 1)
    raise MindprintError(f"cannot tell the hidden size of {type(model).__module__}")


def hidden_states(model: nn.Module, tokens: mx.array, cache=None) -> mx.array:
    """The trunk's output (after the final norm), (B, T, H)."""
    return model.model(tokens, cache=cache)


def lm_logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """The model's output layer applied to trunk states, as `model(tokens)` does."""
    if "lm_head" in model:
        logits = model.lm_head(hidden)
    else:
        logits = model.model.embed_tokens.as_linear(hidden)
    args = getattr(model, "args", None)
    scaling = getattr(args, "logits_scaling", None)   # granite: logits / logits_scaling
    if scaling and scaling != 1:
        logits = logits / scaling
    cap = getattr(args, "final_logit_softcapping", None)
    if cap:
        logits = mx.tanh(logits / cap) * cap
    return logits


def check_trunk_split(model: nn.Module) -> None:
    """Fail early (and clearly) on an architecture whose output is not lm_logits(trunk)."""
    tokens = mx.array([[1, 2, 3]])
    full = model(tokens)
    split = lm_logits(model, hidden_states(model, tokens))
    if full.shape != split.shape or not mx.allclose(full, split, atol=1e-4, rtol=1e-4).item():
        raise MindprintError(f"{type(model).__module__}: the trunk/output split does not reproduce "
                             "the model's logits (lm_logits(hidden_states) != model(tokens)); PPO and "
                             "the value and reward heads do not support this architecture")


def last_token_index(mask: mx.array) -> mx.array:
    """Index of the last 1 in each row of a 0/1 mask (B, T) -> (B,); 0 for an empty row."""
    T = mask.shape[1]
    positions = mx.arange(T)[None, :]
    return mx.max(mx.where(mask > 0, positions, 0), axis=1)


def gather_last(values: mx.array, mask: mx.array) -> mx.array:
    """values (B, T) read at each row's last masked position -> (B,)."""
    idx = last_token_index(mask)
    return mx.take_along_axis(values, idx[:, None], axis=1).squeeze(1)
