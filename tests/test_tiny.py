"""Tiny Hugging Face-format models: real directories that mlx-lm and transformers both load."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mindprint_mlx.models import load
from mindprint_mlx.models.tiny import build_tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_tiny_model_logits_match_transformers(tmp_path, arch):
    import torch
    import transformers

    path = build_tiny_model(tmp_path / arch, arch=arch, seed=1)
    model, tok = load(path)
    ids = tok.encode("patience through the cycle, not prediction")
    ours = np.array(model(mx.array([ids])))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-4


def test_tiny_model_is_deterministic_for_a_seed(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tiny_tokenizer_has_chat_template_and_distinct_pad(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    _, tok = load(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert isinstance(ids, list) and len(ids) > 3
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    assert json.loads((path / "config.json").read_text())["rope_theta"] > 0


def test_min_frequency_one_makes_every_word_of_the_texts_one_token(tmp_path):
    from mindprint_mlx.errors import MindprintError

    texts = ["the harvest comes after a patient winter", "prices rise and fall with the tide"]
    _, tok = load(build_tiny_model(tmp_path / "whole", texts=texts, vocab_size=4096, min_frequency=1))
    for t in texts:   # one token per word, as the word appears (with its leading space)
        assert len(tok.encode(t, add_special_tokens=False)) == len(t.split()), t
    _, split = load(build_tiny_model(tmp_path / "pieces", texts=texts, vocab_size=4096))
    assert len(split.encode(" harvest", add_special_tokens=False)) > 1   # seen once: pieces
    with pytest.raises(MindprintError, match="min_frequency must be an integer >= 1, got 0"):
        build_tiny_model(tmp_path / "bad", texts=texts, min_frequency=0)
