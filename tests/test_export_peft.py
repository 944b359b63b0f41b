"""Adapters to and from PEFT: same logits in transformers + peft as in mindprint."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mindprint_mlx.errors import MindprintError
from mindprint_mlx.export import export_peft, export_reward, import_peft
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import load_adapter, load_heads, save_adapter
from mindprint_mlx.models.heads import ScalarHead, hidden_states

TEXT = "the teacher reads the book near the river, because it matters"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from mindprint_mlx.models.tiny import build_tiny_model

    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(arch) / "model", arch=arch, seed=0)
        return built[arch]
    return get


def _randomize(model, name, seed, std=0.3):
    """Non-zero lora_b everywhere (a fresh adapter is an identity), reproducibly."""
    rng = np.random.default_rng(seed)
    for _, m in lora.lora_layers(model):
        if name in m.adapters:
            a = m.adapters[name]
            a.lora_a = mx.array(rng.standard_normal(a.lora_a.shape).astype(np.float32) * std)
            a.lora_b = mx.array(rng.standard_normal(a.lora_b.shape).astype(np.float32) * std)
    mx.eval(model.parameters())


def _ids(tok):
    return tok.encode(TEXT)


def _hf_causal(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _peft_logits(base_path, peft_dir, ids):
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(_hf_causal(base_path), str(peft_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


@pytest.mark.parametrize("arch,targets", [
    ("llama", ("q_proj", "o_proj", "down_proj")),
    ("qwen2", ("q_proj", "v_proj", "up_proj")),           # q/v carry base biases
    ("qwen3", ("k_proj", "o_proj", "gate_proj")),
    ("gemma3_text", ("q_proj", "o_proj", "down_proj")),
])
def test_exported_adapter_gives_mindprints_logits_in_peft(tmp_path, tiny_models, arch, targets):
    base = tiny_models(arch)
    model, tok = load(base)
    lora.apply_lora(model, "sft", targets=targets, r=3, alpha=6.0)
    _randomize(model, "sft", seed=1)
    ids = _ids(tok)
    ours = np.array(model(mx.array([ids])))
    with lora.active_adapters(model, []):
        base_logits = np.array(model(mx.array([ids])))
    save_adapter(model, "sft", tmp_path / "sft")

    res = export_peft(tmp_path / "sft", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 6 and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == str(base)
    assert sorted(cfg["target_modules"]) == sorted(
        {f"self_attn.{t}" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else f"mlp.{t}"
         for t in targets})
    assert res.modules == len(targets) * len(model.layers)

    theirs = _peft_logits(base, tmp_path / "peft", ids)
    assert np.abs(ours - base_logits).max() > 0.05          # the adapter does something
    assert np.abs(ours - theirs).max() < 1e-4


def test_adapter_on_some_layers_exports_layers_to_transform(tmp_path, tiny_models):
    base = tiny_models("llama")
    model, tok = load(base)
    lora.apply_lora(model, "late", targets=("v_proj",), r=2, alpha=2.0, layers=[1])
    _randomize(model, "late", seed=2)
    ids = _ids(tok)
    ours = np.array(model(mx.array([ids])))
    save_adapter(model, "late", tmp_path / "late")
    export_peft(tmp_path / "late", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1]
    assert np.abs(ours - _peft_logits(base, tmp_path / "peft", ids)).max() < 1e-4


def test_merged_adapter_exports_exactly_and_compresses_by_svd(tmp_path, tiny_models):
    base = tiny_models("llama")
    model, tok = load(base)
    lora.apply_lora(model, "u1", targets=("o_proj", "up_proj"), r=2, alpha=4.0)
    lora.apply_lora(model, "u2", targets=("o_proj", "up_proj"), r=3, alpha=3.0)
    _randomize(model, "u1", seed=3)
    _randomize(model, "u2", seed=4)
    ids = _ids(tok)
    ours = np.array(model(mx.array([ids])))
    lora.combine_adapters(model, ["u1", "u2"], "unit")
    save_adapter(model, "unit", tmp_path / "unit")

    exact = export_peft(tmp_path / "unit", tmp_path / "exact")
    assert exact.rank == 5 and exact.svd_errors == {}
    assert np.abs(ours - _peft_logits(base, tmp_path / "exact", ids)).max() < 1e-4

    small = export_peft(tmp_path / "unit", tmp_path / "small", rank=2)
    assert small.rank == 2 and json.loads((tmp_path / "small" / "adapter_config.json")
                                          .read_text())["r"] == 2
    # the reported error is Eckart-Young's: the discarded singular values of the full update
    layers = dict(lora.lora_layers(model))
    path = "model.layers.0.self_attn.o_proj"
    s = np.linalg.svd(np.array(layers[path].adapters["unit"].delta_weight()), compute_uv=False)
    expected = np.sqrt((s[2:] ** 2).sum() / (s ** 2).sum())
    assert small.svd_errors[path] == pytest.approx(expected, rel=1e-4)
    assert 0 < small.max_svd_error < 1
    # and the compressed PEFT adapter is that rank-2 approximation
    from safetensors.numpy import load_file
    w = load_file(str(tmp_path / "small" / "adapter_model.safetensors"))
    key = f"base_model.model.{path}"
    approx = w[f"{key}.lora_B.weight"].astype(np.float64) @ w[f"{key}.lora_A.weight"]
    full = np.array(layers[path].adapters["unit"].delta_weight(), dtype=np.float64)
    assert np.linalg.norm(approx - full) / np.linalg.norm(full) == pytest.approx(expected, rel=1e-3)


def test_peft_adapter_imports_and_round_trips_exactly(tmp_path, tiny_models):
    import torch
    from peft import LoraConfig, get_peft_model

    base = tiny_models("qwen2")
    torch.manual_seed(0)
    pm = get_peft_model(_hf_causal(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "peft")
    model, tok = load(base)
    ids = _ids(tok)
    with torch.no_grad():
        theirs = pm.eval()(torch.tensor([ids])).logits.numpy()

    import_peft(tmp_path / "peft", tmp_path / "mlx")
    load_adapter(model, tmp_path / "mlx", name="imported")
    ours = np.array(model(mx.array([ids])))
    assert np.abs(ours - theirs).max() < 1e-4

    export_peft(tmp_path / "mlx", tmp_path / "again")
    from safetensors.numpy import load_file
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "DoRA"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias 'all'"),
    ({"peft_type": "IA3"}, "IA3"),
])
def test_import_names_the_unsupported_peft_feature(tmp_path, tiny_models, change, message):
    base = tiny_models("llama")
    model, _ = load(base)
    lora.apply_lora(model, "a", targets=("v_proj",), r=1)
    save_adapter(model, "a", tmp_path / "a")
    export_peft(tmp_path / "a", tmp_path / "peft")
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **change}))
    with pytest.raises(MindprintError, match=message):
        import_peft(tmp_path / "peft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_tensors_that_are_not_lora_pairs(tmp_path, tiny_models):
    model, _ = load(tiny_models("llama"))
    lora.apply_lora(model, "a", targets=("o_proj",), r=1)
    save_adapter(model, "a", tmp_path / "a")
    w = dict(mx.load(str(tmp_path / "a" / "adapters.safetensors")))
    w["model.layers.0.self_attn.o_proj.bias"] = mx.zeros((64,))
    mx.save_safetensors(str(tmp_path / "a" / "adapters.safetensors"), w)
    with pytest.raises(MindprintError, match="adapter bias"):
        export_peft(tmp_path / "a", tmp_path / "peft")


def _score_batch(model, head, rows, pad_id):
    """mindprint's reward: head on the trunk at each row's last real token."""
    T = max(len(r) for r in rows)
    tokens = mx.array([r + [pad_id] * (T - len(r)) for r in rows])
    with lora.active_adapters(model, ["reward"]):
        h = hidden_states(model, tokens)
    idx = mx.array([len(r) - 1 for r in rows])
    last = mx.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
    return np.array(head(last)), tokens


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_reward_model_scores_match_sequence_classifier(tmp_path, tiny_models, arch):
    import torch
    import transformers
    from peft import PeftModel

    base = tiny_models(arch)
    model, tok = load(base)
    lora.apply_lora(model, "reward", targets=("q_proj", "v_proj", "down_proj"), r=2, alpha=4.0,
                    enabled=False)
    _randomize(model, "reward", seed=5)
    mx.random.seed(0)
    head = ScalarHead(model.args.hidden_size, zero_init=False)
    save_adapter(model, "reward", tmp_path / "rm", heads={"reward": head})
    rows = [tok.encode("a short one") + [tok.eos_token_id], _ids(tok) + [tok.eos_token_id]]
    ours, tokens = _score_batch(model, head, rows, tok.pad_token_id)

    export_reward(tmp_path / "rm", tmp_path / "seqcls")
    cfg = json.loads((tmp_path / "seqcls" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32)
    assert hf.config.pad_token_id == tok.pad_token_id
    rm = PeftModel.from_pretrained(hf, str(tmp_path / "seqcls")).eval()
    with torch.no_grad():
        theirs = rm(torch.tensor(np.array(tokens))).logits[:, 0].numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.ptp(ours) > 1e-3

    # and back: the SEQ_CLS adapter imports with its score as the reward head
    import_peft(tmp_path / "seqcls", tmp_path / "back")
    back = load_heads(tmp_path / "back")["reward"]
    assert np.array_equal(np.array(back.summary.weight), np.array(head.summary.weight))


def test_reward_head_bias_is_refused_or_dropped_explicitly(tmp_path, tiny_models):
    import torch
    import transformers
    from peft import PeftModel

    base = tiny_models("llama")
    model, tok = load(base)
    lora.apply_lora(model, "reward", targets=("o_proj",), r=1, enabled=False)
    _randomize(model, "reward", seed=6)
    head = ScalarHead(model.args.hidden_size, zero_init=False)
    head.summary.bias = mx.array([0.75])
    save_adapter(model, "reward", tmp_path / "rm", heads={"reward": head})
    with pytest.raises(MindprintError, match="bias 0.75.*--drop-bias"):
        export_reward(tmp_path / "rm", tmp_path / "seqcls")
    res = export_reward(tmp_path / "rm", tmp_path / "seqcls", drop_bias=True)
    assert any("0.75" in n for n in res.notes)
    rows = [_ids(tok) + [tok.eos_token_id]]
    ours, tokens = _score_batch(model, head, rows, tok.pad_token_id)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32)
    rm = PeftModel.from_pretrained(hf, str(tmp_path / "seqcls")).eval()
    with torch.no_grad():
        theirs = rm(torch.tensor(np.array(tokens))).logits[:, 0].numpy()
    assert np.abs((ours - 0.75) - theirs).max() < 1e-4
    # importing our own export puts the dropped bias back
    import_peft(tmp_path / "seqcls", tmp_path / "back")
    assert load_heads(tmp_path / "back")["reward"].summary.bias.tolist() == [0.75]


def test_value_head_exports_in_trl_v_head_layout(tmp_path, tiny_models):
    from safetensors.numpy import load_file

    model, _ = load(tiny_models("llama"))
    lora.apply_lora(model, "ppo", targets=("o_proj",), r=1)
    head = ScalarHead(model.args.hidden_size, zero_init=False)
    head.summary.bias = mx.array([0.25])
    save_adapter(model, "ppo", tmp_path / "ppo", heads={"value": head})
    res = export_peft(tmp_path / "ppo", tmp_path / "peft")
    assert "model.safetensors" in res.files
    w = load_file(str(tmp_path / "peft" / "model.safetensors"))
    assert sorted(w) == ["v_head.summary.bias", "v_head.summary.weight"]
    assert np.array_equal(w["v_head.summary.weight"], np.array(head.summary.weight))
    assert w["v_head.summary.bias"].tolist() == [0.25]


def test_name_map_handles_multimodal_gemma3_and_refuses_stacked_experts():
    import re

    from mindprint_mlx.export.names import name_map
    from mindprint_mlx.export.peft import _target_spec

    nm = name_map("gemma3")
    hf = nm.to_hf("language_model.model.layers.3.self_attn.q_proj")
    assert hf == "model.language_model.layers.3.self_attn.q_proj"
    assert nm.to_mlx(hf) == "language_model.model.layers.3.self_attn.q_proj"
    spec = _target_spec([hf, "model.language_model.layers.4.self_attn.q_proj"], nm, n_layers=6)
    pattern = spec["target_modules"]
    assert isinstance(pattern, str) and re.fullmatch(pattern, hf)
    # the vision tower has q_proj layers too; PEFT must not touch them
    assert not re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.language_model.layers.5.self_attn.q_proj")
    with pytest.raises(MindprintError, match="switch_mlp"):
        name_map("qwen3_moe").to_hf("model.layers.0.mlp.switch_mlp.up_proj")


def test_trained_reward_model_scores_the_same_in_transformers(tmp_path, tiny_models):
    """The trainer's own output (train_reward_model + RewardModel.score_batch) end to end."""
    import torch
    import transformers
    from peft import PeftModel

    from mindprint_mlx.data.batching import encode_pair
    from mindprint_mlx.data.records import PreferenceRecord
    from mindprint_mlx.train.reward import RewardConfig, RewardModel, train_reward_model

    base = tiny_models("llama")
    model, tok = load(base)
    words = ["the book", "a map", "the river", "a song", "the story", "a coat"]
    pairs = [PreferenceRecord(prompt=({"role": "user", "content": f"tell me about {w}"},),
                              chosen=f"{w} is good, as always.", rejected=f"{w} bad")
             for w in words]
    res = train_reward_model(model, tok, pairs, RewardConfig(epochs=1, lora_rank=2, batch_size=2),
                             tmp_path / "rm", progress=False)
    rm = RewardModel.load(model, tok, res.adapter_dir)
    prompts, answers = [p.prompt for p in pairs[:3]], [p.chosen for p in pairs[:3]]
    ours = np.array(rm.score_batch(list(prompts), answers))

    export_reward(res.adapter_dir, tmp_path / "seqcls")
    rows = [encode_pair(tok, list(p), a, 512)[0] for p, a in zip(prompts, answers)]
    T = max(map(len, rows))
    tokens = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, str(tmp_path / "seqcls")).eval()(tokens).logits[:, 0]
    assert np.abs(ours - theirs.numpy()).max() < 1e-4
