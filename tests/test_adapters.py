"""Adapter files: mlx-lm's format both ways, exact round trips, heads, clear errors, atomic writes."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import (adapter_metadata, load_adapter, load_heads,
                                           save_adapter)
from mindprint_mlx.models.heads import ScalarHead
from mindprint_mlx.models.tiny import build_tiny_model

from _helpers import forward_logits, randomize

IDS = mx.array([[5, 17, 33, 8, 91, 12, 40, 7, 3]])


def logits(model):
    return forward_logits(model, IDS)


def listing(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("arch, kw", [
    ("llama", dict(r=2, alpha=4.0)),
    ("qwen2", dict(r=1, alpha=3.0, targets=["q_proj", "v_proj", "down_proj"], layers=[1])),
])
def test_mlx_lm_loads_saved_adapter_with_same_logits(tmp_path, tiny_llama, tiny_qwen2, arch, kw):
    import mlx_lm

    base = tiny_llama if arch == "llama" else tiny_qwen2
    model, _ = load(base)
    lora.apply_lora(model, "other", r=1)  # present but not saved
    randomize(model, "other", seed=9)
    lora.apply_lora(model, "sft", **kw)
    randomize(model, "sft", seed=1)
    out = save_adapter(model, "sft", tmp_path / "sft_adapter", metadata={"role": "policy"})
    assert listing(out) == ["adapter_config.json", "adapters.safetensors", "mindprint.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora"
    assert cfg["lora_parameters"]["rank"] == kw["r"]
    assert cfg["lora_parameters"]["scale"] == kw["alpha"] / kw["r"]
    with lora.active_adapters(model, ["sft"]):
        ours = logits(model)
    with lora.active_adapters(model, []):
        assert np.abs(logits(model) - ours).max() > 1e-2  # the adapter matters

    theirs_model, _ = mlx_lm.load(str(base), adapter_path=str(out))
    theirs = logits(theirs_model)
    assert np.abs(ours - theirs).max() < 1e-5


def test_load_adapter_written_by_mlx_lm(tmp_path, tiny_llama):
    """The other direction: an adapter as `mlx_lm.lora` saves it (no keys, no metadata)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    theirs, _ = load(tiny_llama)
    theirs.freeze()
    params = {"rank": 3, "scale": 2.5, "dropout": 0.0}
    linear_to_lora_layers(theirs, 1, params)
    mx.random.seed(3)
    for k, v in tree_flatten(theirs.trainable_parameters()):
        if k.endswith("lora_b"):
            theirs.update(_nested(k, mx.random.normal(v.shape) * 0.3))
    d = tmp_path / "from.mlx_lm"
    d.mkdir()
    mx.save_safetensors(str(d / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    (d / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params}))

    model, _ = load(tiny_llama)
    name = load_adapter(model, d)
    assert name == "from_mlx_lm"  # named after the directory, '.' replaced
    settings = lora.adapter_settings(model, name)
    assert settings["layers"] == [1] and settings["r"] == 3 and settings["alpha"] == 7.5
    assert "self_attn.q_proj" in settings["targets"] and "mlp.gate_proj" in settings["targets"]
    assert np.abs(logits(model) - logits(theirs)).max() < 1e-5


def _nested(key, value):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(key, value)])


def test_load_adapter_round_trip_is_exact(tmp_path, tiny_qwen2):
    model, _ = load(tiny_qwen2)
    lora.apply_lora(model, "ppo", r=2, alpha=1.0, dropout=0.1, targets=["o_proj", "gate_proj"])
    randomize(model, "ppo", seed=4)
    with lora.active_adapters(model, ["ppo"]):
        expected = logits(model)
    out = save_adapter(model, "ppo", tmp_path / "ppo_adapter", metadata={"role": "policy"})
    meta = adapter_metadata(out)
    assert meta["adapter_name"] == "ppo" and meta["role"] == "policy"
    assert meta["base_model"] == str(tiny_qwen2) and len(meta["base_fingerprint"]) == 16
    assert meta["r"] == 2 and meta["targets"] == ["mlp.gate_proj", "self_attn.o_proj"]

    fresh, _ = load(tiny_qwen2)
    base = logits(fresh)
    assert load_adapter(fresh, out) == "ppo"
    saved, loaded = lora.adapter_state(model, "ppo"), lora.adapter_state(fresh, "ppo")
    assert saved.keys() == loaded.keys()
    assert all(np.array_equal(np.array(saved[k]), np.array(loaded[k])) for k in saved)
    assert lora.adapter_settings(fresh, "ppo") == lora.adapter_settings(model, "ppo")
    assert np.array_equal(logits(fresh), expected)
    assert lora.trainable_count(fresh) == 0  # frozen unless asked

    assert load_adapter(fresh, out, name="again", trainable=True, enabled=False) == "again"
    assert np.array_equal(logits(fresh), expected)  # not enabled
    assert {k.split(".adapters.")[1].split(".")[0] for k, _ in
            tree_flatten(fresh.trainable_parameters())} == {"again"}
    with lora.active_adapters(fresh, []):
        assert np.array_equal(logits(fresh), base)


def test_heads_saved_and_loaded(tmp_path, tiny_llama):
    model, _ = load(tiny_llama)
    lora.apply_lora(model, "reward", r=1)
    mx.random.seed(0)
    head = ScalarHead(64, zero_init=False)
    value = ScalarHead(64)
    out = save_adapter(model, "reward", tmp_path / "reward", heads={"reward": head, "value": value})
    assert "heads.safetensors" in listing(out)
    assert adapter_metadata(out)["heads"] == {"reward": {"hidden_size": 64}, "value": {"hidden_size": 64}}
    heads = load_heads(out)
    assert sorted(heads) == ["reward", "value"]
    x = mx.random.normal((2, 3, 64))
    assert np.array_equal(np.array(heads["reward"](x)), np.array(head(x)))
    assert np.array_equal(np.array(heads["value"](x)), np.zeros((2, 3), np.float32))
    assert load_heads(tmp_path) == {}


def test_wrong_base_names_the_tensor(tmp_path, tiny_llama):
    model, _ = load(tiny_llama)
    lora.apply_lora(model, "sft", r=2)
    out = save_adapter(model, "sft", tmp_path / "sft")
    other_path = build_tiny_model(tmp_path / "wider", arch="llama", intermediate_size=96)
    other, _ = load(other_path)
    with pytest.raises(MindprintError) as e:
        load_adapter(other, out)
    msg = str(e.value)
    assert "\n" not in msg and "adapters.safetensors" in msg
    assert "model.layers.0.mlp.up_proj.lora_b" in msg and "(2, 128)" in msg and "(2, 96)" in msg
    assert lora.adapter_names(other) == []  # nothing half-loaded


def test_bad_adapter_directories(tmp_path, tiny_llama):
    model, _ = load(tiny_llama)
    with pytest.raises(MindprintError, match="adapter directory not found"):
        load_adapter(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MindprintError, match="not an mlx-lm adapter directory"):
        load_adapter(model, tmp_path / "empty")
    lora.apply_lora(model, "a", r=1)
    d = save_adapter(model, "a", tmp_path / "a")
    (d / "adapters.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MindprintError, match="adapters.safetensors: cannot read"):
        load_adapter(model, d, name="b")
    (d / "adapter_config.json").write_text("{oops")
    with pytest.raises(MindprintError, match="adapter_config.json: not valid JSON"):
        load_adapter(model, d)
    (d / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "dora"}))
    with pytest.raises(MindprintError, match="'dora' is not supported"):
        load_adapter(model, d)
    with pytest.raises(MindprintError, match="no adapter named 'zzz'"):
        save_adapter(model, "zzz", tmp_path / "zzz")


def test_saves_are_atomic(tmp_path, tiny_llama):
    model, _ = load(tiny_llama)
    lora.apply_lora(model, "sft", r=1)
    randomize(model, "sft", seed=1)
    runs = tmp_path / "run"
    out = save_adapter(model, "sft", runs / "sft_adapter")
    first = (out / "adapters.safetensors").read_bytes()
    assert listing(runs) == ["sft_adapter"]

    randomize(model, "sft", seed=2)
    with pytest.raises(AttributeError):  # dies after the weights were written
        save_adapter(model, "sft", out, heads={"broken": object()})
    assert listing(runs) == ["sft_adapter"]  # no temporary directory left
    assert (out / "adapters.safetensors").read_bytes() == first  # the old adapter, whole

    save_adapter(model, "sft", out)  # overwrite in place
    assert listing(runs) == ["sft_adapter"]
    assert (out / "adapters.safetensors").read_bytes() != first
    fresh, _ = load(tiny_llama)
    load_adapter(fresh, out)
    with lora.active_adapters(model, ["sft"]):
        assert np.array_equal(logits(fresh), logits(model))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trunk_and_output_layer_split_reproduces_logits(tiny_llama, tiny_qwen2, arch):
    from mindprint_mlx.models import heads

    model, _ = load(tiny_llama if arch == "llama" else tiny_qwen2, quantize=8 if arch == "qwen2" else None)
    lora.apply_lora(model, "a", r=1)
    randomize(model, "a")
    heads.check_trunk_split(model)  # raises on an architecture where it would not hold
    h = heads.hidden_states(model, IDS)
    assert h.shape == (1, IDS.shape[1], heads.hidden_size(model)) == (1, IDS.shape[1], 64)
    assert np.abs(np.array(heads.lm_logits(model, h)) - logits(model)).max() < 1e-5
    mask = mx.array([[0, 0, 1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=mx.float32)
    assert heads.last_token_index(mask).tolist() == [4, 1]
    values = mx.arange(18, dtype=mx.float32).reshape(2, 9)
    assert heads.gather_last(values, mask).tolist() == [4.0, 10.0]
    head = ScalarHead(64)
    out = head(h.astype(mx.bfloat16))
    assert out.shape == (1, IDS.shape[1]) and out.dtype == mx.float32 and not mx.any(out).item()
