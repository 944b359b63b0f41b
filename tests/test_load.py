"""Model loading: local directories offline, quantization, config fixes, one-line errors."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, model_info
from mindprint_mlx.models.tiny import build_tiny_model

IDS = mx.array([[5, 17, 33, 8, 91, 12, 40, 7]])


def load_error(path, **kw) -> str:
    with pytest.raises(MindprintError) as e:
        load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def copy_model(src, dst, skip=()):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def test_missing_path(tmp_path):
    msg = load_error(tmp_path / "no-such-model")
    assert "not found" in msg and "no-such-model" in msg
    # looks like a hub id, not cached, offline: still one clear line
    msg = load_error("nobody-here/no-such-model")
    assert "nobody-here/no-such-model" in msg


def test_file_instead_of_directory(tiny_llama):
    msg = load_error(tiny_llama / "config.json")
    assert "is a file" in msg and "config.json" in msg


def test_directory_without_config(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "m", skip={"config.json"})
    msg = load_error(d)
    assert str(d) in msg and "config.json is missing" in msg
    (d / "config.json").write_text("{not json")
    assert "not valid JSON" in load_error(d)
    (d / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert "model_type" in load_error(d)


def test_architecture_mlx_lm_does_not_know(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "hyperwombat"
    (d / "config.json").write_text(json.dumps(cfg))
    msg = load_error(d)
    assert "'hyperwombat'" in msg and "not supported" in msg


def test_no_safetensors(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "m", skip={"model.safetensors"})
    (d / "pytorch_model.bin").write_bytes(b"pickles are never loaded")
    msg = load_error(d)
    assert "safetensors" in msg and str(d) in msg


def test_corrupt_weights_and_tokenizer(tmp_path, tiny_llama):
    d = copy_model(tiny_llama, tmp_path / "cut")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    msg = load_error(d)
    assert str(d) in msg and "cannot load the weights" in msg
    d = copy_model(tiny_llama, tmp_path / "tok")
    (d / "tokenizer.json").write_text("{")
    msg = load_error(d)
    assert str(d) in msg and "cannot load the tokenizer" in msg


def test_bad_options(tiny_llama):
    assert "quantize" in load_error(tiny_llama, quantize=3)
    assert "dtype" in load_error(tiny_llama, dtype="float64")


def test_local_directory_offline(tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load(str(tiny_llama))
    info = model_info(model)
    assert info.model_type == "llama" and info.path == str(tiny_llama.resolve())
    assert info.quantization is None and len(info.fingerprint) == 16
    assert model_info(load(tiny_llama)[0]).fingerprint == info.fingerprint
    assert not model.training
    out = model(IDS)
    assert out.shape == (1, IDS.shape[1], 512) and out.dtype == mx.float32
    assert tok.encode("hello there") and tok.eos_token_id is not None
    with pytest.raises(MindprintError, match="not loaded with mindprint"):
        model_info(nn.Linear(2, 2))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_load(tiny_qwen2, bits):
    fp, _ = load(tiny_qwen2)
    model, _ = load(tiny_qwen2, quantize=bits)
    assert model_info(model).quantization == {"group_size": 64, "bits": bits}
    layer = model.model.layers[0]
    for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(lin, nn.QuantizedLinear) and lin.bits == bits
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    a, b = np.array(fp(IDS)), np.array(model(IDS))
    err = np.abs(a - b).max()
    assert 0 < err < (0.1 if bits == 8 else 1.5)
    # the quantized model still predicts like the base most of the time
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.5


def test_dtype_cast(tiny_llama):
    model, _ = load(tiny_llama, dtype="bfloat16")
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == mx.bfloat16
    assert model_info(model).dtype == "bfloat16"


def test_rope_parameters_only_config_gets_rope_theta(tmp_path):
    ref = build_tiny_model(tmp_path / "ref", arch="qwen2", seed=2)
    cfg = json.loads((ref / "config.json").read_text())
    cfg["rope_theta"] = 1234.0
    (ref / "config.json").write_text(json.dumps(cfg))
    d = copy_model(ref, tmp_path / "t5")
    del cfg["rope_theta"]  # a transformers-5 checkpoint keeps it only here
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    (d / "config.json").write_text(json.dumps(cfg))

    model, _ = load(d)
    assert model.args.rope_theta == 1234.0  # not mlx-lm's qwen2 default of 1e6
    expected, _ = load(ref)
    assert np.array_equal(np.array(model(IDS)), np.array(expected(IDS)))
    assert model_info(model).config["rope_theta"] == 1234.0


def test_demo_names_the_demo_model_unless_a_directory_is_called_demo(
        pretrained_demo_model, tmp_path, monkeypatch):
    """`-m demo` (every command that loads a model) is the cached demo model, the one a
    config's `model: demo` names; a local directory called `demo` still wins."""
    from mindprint_mlx.models.load import resolve_model_path
    from mindprint_mlx.pipeline.config import PipelineConfig, resolve_demo_aliases

    monkeypatch.setenv("MINDPRINT_CACHE", str(pretrained_demo_model.parent))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("demo") == pretrained_demo_model
    assert resolve_demo_aliases(PipelineConfig(model="demo")).model == str(pretrained_demo_model)
    model, tok = load("demo")
    assert model_info(model).path == str(pretrained_demo_model.resolve())
    (tmp_path / "demo").mkdir()
    assert resolve_model_path("demo") == Path("demo")
