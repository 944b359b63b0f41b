"""Small helpers the tests share."""

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


def add_sft(model, seed=0):
    """A frozen, non-trivial SFT adapter: the reference policy."""
    mx.random.seed(seed)
    lora.apply_lora(model, "sft", r=2, alpha=4.0, trainable=False)
    for _, m in lora.lora_layers(model):
        m.adapters["sft"].lora_b = 0.2 * mx.random.normal(m.adapters["sft"].lora_b.shape)


def random_factors(model, name, seed=0, std=0.3):
    """Random non-zero A and B (numpy's generator, so the same on every machine) for every
    module of adapter `name`."""
    rng = np.random.default_rng(seed)
    for _, m in lora.lora_layers(model):
        a = m.adapters[name]
        a.lora_a = mx.array(rng.standard_normal(a.lora_a.shape).astype(np.float32) * std)
        a.lora_b = mx.array(rng.standard_normal(a.lora_b.shape).astype(np.float32) * std)
