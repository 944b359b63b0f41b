"""The PPO trainer on a tiny model: it learns a programmatic reward with bounded KL, touches
only the PPO adapter and the value head, resumes exactly, runs on a 4-bit base and from the CLI."""

import json

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mindprint_mlx.cli import cli
from mindprint_mlx.config import ConfigError, load_config
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.io import read_jsonl
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter
from mindprint_mlx.models.heads import ScalarHead, hidden_size
from mindprint_mlx.ppo import PPOConfig, PPOTrainer, train_ppo
from mindprint_mlx.ppo.rollout import batched_response_forward, generate_batch, response_forward

from _helpers import add_sft

TEXTS = ["hi there", "the teacher reads", "why does it rain", "a small boat", "tell me a story",
         "the old clock", "my friend writes a letter", "near the river"]
PROMPTS = [[{"role": "user", "content": t}] for t in TEXTS]


def token_count_reward(tok, target):
    """Scores = how often `target` occurs in each response (the row after its prompt)."""
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True) for p in PROMPTS]

    def reward_fn(tokens, lengths):
        out = []
        for row, n in zip(np.array(tokens), np.array(lengths)):
            start = next(len(p) for p in prompts if list(row[:len(p)]) == list(p))
            out.append(float((row[start:n] == target).sum()))
        return mx.array(out)
    return reward_fn, prompts


def base_params(model):
    return {k: v for k, v in tree_flatten(model.parameters()) if ".adapters." not in k}


def likeliest_token(model, tok, prompts):
    """The non-special token the reference policy samples most often (so PPO can find it)."""
    with lora.active_adapters(model, ["sft"]):
        g = generate_batch(model, prompts * 4, 8, [tok.eos_token_id], tok.pad_token_id,
                           key=mx.random.key(0))
        _, _, logits = response_forward(model, g.tokens, g.prompt_lengths, g.response_tokens,
                                        return_logits=True)
    probs = np.array(mx.softmax(logits, axis=-1)).reshape(-1, logits.shape[-1]).mean(axis=0)
    probs[:4] = 0                                   # endoftext, im_start, EOS, pad
    return int(probs.argmax())


def test_ppo_raises_a_programmatic_reward_with_bounded_kl(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    add_sft(model)
    base_before = base_params(model)
    sft_before = {k: np.array(v) for k, v in lora.adapter_state(model, "sft").items()}
    target = likeliest_token(model, tok, [tok.apply_chat_template(p, add_generation_prompt=True)
                                          for p in PROMPTS])
    reward_fn, prompts = token_count_reward(tok, target)
    with lora.active_adapters(model, ["sft"]):     # a fixed rollout to watch the reference on
        probe = generate_batch(model, prompts, 6, [tok.eos_token_id], tok.pad_token_id,
                               key=mx.random.key(9))
        ref_before, _ = batched_response_forward(model, probe, 1.0)

    # Small and fast, with a high learning rate (seeds 0, 1, 2 all reach ~3.5 of 4 by step 14).
    cfg = PPOConfig(steps=16, batch_size=16, mini_batch_size=8, max_new_tokens=4, ppo_epochs=2,
                    learning_rate=1e-2, lora_rank=4, lora_alpha=8.0, init_kl_coef=0.05,
                    seed=0, progress=False, save_every=0)
    res = train_ppo(model, tok, PROMPTS, reward_fn, cfg, tmp_path / "run", frozen_adapters=["sft"])

    scores = [h["objective/scores"] for h in res.history]
    kls = [h["objective/kl"] for h in res.history]
    assert res.steps == 16 and len(res.history) == 16
    assert np.mean(scores[-4:]) > np.mean(scores[:4]) + 1.5, scores
    assert max(kls) < 40 and min(kls) > -1, kls
    # The first minibatch of every step reproduces the rollout (ratio 1), no step was skipped.
    assert all(abs(h["ppo/first_minibatch_ratio_mean"] - 1) < 1e-4 for h in res.history)
    # Reference log-probs never change; the base weights are the very same arrays, unchanged;
    # the frozen SFT adapter is untouched.
    with lora.active_adapters(model, ["sft"]):
        ref_after, _ = batched_response_forward(model, probe, 1.0)
    assert np.array_equal(np.array(ref_before), np.array(ref_after))
    after = base_params(model)
    assert after.keys() == base_before.keys()
    assert all(after[k] is base_before[k] for k in after)
    for k, v in lora.adapter_state(model, "sft").items():
        assert np.array_equal(np.array(v), sft_before[k])
    # The PPO adapter was saved (mlx-lm format) with its value head; stats were logged.
    assert (res.adapter_dir / "adapters.safetensors").is_file()
    assert (res.adapter_dir / "heads.safetensors").is_file()
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, 17))
    for key in ("objective/kl", "objective/kl_coef", "objective/entropy", "objective/scores",
                "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac", "ppo/val/clipfrac",
                "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/val/explained_variance",
                "ppo/policy/entropy", "ppo/response_length", "ppo/eos_fraction",
                "ppo/time/generation", "ppo/time/update", "ppo/tokens_per_sec",
                "ppo/memory/peak_bytes", "ppo/memory/base_weight_bytes"):
        assert key in lines[-1], key
    # Adaptive beta moved once per step in the direction of KL vs target.
    assert lines[-1]["objective/kl_coef"] != lines[0]["objective/kl_coef"]


def test_only_the_ppo_adapter_and_value_head_train(tiny_llama):
    model, tok = load(tiny_llama)
    add_sft(model)
    lora.set_trainable(model, "sft", True)        # even if loaded trainable, PPO freezes it
    tr = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), PPOConfig(progress=False),
                    frozen_adapters=["sft"])
    keys = [k for k, _ in tree_flatten(tr.policy.trainable_parameters())]
    assert keys and all(k.startswith("value_head.") or ".adapters.ppo." in k for k in keys)
    assert {k for k in keys if k.startswith("value_head.")} == {"value_head.summary.weight",
                                                                 "value_head.summary.bias"}
    n_lora = sum(1 for k in keys if ".adapters.ppo." in k)
    assert n_lora == 2 * 4 * 2                     # (A, B) x 4 targets x 2 layers
    with pytest.raises(MindprintError, match="already has an adapter named 'ppo'"):
        PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), PPOConfig(progress=False))
    # "sft" is active: left out of frozen_adapters it would be in the policy but not the reference
    with pytest.raises(MindprintError, match="adapter 'sft' is active in the model but not in "
                                             "frozen_adapters"):
        PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)),
                   PPOConfig(progress=False, adapter_name="last"))
    tr2 = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)),
                     PPOConfig(progress=False, adapter_name="last", num_layers=1),
                     frozen_adapters=["sft"])
    assert lora.adapter_settings(model, "last")["layers"] == [1]
    with pytest.raises(MindprintError, match="nope"):
        PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)),
                   PPOConfig(progress=False, adapter_name="p2"), frozen_adapters=["nope"])


def test_resume_continues_exactly_where_the_run_stopped(tiny_llama, tmp_path):
    def run(steps, out, resume=False):
        model, tok = load(tiny_llama)
        add_sft(model)
        reward_fn, _ = token_count_reward(tok, 40)
        cfg = PPOConfig(steps=steps, batch_size=4, mini_batch_size=2, max_new_tokens=5,
                        learning_rate=1e-2, seed=3, progress=False, save_every=1,
                        score_norm="running", missing_eos_penalty=0.5)
        res = train_ppo(model, tok, PROMPTS, reward_fn, cfg, out, frozen_adapters=["sft"], resume=resume)
        return res, {k: np.array(v) for k, v in lora.adapter_state(model, "ppo").items()}

    full, w_full = run(3, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed, w_res = run(3, tmp_path / "b", resume=True)
    assert resumed.steps == 3
    for k in w_full:
        np.testing.assert_allclose(w_res[k], w_full[k], atol=1e-6)
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]
    np.testing.assert_allclose(resumed.history[-1]["objective/kl_coef"],
                               full.history[-1]["objective/kl_coef"], rtol=1e-9)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["score_moments"]["count"] > 10


def test_ppo_step_on_a_4bit_quantized_base(tmp_path):
    from mindprint_mlx.models.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "m", hidden_size=64, intermediate_size=128)
    model, tok = load(path, quantize=4)
    add_sft(model)
    before = base_params(model)
    assert any(k.endswith(".scales") for k in before)      # really quantized
    reward_fn = lambda tokens, lengths: mx.array(lengths).astype(mx.float32) / 10
    cfg = PPOConfig(steps=2, batch_size=2, mini_batch_size=2, gradient_accumulation_steps=2,
                    max_new_tokens=4, learning_rate=1e-2, progress=False, save_every=0)
    res = train_ppo(model, tok, PROMPTS[:3], reward_fn, cfg, tmp_path / "run", frozen_adapters=["sft"])
    last = res.history[-1]
    assert abs(last["ppo/first_minibatch_ratio_mean"] - 1) < 1e-4
    assert last["ppo/memory/peak_bytes"] > 0
    assert last["ppo/memory/base_weight_bytes"] == sum(v.nbytes for v in before.values())
    after = base_params(model)
    assert all(after[k] is before[k] for k in after)
    assert any(np.abs(np.array(v)).sum() > 0 for k, v in lora.adapter_state(model, "ppo").items()
               if k.endswith("lora_b"))


def test_config_rejects_bad_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"mini_batch_size": 8, "batch_size": 4}))
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(f, PPOConfig)
    with pytest.raises(ConfigError, match="did you mean 'cliprange'"):
        load_config(None, PPOConfig, ["cliprang=0.1"])
    cfg = load_config(None, PPOConfig, ["ppo_epochs=2", "top_p=0.9"])
    assert cfg.ppo_epochs == 2 and cfg.top_p == 0.9 and cfg.learning_rate == 1.41e-5
    d = PPOConfig()
    assert (d.batch_size, d.ppo_epochs, d.init_kl_coef, d.target, d.horizon, d.cliprange,
            d.cliprange_value, d.vf_coef, d.gamma, d.lam, d.lora_rank, d.lora_alpha) == \
        (4, 4, 0.2, 6.0, 10000.0, 0.2, 0.2, 0.1, 1.0, 0.95, 1, 1.0)
    assert d.lora_targets == ["o_proj", "v_proj", "up_proj", "down_proj"]


def test_cli_trains_with_sft_adapter_and_reward_model_then_resumes(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    add_sft(model)
    save_adapter(model, "sft", tmp_path / "sft_adapter")
    lora.apply_lora(model, "reward", r=1, alpha=1.0)
    save_adapter(model, "reward", tmp_path / "rm",
                 heads={"reward": ScalarHead(hidden_size(model), zero_init=False)})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps({"prompt": "hi there"}),
                                  json.dumps({"messages": [{"role": "user", "content": "why"},
                                                           {"role": "assistant", "content": "ok"}]}),
                                  json.dumps({"prompt": [{"role": "user", "content": "a boat"}]})]) + "\n")
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tiny_llama), "prompts": str(prompts), "reward_model": str(tmp_path / "rm"),
        "sft_adapter": str(tmp_path / "sft_adapter"), "out_dir": str(tmp_path / "out"),
        "ppo": {"steps": 2, "batch_size": 2, "mini_batch_size": 1, "max_new_tokens": 4,
                "ppo_epochs": 1, "progress": False}}))
    r = CliRunner().invoke(cli, ["ppo", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "PPO: 2 steps" in r.output and "peak memory" in r.output
    assert (tmp_path / "out" / "ppo_adapter" / "adapters.safetensors").is_file()
    r = CliRunner().invoke(cli, ["ppo", "--config", str(cfg), "--resume", "ppo.steps=3"])
    assert r.exit_code == 0, r.output
    assert [x["step"] for x in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [1, 2, 3]
    r = CliRunner().invoke(cli, ["ppo", "--config", str(cfg), "ppo.top_p=2"])
    assert r.exit_code == 1 and "error:" in r.output and "top_p" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    r = CliRunner().invoke(cli, ["ppo", "--config", str(cfg), f"prompts={bad}"])
    assert r.exit_code == 1 and "bad.jsonl:2" in r.output


def test_prompts_come_from_jsonl_or_a_data_dirs_sft_records(tmp_path):
    from mindprint_mlx.ppo.run import load_prompts

    d = tmp_path / "data"
    d.mkdir()
    (d / "sft_data.jsonl").write_text(
        json.dumps({"prompt": "What is patience?", "completion": "Waiting well."}) + "\n" +
        json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]}) + "\n")
    got = load_prompts(d)
    assert [[m["content"] for m in p if m["role"] == "user"] for p in got] == [["What is patience?"], ["Hi"]]
    assert all(m["role"] != "assistant" for p in got for m in p)
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(MindprintError, match=r"p.jsonl:3"):
        load_prompts(f)
    with pytest.raises(MindprintError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
