"""Multi-adapter LoRA on real (tiny) mlx-lm models: PEFT semantics, roles, merge, combine."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, lora

from _helpers import forward_logits, randomize

IDS = mx.array([[5, 17, 33, 8, 91, 12, 40, 7, 3, 60]])


def logits(model, ids=IDS):
    return forward_logits(model, ids)


def maxdiff(a, b):
    return float(np.abs(a - b).max())


def test_zero_b_adapter_changes_nothing_and_init_is_peft(tiny_llama):
    model, _ = load(tiny_llama)
    base = logits(model)
    placed = lora.apply_lora(model, "a", r=4, alpha=8.0)
    assert placed and all(p.startswith("model.layers.") for p in placed)
    assert {p.rsplit(".", 1)[1] for p in placed} == set(lora.DEFAULT_TARGETS)
    assert np.array_equal(logits(model), base)
    for _, m in lora.lora_layers(model):
        a = m.adapters["a"]
        in_dims, out_dims = m.dims
        assert a.lora_a.shape == (in_dims, 4) and a.lora_b.shape == (4, out_dims)
        assert a.scale == 2.0
        assert not mx.any(a.lora_b).item()
        # Kaiming-uniform (a=sqrt(5)) as torch.nn.Linear / PEFT: U(-1/sqrt(in), 1/sqrt(in))
        assert float(mx.abs(a.lora_a).max()) <= 1 / np.sqrt(in_dims)
        assert float(mx.abs(a.lora_a).max()) > 0.5 / np.sqrt(in_dims)


def test_forward_is_wx_plus_alpha_over_r_bax(tiny_llama):
    model, _ = load(tiny_llama)
    lora.apply_lora(model, "a", targets=["o_proj"], r=4, alpha=2.0, layers=[0])
    randomize(model, "a")
    (path, m), = lora.lora_layers(model)
    assert path == "model.layers.0.self_attn.o_proj"
    a = m.adapters["a"]
    x = mx.random.normal((3, m.dims[0]))
    expected = x @ m.linear.weight.T + 0.5 * (x @ a.lora_a) @ a.lora_b
    assert maxdiff(np.array(m(x)), np.array(expected)) < 1e-5
    # delta_weight is scale * B A in the (out, in) layout of the base
    assert maxdiff(np.array(x @ (m.linear.weight + a.delta_weight()).T), np.array(expected)) < 1e-5


def test_named_adapters_ranks_trainable_enabled(tiny_llama):
    model, _ = load(tiny_llama)
    base = logits(model)
    lora.apply_lora(model, "one", r=1, alpha=1.0)
    lora.apply_lora(model, "three", r=3, alpha=6.0, trainable=False)
    lora.apply_lora(model, "off", r=2, targets=["q_proj"], layers=[1], enabled=False)
    for n in ("one", "three", "off"):
        randomize(model, n, seed=len(n))
    assert lora.adapter_names(model) == ["one", "three", "off"]
    for path, m in lora.lora_layers(model):
        if "one" in m.adapters:
            assert m.adapters["one"].lora_a.shape[1] == 1
            assert m.adapters["three"].lora_a.shape[1] == 3
        assert "off" not in m.active
    assert set(lora.get_active(model)["model.layers.1.self_attn.q_proj"]) == set()
    settings = lora.adapter_settings(model, "off")
    assert settings["layers"] == [1] and settings["targets"] == ["self_attn.q_proj"] and settings["r"] == 2

    both = logits(model)
    assert maxdiff(both, base) > 1e-2
    with lora.active_adapters(model, ["one", "three"]):  # "off" was never in the forward
        assert np.array_equal(logits(model), both)
    with lora.active_adapters(model, []):  # disabling everything gives the base exactly
        assert np.array_equal(logits(model), base)
    with lora.active_adapters(model, ["off"]):
        assert maxdiff(logits(model), base) > 1e-3

    def trainable_keys():
        return {k for k, _ in tree_flatten(model.trainable_parameters())}

    def adapter_keys(name):
        return {f"{p}.adapters.{name}.{leaf}" for p, m in lora.lora_layers(model)
                if name in m.adapters for leaf in ("lora_a", "lora_b")}

    assert trainable_keys() == adapter_keys("one") | adapter_keys("off")
    lora.set_trainable(model, "one", False)
    lora.set_trainable(model, "three", True)
    assert trainable_keys() == adapter_keys("three") | adapter_keys("off")
    assert lora.trainable_count(model) == sum(
        v.size for k, v in tree_flatten(model.parameters()) if k in trainable_keys())
    lora.remove_adapter(model, "off")
    assert trainable_keys() == adapter_keys("three")
    assert lora.adapter_names(model) == ["one", "three"]


def test_trainable_parameters_are_exactly_the_adapter_tensors(tiny_qwen2):
    model, _ = load(tiny_qwen2)
    lora.apply_lora(model, "sft", r=2, targets=["q_proj", "down_proj"])
    flat = dict(tree_flatten(model.trainable_parameters()))
    expected = {}
    for path, m in lora.lora_layers(model):
        expected[f"{path}.adapters.sft.lora_a"] = m.adapters["sft"].lora_a
        expected[f"{path}.adapters.sft.lora_b"] = m.adapters["sft"].lora_b
    assert set(flat) == set(expected) and len(flat) == 2 * 2 * 2
    assert all(flat[k] is expected[k] for k in flat)  # the very same arrays, not copies


def test_active_adapters_switches_without_copying_and_restores(tiny_llama):
    model, _ = load(tiny_llama)
    lora.apply_lora(model, "sft", r=2, trainable=False)
    lora.apply_lora(model, "ppo", r=1)
    lora.apply_lora(model, "reward", r=2, enabled=False)
    for i, n in enumerate(("sft", "ppo", "reward")):
        randomize(model, n, seed=i)
    ids_before = {k: id(v) for k, v in tree_flatten(model.parameters())}
    saved = lora.get_active(model)
    policy = logits(model)
    outs = {}
    for role in (["sft"], ["reward"], [], ["sft", "ppo", "reward"]):
        with lora.active_adapters(model, role) as m:
            assert m is model
            outs[tuple(role)] = logits(model)
            # switching roles never copies or rebuilds a weight
            assert {k: id(v) for k, v in tree_flatten(model.parameters())} == ids_before
            assert all(m_.active == frozenset(role) & frozenset(m_.adapters)
                       for _, m_ in lora.lora_layers(model))
        assert lora.get_active(model) == saved
    assert len({o.tobytes() for o in outs.values()}) == 4
    assert np.array_equal(logits(model), policy)
    # nested, and restored on an exception
    with pytest.raises(RuntimeError):
        with lora.active_adapters(model, ["sft"]):
            with lora.active_adapters(model, ["reward"]):
                assert np.array_equal(logits(model), outs[("reward",)])
            assert np.array_equal(logits(model), outs[("sft",)])
            raise RuntimeError("boom")
    assert lora.get_active(model) == saved
    with pytest.raises(MindprintError, match="no adapter named 'nope'.*sft, ppo, reward"):
        with lora.active_adapters(model, ["nope"]):
            pass
    assert lora.get_active(model) == saved


def test_target_matching_nothing_names_existing_layers(tiny_llama):
    model, _ = load(tiny_llama)
    with pytest.raises(MindprintError) as e:
        lora.apply_lora(model, "x", targets=["o_proj", "c_attn"])
    msg = str(e.value)
    assert "c_attn" in msg and "\n" not in msg
    for existing in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert existing in msg
    assert lora.adapter_names(model) == []  # nothing half-applied
    with pytest.raises(MindprintError, match="out of range"):
        lora.apply_lora(model, "x", layers=[5])
    with pytest.raises(MindprintError, match="rank"):
        lora.apply_lora(model, "x", r=0)
    lora.apply_lora(model, "x")
    with pytest.raises(MindprintError, match="already has an adapter named 'x'"):
        lora.apply_lora(model, "x")


@pytest.mark.parametrize("quantize", [None, 4])
def test_merge_equals_active_adapter(tiny_llama, quantize):
    model, _ = load(tiny_llama, quantize=quantize)
    lora.apply_lora(model, "keep", r=1, trainable=False)
    lora.apply_lora(model, "a", r=2, alpha=4.0)
    randomize(model, "keep", seed=1)
    randomize(model, "a", seed=2)
    with lora.active_adapters(model, ["a"]):
        only_a = logits(model)
    both = logits(model)
    lora.merge(model, ["a"], dequantize=True)
    assert lora.adapter_names(model) == ["keep"]
    assert maxdiff(logits(model), both) < 1e-5  # "keep" is still applied on top
    with lora.active_adapters(model, []):
        assert maxdiff(logits(model), only_a) < 1e-5
    for _, m in lora.lora_layers(model):
        assert type(m.linear) is nn.Linear  # dequantized on request
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == set()
    lora.remove_adapter(model, "keep")
    lora.unwrap(model)  # plain linear layers again, same function
    assert list(lora.lora_layers(model)) == []
    assert type(model.model.layers[1].self_attn.o_proj) is nn.Linear
    assert maxdiff(logits(model), only_a) < 1e-5


def test_merge_into_quantized_base_stays_quantized(tiny_llama):
    """Re-quantizing W + BA is lossy; the loss is of the order of quantizing the base itself."""
    fp, _ = load(tiny_llama)
    lora.apply_lora(fp, "a", r=2, alpha=4.0)
    randomize(fp, "a", seed=3)
    model, _ = load(tiny_llama, quantize=8)
    lora.apply_lora(model, "a", r=2, alpha=4.0)
    for (_, mf), (_, mq) in zip(lora.lora_layers(fp), lora.lora_layers(model)):
        mq.adapters["a"].lora_a = mf.adapters["a"].lora_a
        mq.adapters["a"].lora_b = mf.adapters["a"].lora_b
    active_q, active_fp = logits(model), logits(fp)
    lora.merge(model, ["a"], dequantize=False)
    lora.merge(fp, ["a"])
    merged_q = logits(model)
    assert all(isinstance(m.linear, nn.QuantizedLinear) and m.linear.bits == 8 and not m.adapters
               for _, m in lora.lora_layers(model))
    assert maxdiff(logits(fp), active_fp) < 1e-5
    quant_err = maxdiff(active_q, active_fp)  # what 8-bit costs anyway
    assert maxdiff(merged_q, active_q) < 3 * quant_err + 1e-3
    assert maxdiff(merged_q, active_fp) < 3 * quant_err + 1e-3


def test_combine_adapters_equals_both_active(tiny_qwen2):
    model, _ = load(tiny_qwen2)
    lora.apply_lora(model, "u1", r=1, alpha=3.0)
    lora.apply_lora(model, "u2", r=2, alpha=1.0, targets=["o_proj", "q_proj"])
    lora.apply_lora(model, "other", r=1, enabled=False)
    randomize(model, "u1", seed=4)
    randomize(model, "u2", seed=5)
    randomize(model, "other", seed=6)
    with lora.active_adapters(model, ["u1", "u2"]):
        both = logits(model)
    lora.combine_adapters(model, ["u1", "u2"], "unit")
    assert lora.adapter_names(model) == ["other", "unit"]
    with lora.active_adapters(model, ["unit"]):
        assert maxdiff(logits(model), both) < 1e-5
    ranks = {p.rsplit(".", 1)[1]: m.adapters["unit"].r for p, m in lora.lora_layers(model)}
    assert ranks == {"o_proj": 3, "q_proj": 2, "v_proj": 1, "up_proj": 1, "down_proj": 1}
    assert all(not m.adapters["unit"].trainable for _, m in lora.lora_layers(model))


def test_dropout_is_off_in_eval_and_on_in_train(tiny_llama):
    model, _ = load(tiny_llama)  # load returns the model in eval mode
    lora.apply_lora(model, "drop", r=2, dropout=0.5)
    lora.apply_lora(model, "same", r=2, enabled=False)
    randomize(model, "drop", seed=7)
    for _, m in lora.lora_layers(model):
        m.adapters["same"].lora_a = m.adapters["drop"].lora_a
        m.adapters["same"].lora_b = m.adapters["drop"].lora_b
    first = logits(model)
    assert np.array_equal(logits(model), first)
    with lora.active_adapters(model, ["same"]):
        assert np.array_equal(logits(model), first)
    model.train()
    mx.random.seed(0)
    a, b = logits(model), logits(model)
    assert maxdiff(a, b) > 1e-4 and maxdiff(a, first) > 1e-4
    model.eval()
    assert np.array_equal(logits(model), first)


def test_quantized_base_trains_only_the_adapter(tiny_llama):
    model, _ = load(tiny_llama, quantize=4)
    lora.apply_lora(model, "sft", r=2, alpha=2.0)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if ".adapters." not in k}
    assert any(isinstance(m.linear, nn.QuantizedLinear) for _, m in lora.lora_layers(model))
    x, y = IDS[:, :-1], IDS[:, 1:]

    def loss_fn(m):
        return nn.losses.cross_entropy(m(x), y).mean()

    opt = optim.Adam(learning_rate=1e-2)
    step = nn.value_and_grad(model, loss_fn)
    model.train()
    losses = []
    for _ in range(5):
        loss, grads = step(model)
        assert {k for k, _ in tree_flatten(grads)} == \
            {k for k, _ in tree_flatten(model.trainable_parameters())}
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in tree_flatten(model.parameters()):
        if ".adapters." not in k:
            assert np.array_equal(np.array(v), frozen[k]), k
