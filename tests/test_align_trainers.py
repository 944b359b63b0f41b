"""DPO, DITTO, GRPO and RLOO on a tiny model: each learns, touches only its adapter (the
base and the frozen reference are the same arrays, unchanged), resumes bit-exactly."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mindprint_mlx.config import ConfigError
from mindprint_mlx.errors import Interrupted, MindprintError
from mindprint_mlx.grpo import GRPOConfig, GRPOTrainer, train_grpo
from mindprint_mlx.io import read_jsonl
from mindprint_mlx.models import load, lora
from mindprint_mlx.ppo.rollout import generate_batch, response_forward
from mindprint_mlx.preference import DITTOConfig, DPOConfig, DPOTrainer, encode_pairs, train_ditto, train_dpo
from mindprint_mlx.preference.dpo import pair_batch
from mindprint_mlx.stop import clear_stop, request_stop

TEXTS = ["hi there", "the teacher reads", "why does it rain", "a small boat"]
PAIRS = [(t, "yes it is a good day", "no") for t in TEXTS]
DEMOS = [(t, "the river is near the old clock") for t in TEXTS]


def fresh(path):
    """The tiny model with a frozen, non-trivial "sft" adapter: the reference."""
    model, tok = load(path)
    mx.random.seed(0)
    lora.apply_lora(model, "sft", r=2, alpha=4.0, trainable=False)
    for _, m in lora.lora_layers(model):
        m.adapters["sft"].lora_b = 0.2 * mx.random.normal(m.adapters["sft"].lora_b.shape)
    return model, tok


def base_params(model):
    return {k: v for k, v in tree_flatten(model.parameters()) if ".adapters." not in k}


def weights(model, name):
    return {k: np.array(v) for k, v in lora.adapter_state(model, name).items()}


def ref_logps(model, tok):
    b = pair_batch(encode_pairs(tok, PAIRS, 64), tok.pad_token_id)
    with lora.active_adapters(model, ["sft"]):
        lp, _, _ = response_forward(model, b.tokens, b.prompt_lengths, b.response_tokens)
    return np.array(lp)


def likeliest_token(model, tok):
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in TEXTS]
    with lora.active_adapters(model, ["sft"]):
        g = generate_batch(model, prompts * 4, 6, [tok.eos_token_id], tok.pad_token_id, key=mx.random.key(0))
        _, _, logits = response_forward(model, g.tokens, g.prompt_lengths, g.response_tokens,
                                        return_logits=True)
    probs = np.array(mx.softmax(logits, axis=-1)).reshape(-1, logits.shape[-1]).mean(axis=0)
    probs[:4] = 0
    return int(probs.argmax())


def count_reward(tok, target=None):
    """Scores = how often `target` (None: any even token id) occurs in each response."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in TEXTS]

    def reward_fn(tokens, lengths):
        out = []
        for row, n in zip(np.array(tokens), np.array(lengths)):
            start = next(len(p) for p in prompts if list(row[:len(p)]) == list(p))
            resp = row[start:n]
            out.append(float((resp % 2 == 0).sum() if target is None else (resp == target).sum()))
        return mx.array(out)
    return reward_fn


def check_grads_reach_only(trainer_grads, name):
    keys = [k for k, _ in tree_flatten(trainer_grads)]
    assert keys and all(f".adapters.{name}." in k for k in keys), keys[:3]
    flat = dict(tree_flatten(trainer_grads))
    # B starts at zero, so A's gradient is 0 at step 0; every B gets a non-zero gradient
    assert all(float(mx.abs(v).sum()) > 0 for k, v in flat.items() if k.endswith("lora_b"))


# ------------------------------------------------------------------ DPO

def test_dpo_learns_the_pairs_and_touches_only_its_adapter(tiny_llama, tmp_path):
    model, tok = fresh(tiny_llama)
    base_before = base_params(model)
    sft_before = weights(model, "sft")
    ref_before = ref_logps(model, tok)
    cfg = DPOConfig(steps=6, batch_size=2, learning_rate=1e-2, progress=False, save_every=0)
    res = train_dpo(model, tok, PAIRS, cfg, tmp_path / "run", frozen_adapters=["sft"])
    losses = [h["loss"] for h in res.history]
    assert abs(losses[0] - np.log(2)) < 1e-5          # the policy starts as the reference
    assert losses[-1] < 0.3 * losses[0], losses
    assert res.history[-1]["rewards/accuracies"] == 1.0
    assert res.history[-1]["rewards/margins"] > 0
    after = base_params(model)
    assert all(after[k] is base_before[k] for k in base_before)
    assert all(np.array_equal(v, sft_before[k]) for k, v in weights(model, "sft").items())
    assert np.array_equal(ref_logps(model, tok), ref_before)   # the reference never moved
    assert (res.adapter_dir / "adapters.safetensors").is_file()
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))
    assert not lora.adapter_settings(model, "dpo")["layers"] == []
    assert all("dpo" not in m.active for _, m in lora.lora_layers(model))


def test_dpo_gradients_reach_exactly_the_trainable_adapter(tiny_llama):
    model, tok = fresh(tiny_llama)
    lora.set_trainable(model, "sft", True)             # frozen by the trainer all the same
    tr = DPOTrainer(model, tok, DPOConfig(progress=False), frozen_adapters=["sft"])
    b = pair_batch(encode_pairs(tok, PAIRS, 64), tr.pad_id)
    ref = tr.reference_logps(b)
    with lora.active_adapters(model, tr.policy_adapters):
        (loss, _), grads = tr._loss_and_grad(model, (b, ref))
    check_grads_reach_only(grads, "dpo")
    with pytest.raises(MindprintError, match="already has an adapter named 'dpo'"):
        DPOTrainer(model, tok, DPOConfig(progress=False), frozen_adapters=["sft"])
    with pytest.raises(MindprintError, match="adapter 'sft' is active"):
        DPOTrainer(model, tok, DPOConfig(progress=False, adapter_name="x"))


def test_rpo_adds_the_chosen_answers_nll_and_keeps_it_likely(tiny_llama, tmp_path):
    """rpo_alpha: each pair's loss is DPO's plus alpha x the chosen answer's per-token NLL
    (checked on one batch against the two computed apart); trained, the chosen answers'
    log-probs end higher than plain DPO leaves them."""
    from mindprint_mlx.preference.losses import dpo_loss as dl, sequence_logps as sl

    model, tok = fresh(tiny_llama)
    tr = DPOTrainer(model, tok, DPOConfig(rpo_alpha=0.5, progress=False), frozen_adapters=["sft"])
    for _, m in lora.lora_layers(model):          # a policy unlike the reference
        m.adapters["dpo"].lora_b = 0.2 * mx.random.normal(m.adapters["dpo"].lora_b.shape, key=mx.random.key(3))
    b = pair_batch(encode_pairs(tok, PAIRS, 64), tr.pad_id)
    ref = tr.reference_logps(b)
    with lora.active_adapters(model, tr.policy_adapters):
        (loss, stats), _ = tr._loss_and_grad(model, (b, ref))
        lp, _, _ = response_forward(model, b.tokens, b.prompt_lengths, b.response_tokens)
    B = len(PAIRS)
    seq = sl(lp, b.mask)
    plain = dl(seq[:B], seq[B:], ref[:B], ref[B:], 0.1)[0]
    nll = -(np.array(lp[:B] * b.mask[:B]).sum(1) / np.array(b.mask[:B]).sum(1))
    expect = float(np.mean(np.array(plain) + 0.5 * nll))
    assert abs(float(loss) - expect) < 1e-5 * max(1.0, abs(expect))
    assert abs(float(stats["nll_loss"]) - nll.mean()) < 1e-5
    lora.remove_adapter(model, "dpo")

    chosen = {}
    for alpha in (None, 1.0):
        model, tok = fresh(tiny_llama)
        cfg = DPOConfig(steps=8, batch_size=2, learning_rate=2e-2, rpo_alpha=alpha, progress=False,
                        save_every=0)
        res = train_dpo(model, tok, PAIRS, cfg, tmp_path / f"rpo{alpha}", frozen_adapters=["sft"])
        chosen[alpha] = res.history[-1]["logps/chosen"]
        assert res.history[-1]["rewards/margins"] > 0
    assert chosen[1.0] > chosen[None], chosen


def test_dpo_resumes_bit_exactly(tiny_llama, tmp_path):
    def run(steps, out, resume=False):
        model, tok = fresh(tiny_llama)
        cfg = DPOConfig(steps=steps, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                        loss_type="ipo", progress=False, save_every=1, seed=3)
        res = train_dpo(model, tok, PAIRS, cfg, out, frozen_adapters=["sft"], resume=resume)
        return res, weights(model, "dpo")

    full, w_full = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    res, w_res = run(4, tmp_path / "b", resume=True)
    assert res.steps == 4 and all(np.array_equal(w_res[k], w_full[k]) for k in w_full)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in full.history]
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]


# ------------------------------------------------------------------ DITTO

def test_ditto_rounds_learn_and_resume_bit_exactly_after_a_stop(tiny_llama, tmp_path):
    cfg = dict(rounds=2, steps=3, batch_size=2, samples_per_prompt=2, max_new_tokens=6,
               learning_rate=1e-2, progress=False, save_every=0, seed=1)
    model, tok = fresh(tiny_llama)
    full = train_ditto(model, tok, DEMOS, DITTOConfig(**cfg), tmp_path / "a", frozen_adapters=["sft"])
    w_full = weights(model, "ditto")
    losses = [h["loss"] for h in full.history]
    assert abs(losses[0] - np.log(2)) < 1e-5 and losses[2] < losses[0]
    assert full.pairs_per_round == [8, 16]            # round 2 replays round 1's samples
    assert [h["ditto/round"] for h in full.history] == [1, 1, 1, 2, 2, 2]

    def stop_at_4(step, rec):
        if step == 4:
            request_stop()
    model, tok = fresh(tiny_llama)
    try:
        with pytest.raises(Interrupted):
            train_ditto(model, tok, DEMOS, DITTOConfig(**cfg), tmp_path / "b", ["sft"], on_step=stop_at_4)
    finally:
        clear_stop()
    model, tok = fresh(tiny_llama)
    res = train_ditto(model, tok, DEMOS, DITTOConfig(**cfg), tmp_path / "b", ["sft"], resume=True)
    assert all(np.array_equal(v, w_full[k]) for k, v in weights(model, "ditto").items())
    assert [h["loss"] for h in res.history] == losses


# ------------------------------------------------------------------ GRPO / RLOO

@pytest.mark.parametrize("method,extra", [("grpo", {}), ("grpo", {"loss_type": "dr_grpo", "scale_rewards": False}),
                                          ("rloo", {})])
def test_grpo_and_rloo_raise_a_programmatic_reward(tiny_llama, tmp_path, method, extra):
    model, tok = fresh(tiny_llama)
    base_before = base_params(model)
    reward_fn = count_reward(tok, likeliest_token(model, tok))
    # 20 steps: the likeliest token is rarely sampled at first (scores near 0), and in 12
    # steps RLOO had climbed by only 0.06-0.2 on two of sampling seeds 0-2 on one machine;
    # in 20 every method and seed reached 2.7-3.7 of the 4 tokens
    cfg = GRPOConfig(method=method, steps=20, batch_size=4, group_size=4, max_new_tokens=4,
                     learning_rate=2e-2, num_iterations=2, progress=False, save_every=0, **extra)
    res = train_grpo(model, tok, TEXTS, reward_fn, cfg, tmp_path / "run", frozen_adapters=["sft"])
    scores = [h["objective/scores"] for h in res.history]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 1.0, scores
    assert all(abs(h[f"{method}/first_iteration_ratio_mean"] - 1) < 1e-4 for h in res.history)
    assert all(base_params(model)[k] is v for k, v in base_before.items())
    assert (tmp_path / "run" / f"{method}_adapter" / "adapters.safetensors").is_file()


def test_grpo_gradients_reach_exactly_the_trainable_adapter(tiny_llama):
    model, tok = fresh(tiny_llama)
    reward_fn = count_reward(tok)                      # dense: every group has a spread
    tr = GRPOTrainer(model, tok, reward_fn, GRPOConfig(group_size=4, max_new_tokens=4, progress=False),
                     frozen_adapters=["sft"])
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in TEXTS]
    gen, ro = tr.rollout(prompts, mx.random.key(0))
    _, adv = tr.advantages(gen, ro)
    assert float(mx.abs(adv).sum()) > 0
    from mindprint_mlx.grpo.trainer import _Rows
    rows = _Rows(gen.tokens, gen.prompt_lengths, gen.response_tokens, gen.response_mask, ro["old"],
                 ro["ref"], adv)
    with lora.active_adapters(model, tr.policy_adapters):
        _, grads = tr._loss_and_grad(model, (rows, float(gen.tokens.shape[0])))
    check_grads_reach_only(grads, "grpo")


def test_grpo_old_logprobs_from_the_sampler_equal_teacher_forcing(tiny_llama):
    """old_logprobs="rollout" (the default on CPU) keeps the sampler's log-probs instead of a
    second policy pass: the same samples, old and reference log-probs within 1e-5 of
    old_logprobs="forward"."""
    model, tok = fresh(tiny_llama)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in TEXTS]
    out = {}
    for mode in ("rollout", "forward"):
        cfg = GRPOConfig(group_size=3, max_new_tokens=5, temperature=0.8, old_logprobs=mode,
                         adapter_name=f"g_{mode}", progress=False)
        tr = GRPOTrainer(model, tok, count_reward(tok), cfg, frozen_adapters=["sft"])
        assert tr.rollout_logprobs == (mode == "rollout")
        for _, m in lora.lora_layers(model):      # a policy unlike the reference
            m.adapters[cfg.adapter_name].lora_b = 0.3 * mx.random.normal(
                m.adapters[cfg.adapter_name].lora_b.shape, key=mx.random.key(1))
        gen, ro = tr.rollout(prompts, mx.random.key(3))
        mask = np.array(gen.response_mask) > 0
        out[mode] = (np.array(gen.tokens), np.array(ro["old"]), np.array(ro["ref"]), mask)
        lora.remove_adapter(model, cfg.adapter_name)
    (t0, o0, r0, m0), (t1, o1, r1, m1) = out["rollout"], out["forward"]
    assert (t0 == t1).all() and (m0 == m1).all()
    assert np.abs(o0 - o1)[m0].max() < 1e-5 and np.abs(r0 - r1)[m0].max() < 1e-5
    assert np.abs(o0 - r0)[m0].max() > 1e-2          # the two passes read different adapters


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_grpo_resumes_bit_exactly(tiny_llama, tmp_path, method):
    def run(steps, out, resume=False):
        model, tok = fresh(tiny_llama)
        reward_fn = count_reward(tok, 40)
        cfg = GRPOConfig(method=method, steps=steps, batch_size=2, group_size=3, max_new_tokens=4,
                         gradient_accumulation_steps=2, learning_rate=1e-2, loss_type="dapo",
                         progress=False, save_every=1, seed=5)
        res = train_grpo(model, tok, TEXTS, reward_fn, cfg, out, frozen_adapters=["sft"], resume=resume)
        return res, weights(model, method)

    full, w_full = run(3, tmp_path / "a")
    run(2, tmp_path / "b")
    res, w_res = run(3, tmp_path / "b", resume=True)
    assert all(np.array_equal(w_res[k], w_full[k]) for k in w_full)
    assert res.history[-1][f"{method}/loss"] == full.history[-1][f"{method}/loss"]


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("cls,key,value", [
    (DPOConfig, "beta", float("nan")), (DPOConfig, "learning_rate", float("inf")),
    (DPOConfig, "beta", 0.0), (DPOConfig, "label_smoothing", 0.5), (DPOConfig, "loss_type", "hinge"),
    (DPOConfig, "gradient_accumulation_steps", 3), (DPOConfig, "rpo_alpha", -1.0),
    (DITTOConfig, "rounds", 0), (DITTOConfig, "temperature", float("nan")),
    (GRPOConfig, "group_size", 1), (GRPOConfig, "beta", float("nan")), (GRPOConfig, "epsilon", 1.0),
    (GRPOConfig, "epsilon_high", float("inf")), (GRPOConfig, "loss_type", "bnpo"),
    (GRPOConfig, "method", "ppo"), (GRPOConfig, "old_logprobs", "sampler")])
def test_configs_reject_bad_values_in_one_line(cls, key, value):
    cfg = cls(**{key: value})
    with pytest.raises(ConfigError, match=f"key '{key}'") as e:
        cfg.validate()
    assert "\n" not in str(e.value)
