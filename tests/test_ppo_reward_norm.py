"""PPO's reward normalisation (OpenAI's gain and bias from SFT-policy samples), value-head
init from the reward head, the batch-of-1 score-moments guard, and the checks at
PPOTrainer init (undeclared active adapters, logits the trunk split does not reproduce)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mindprint_mlx.errors import MindprintError
from mindprint_mlx.io import read_jsonl
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import adapter_metadata
from mindprint_mlx.models.heads import ScalarHead, check_trunk_split, hidden_size
from mindprint_mlx.ppo import PPOConfig, PPOTrainer, train_ppo
from mindprint_mlx.ppo.reward_norm import fit_reward_norm
from mindprint_mlx.ppo.rollout import response_forward
from mindprint_mlx.ppo.trainer import RunningMoments

from _helpers import add_sft

TEXTS = ["hi there", "the teacher reads", "why does it rain", "a small boat", "tell me a story"]
PROMPTS = [[{"role": "user", "content": t}] for t in TEXTS]


class Recorder:
    """A reward: mean token id of the row over its length, raw scale around 100; it
    records every call's scores."""

    def __init__(self):
        self.calls = []

    def __call__(self, tokens, lengths):
        t, n = np.array(tokens), np.array(lengths)
        s = np.array([t[i, :n[i]].mean() + 3.0 for i in range(len(n))], dtype=np.float32)
        self.calls.append(s)
        return mx.array(s)


def test_fit_reward_norm_gives_mean_0_std_1_and_guards_no_spread():
    x = np.array([-4.2, -3.1, -5.0, -3.9, -4.4])
    n = fit_reward_norm(x)
    y = n.gain * x + n.bias
    assert abs(y.mean()) < 1e-12 and abs(y.std() - 1) < 1e-12 and n.samples == 5
    one = fit_reward_norm([2.5, 2.5, 2.5])
    assert one.gain == 1.0 and one.bias == -2.5
    with pytest.raises(MindprintError, match="finite"):
        fit_reward_norm([1.0, float("nan")])


def _cfg(**kw):
    base = dict(steps=3, batch_size=4, mini_batch_size=2, max_new_tokens=5, learning_rate=1e-2,
                seed=1, progress=False, save_every=0, reward_norm="sft_samples",
                reward_norm_samples=12)
    base.update(kw)
    return PPOConfig(**base)


def test_reward_norm_is_fitted_on_sft_samples_recorded_and_applied(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    add_sft(model)
    rec = Recorder()
    res = train_ppo(model, tok, PROMPTS, rec, _cfg(), tmp_path / "run", frozen_adapters=["sft"])
    # The first 12 scores are the SFT-policy samples (3 batches of batch_size 4): mapped by
    # gain and bias they have mean 0 and std 1.
    fit = np.concatenate(rec.calls[:3])
    assert fit.size == 12 and len(rec.calls) == 3 + 3
    y = res.reward_gain * fit.astype(np.float64) + res.reward_bias
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1) < 1e-5
    assert res.reward_gain != 1.0
    # Every training score went through the same map (no EOS penalty, no score_norm here).
    for h, raw in zip(res.history, rec.calls[3:]):
        assert h["ppo/reward_norm/gain"] == res.reward_gain
        assert h["ppo/mean_scores"] == pytest.approx(res.reward_gain * raw.mean() + res.reward_bias,
                                                     rel=1e-5, abs=1e-5)
        assert h["objective/scores"] == pytest.approx(raw.mean(), rel=1e-6)
    meta = adapter_metadata(res.adapter_dir)
    assert meta["reward_norm"]["gain"] == res.reward_gain and meta["reward_norm"]["samples"] == 12
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert lines[0]["ppo/reward_norm/bias"] == res.reward_bias

    # Seeded: the same seed fits the same map, another seed draws other samples.
    for seed, same in ((1, True), (2, False)):
        model2, tok2 = load(tiny_llama)
        add_sft(model2)
        res2 = train_ppo(model2, tok2, PROMPTS, Recorder(), _cfg(seed=seed, steps=1),
                         tmp_path / f"seed{seed}", frozen_adapters=["sft"])
        assert ((res2.reward_gain, res2.reward_bias) == (res.reward_gain, res.reward_bias)) == same


def test_reward_norm_is_saved_with_the_checkpoint_and_not_refitted_on_resume(tiny_llama, tmp_path):
    def run(steps, out, resume=False):
        model, tok = load(tiny_llama)
        add_sft(model)
        rec = Recorder()
        res = train_ppo(model, tok, PROMPTS, rec, _cfg(steps=steps, save_every=1), out,
                        frozen_adapters=["sft"], resume=resume)
        return res, rec

    full, _ = run(3, tmp_path / "a")
    run(2, tmp_path / "b")
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["reward_norm"]["gain"] == full.reward_gain
    resumed, rec = run(3, tmp_path / "b", resume=True)
    assert len(rec.calls) == 1                     # step 3 only: no new normalisation samples
    assert (resumed.reward_gain, resumed.reward_bias) == (full.reward_gain, full.reward_bias)
    assert resumed.history[-1]["ppo/mean_scores"] == pytest.approx(full.history[-1]["ppo/mean_scores"],
                                                                   rel=1e-5)


def test_value_head_can_start_from_the_reward_head(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    add_sft(model)
    mx.random.seed(4)
    head = ScalarHead(hidden_size(model), zero_init=False)
    head.summary.bias = mx.array([0.7])

    class RM:                                      # stands in for a RewardModel
        def __init__(self):
            self.head = head
            self.rec = Recorder()

        def score_tokens(self, tokens, lengths):
            return self.rec(tokens, lengths)

    rm = RM()
    cfg = _cfg(steps=1, value_head_init="reward", learning_rate=1e-9)
    tr_seen = {}
    orig = PPOTrainer.init_value_head_from_reward

    def spy(self, reward_head):
        orig(self, reward_head)
        tr_seen["w"] = np.array(self.value_head.summary.weight)
        tr_seen["b"] = np.array(self.value_head.summary.bias)
        tr_seen["norm"] = self.reward_norm

    PPOTrainer.init_value_head_from_reward = spy
    try:
        train_ppo(model, tok, PROMPTS, rm.score_tokens, cfg, tmp_path / "run", frozen_adapters=["sft"])
    finally:
        PPOTrainer.init_value_head_from_reward = orig
    n = tr_seen["norm"]
    np.testing.assert_allclose(tr_seen["w"], n.gain * np.array(head.summary.weight), rtol=1e-6)
    np.testing.assert_allclose(tr_seen["b"], n.gain * 0.7 + n.bias, rtol=1e-5)
    # Off by default; asking for it with a reward function that has no head is an error.
    assert PPOConfig().value_head_init == "zero"
    model2, tok2 = load(tiny_llama)
    with pytest.raises(MindprintError, match="value_head_init=reward needs the reward head"):
        train_ppo(model2, tok2, PROMPTS, Recorder(), _cfg(value_head_init="reward"), tmp_path / "x")


def test_running_moments_of_one_score_do_not_blow_up(tiny_llama, tmp_path):
    m = RunningMoments()
    m.update(np.array([2.5]))
    assert m.std == 1.0 and m.mean == pytest.approx(2.5)
    m.update(np.array([4.5]))
    assert m.std == pytest.approx(np.std([2.5, 4.5], ddof=1))
    # A global batch of 1 with score_norm=scale: 2.5 stays 2.5 (it was 889,112).
    model, tok = load(tiny_llama)
    add_sft(model)
    cfg = PPOConfig(steps=2, batch_size=1, mini_batch_size=1, max_new_tokens=3, progress=False,
                    save_every=0, score_norm="scale")
    res = train_ppo(model, tok, PROMPTS, lambda t, l: mx.full((t.shape[0],), 2.5), cfg,
                    tmp_path / "run", frozen_adapters=["sft"])
    assert [h["ppo/mean_scores"] for h in res.history] == pytest.approx([2.5, 2.5])


def _tiny_granite(tok, logits_scaling):
    from mlx_lm.models import granite

    args = granite.ModelArgs(model_type="granite", hidden_size=64, num_hidden_layers=2,
                             intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-5,
                             vocab_size=len(tok.get_vocab()), logits_scaling=logits_scaling,
                             attention_multiplier=0.25, embedding_multiplier=2.0,
                             residual_multiplier=0.5, max_position_embeddings=256,
                             num_key_value_heads=2, attention_bias=False, mlp_bias=False,
                             rope_theta=10000.0)
    mx.random.seed(0)
    model = granite.Model(args)
    mx.eval(model.parameters())
    return model


def test_ppo_samples_and_scores_with_granites_scaled_logits(tiny_llama):
    _, tok = load(tiny_llama)
    model = _tiny_granite(tok, logits_scaling=8.0)
    check_trunk_split(model)                       # lm_logits divides by logits_scaling
    tr = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)),
                    PPOConfig(max_new_tokens=4, batch_size=2, mini_batch_size=2, progress=False))
    prompts = [tok.apply_chat_template(p, add_generation_prompt=True) for p in PROMPTS[:2]]
    gen, ro = tr.rollout(prompts, mx.random.key(0))
    # the rollout's log-probabilities are those of the model's own logits, model(tokens)
    full = model(gen.tokens).astype(mx.float32)
    full = full - mx.logsumexp(full, axis=-1, keepdims=True)
    R = gen.response_tokens.shape[1]
    pos = np.array(gen.prompt_lengths)[:, None] - 1 + np.arange(R)[None, :]
    want = np.take_along_axis(np.take_along_axis(np.array(full), pos[:, :, None], axis=1),
                              np.array(gen.response_tokens)[:, :, None], axis=2)[..., 0]
    mask = np.array(gen.response_mask)
    np.testing.assert_allclose(np.array(ro["logprobs"]) * mask, want * mask, atol=1e-5)
    np.testing.assert_allclose(np.array(gen.sample_logprobs), want * mask, atol=1e-4)
    lp, _, _ = response_forward(model, gen.tokens, gen.prompt_lengths, gen.response_tokens)
    np.testing.assert_allclose(np.array(lp) * mask, want * mask, atol=1e-5)


def test_ppo_refuses_a_model_whose_logits_the_trunk_split_does_not_give(tiny_llama, monkeypatch):
    model, tok = load(tiny_llama)
    cls = type(model)
    original = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: original(self, *a, **k) * 3.0)
    with pytest.raises(MindprintError, match="trunk/output split does not reproduce"):
        PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), PPOConfig(progress=False))
    assert "ppo" not in lora.adapter_names(model)


def test_value_head_from_a_bias_free_reward_head():
    # A RewardModel's head has no bias (Bradley-Terry cannot train one); the value head
    # built from it takes the normalisation's bias alone (a pipeline run with
    # value_head_init: reward used to fail here).
    from mindprint_mlx.ppo.reward_norm import RewardNorm, value_head_from_reward

    mx.random.seed(5)
    head = ScalarHead(16, zero_init=False, bias=False)
    norm = RewardNorm(gain=2.0, bias=-0.5)
    v = value_head_from_reward(head, 16, norm)
    np.testing.assert_allclose(np.array(v.summary.weight), 2.0 * np.array(head.summary.weight), rtol=1e-6)
    assert v.bias_value == pytest.approx(-0.5)
    x = mx.random.normal((3, 16))
    np.testing.assert_allclose(np.array(v(x)), 2.0 * np.array(head(x)) - 0.5, rtol=1e-5, atol=1e-6)
