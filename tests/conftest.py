"""Shared fixtures: tiny Hugging Face-format models built on the fly (no downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _build(tmp_path_factory, arch: str, **kw):
    from mindprint_mlx.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}") / "model", arch=arch, seed=0, **kw)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer, 64-wide llama in Hugging Face format (config, safetensors, tokenizer)."""
    return _build(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A tiny qwen2: q/k/v biases and tied embeddings."""
    return _build(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_demo_model(tmp_path_factory):
    """The tiny llama with a tokenizer trained on the demo curriculum."""
    from mindprint_mlx.data import curriculum_texts
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
    from mindprint_mlx.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-demo") / "model", arch="llama", seed=0,
                            texts=curriculum_texts(DEMO_CURRICULUM_DIR))


@pytest.fixture(scope="session")
def pretrained_demo_model(tmp_path_factory):
    """The real `mindprint demo` base model: pretrained on the neutral market primer
    (one pretraining, well under a minute on two CPU cores), cached under a tmp dir."""
    from mindprint_mlx.data import curriculum_texts
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
    from mindprint_mlx.models.tiny import ensure_demo_model

    return ensure_demo_model(tmp_path_factory.mktemp("demo-cache"),
                             texts=curriculum_texts(DEMO_CURRICULUM_DIR), progress=False)
