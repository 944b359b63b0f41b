"""Small helpers the LoRA and adapter tests share."""

import mlx.core as mx
import numpy as np

from mindprint_mlx.models import lora


def forward_logits(model, ids) -> np.ndarray:
    out = model(ids)
    mx.eval(out)
    return np.array(out)


def randomize(model, name, seed=0, std=0.3):
    """Give adapter `name` a non-zero B so that it changes the output."""
    mx.random.seed(seed)
    for _, m in lora.lora_layers(model):
        if name in m.adapters:
            a = m.adapters[name]
            a.lora_b = mx.random.normal(a.lora_b.shape) * std
