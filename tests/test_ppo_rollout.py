"""Rollouts: batched KV-cache sampling, right-padding and masks after EOS, and teacher-forced
log-probabilities that reproduce the sampling distribution."""

import mlx.core as mx
import numpy as np
import pytest

from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, lora
from mindprint_mlx.ppo import PPOConfig, PPOTrainer, generate_batch, response_forward
from mindprint_mlx.ppo.rollout import _finish, batched_response_forward
from mindprint_mlx.ppo.trainer import _Batch
from mindprint_mlx.ppo.advantages import gae, masked_whiten, kl_penalized_rewards

TEXTS = ["hi there", "the teacher reads a letter near the river after dinner", "why"]


@pytest.fixture(scope="module")
def model_tok(tiny_llama):
    model, tok = load(tiny_llama)
    mx.random.seed(0)
    lora.apply_lora(model, "sft", r=2, alpha=4.0, trainable=False)
    for _, m in lora.lora_layers(model):          # a non-trivial frozen SFT adapter
        m.adapters["sft"].lora_b = 0.3 * mx.random.normal(m.adapters["sft"].lora_b.shape)
    return model, tok


def prompts(tok):
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            for t in TEXTS]


def test_finish_right_pads_and_masks_after_the_first_eos():
    sampled = np.array([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]], dtype=np.int32)
    lps = np.full(sampled.shape, -1.0, dtype=np.float32)
    g = _finish([[10, 11], [12], [13, 14, 15]], sampled, lps, np.array([2]), pad_id=3)
    assert g.response_lengths.tolist() == [2, 4, 1]
    assert g.ended.tolist() == [True, False, True]
    assert g.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert g.response_tokens.tolist() == [[5, 2, 3, 3], [5, 6, 7, 8], [2, 3, 3, 3]]
    assert g.tokens.tolist() == [[10, 11, 5, 2, 3, 3, 3], [12, 5, 6, 7, 8, 3, 3],
                                 [13, 14, 15, 2, 3, 3, 3]]
    assert g.lengths.tolist() == [4, 5, 4]
    assert g.sample_logprobs.tolist() == [[-1, -1, 0, 0], [-1, -1, -1, -1], [-1, 0, 0, 0]]


def test_generation_stops_at_eos_and_pads_after_it(model_tok):
    model, tok = model_tok
    ps = prompts(tok)
    key = mx.random.key(3)
    free = generate_batch(model, ps, 6, [tok.eos_token_id], tok.pad_token_id, key=key)
    assert free.response_tokens.shape == (3, 6)
    # Declare the token row 0 sampled at position 2 an end-of-turn: the same key then samples the
    # same tokens, and row 0 stops there with that token masked in and padding after it.
    stop = int(free.response_tokens[0, 2])
    g = generate_batch(model, ps, 6, [stop], tok.pad_token_id, key=key)
    first = int(np.argmax(np.array(free.response_tokens[0]) == stop))
    assert int(g.response_lengths[0]) == first + 1 and bool(g.ended[0])
    assert g.response_tokens[0, :first + 1].tolist() == free.response_tokens[0, :first + 1].tolist()
    assert all(t == tok.pad_token_id for t in g.response_tokens[0, first + 1:].tolist())
    assert g.response_mask[0].tolist() == [1.0] * (first + 1) + [0.0] * (g.response_tokens.shape[1] - first - 1)
    row = g.tokens[0].tolist()
    n = len(ps[0])
    assert row[:n] == ps[0] and row[n:n + first + 1] == g.response_tokens[0, :first + 1].tolist()
    # Row 0 left the batch (its KV-cache rows were dropped): the others still sample exactly
    # what teacher forcing computes.
    lp, _ = batched_response_forward(model, g, 1.0)
    m = np.array(g.response_mask) > 0
    assert np.abs(np.array(lp) - np.array(g.sample_logprobs))[m].max() < 1e-4
    assert int(g.response_lengths.max()) > first + 1


def test_a_share_of_the_batch_samples_its_rows_of_the_whole_batch(model_tok):
    """draw=(rows, n): prompts that are rows `rows` of a batch of n (a data-parallel rank's
    share) sample what the whole batch samples in those rows, rows leaving at EOS included."""
    model, tok = model_tok
    ps = prompts(tok) + [prompts(tok)[1]]
    key = mx.random.key(5)
    free = generate_batch(model, ps, 6, [tok.eos_token_id], tok.pad_token_id, key=key)
    eos = [int(free.response_tokens[1, 1]), tok.eos_token_id]     # row 1 ends early
    whole = generate_batch(model, ps, 6, eos, tok.pad_token_id, key=key)
    for rows in ([0, 2], [3, 1], [1]):
        part = generate_batch(model, [ps[r] for r in rows], 6, eos, tok.pad_token_id, key=key,
                              draw=(rows, len(ps)))
        R = part.response_tokens.shape[1]
        assert part.response_tokens.tolist() == whole.response_tokens[mx.array(rows), :R].tolist()
        assert part.ended.tolist() == whole.ended[mx.array(rows)].tolist()
        diff = mx.abs(part.sample_logprobs - whole.sample_logprobs[mx.array(rows), :R]).max().item()
        assert diff < 1e-5
    # row 1 of the whole batch is not row 0 of a batch of one: the draw is what differs
    alone = generate_batch(model, [ps[1]], 6, eos, tok.pad_token_id, key=key)
    assert alone.response_tokens.tolist() != whole.response_tokens[1:2, :alone.response_tokens.shape[1]].tolist()
    with pytest.raises(MindprintError, match="do not fit"):
        generate_batch(model, ps[:2], 4, eos, tok.pad_token_id, key=key, draw=([0, 4], 4))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0)])
def test_teacher_forcing_reproduces_sampling_logprobs(model_tok, temperature, top_p):
    """Left-padded KV-cache sampling and right-padded teacher forcing agree, and both use
    logits / T: checked against the model's own full forward pass too."""
    model, tok = model_tok
    ps = prompts(tok)
    with lora.active_adapters(model, ["sft"]):
        g = generate_batch(model, ps, 8, [tok.eos_token_id], tok.pad_token_id, temperature,
                           top_p, key=mx.random.key(1))
        lp, _ = batched_response_forward(model, g, temperature)
        full = model(g.tokens).astype(mx.float32) / temperature
    m = np.array(g.response_mask) > 0
    assert np.abs(np.array(lp) - np.array(g.sample_logprobs))[m].max() < 1e-4
    full = full - mx.logsumexp(full, axis=-1, keepdims=True)
    for b, n in enumerate(g.prompt_lengths.tolist()):
        for j in range(int(g.response_lengths[b])):
            tok_id = int(g.tokens[b, n + j])
            assert abs(float(full[b, n + j - 1, tok_id]) - float(lp[b, j])) < 1e-4


@pytest.mark.parametrize("entropy", [False, True])
def test_chunked_output_layer_gives_the_same_logprobs_and_gradients(model_tok, entropy):
    """response_forward's output layer in checkpointed chunks (what a real vocabulary gets:
    above 8 MiB of logits) gives one piece's log-probs, entropies and gradients, under
    nn.value_and_grad with a trainable adapter (the token ids are indices: no gradient)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, tok = model_tok
    with lora.active_adapters(model, ["sft"]):
        g = generate_batch(model, prompts(tok), 7, [tok.eos_token_id], tok.pad_token_id, 1.0,
                           key=mx.random.key(4))
    lora.apply_lora(model, "chunk_t", r=2, alpha=4.0)
    try:
        for _, m in lora.lora_layers(model):
            m.adapters["chunk_t"].lora_b = 0.2 * mx.random.normal(m.adapters["chunk_t"].lora_b.shape,
                                                                  key=mx.random.key(2))
        got = {}
        for chunk in (0, 2):
            def loss(params):
                model.update(params)
                lp, _, ent = response_forward(model, g.tokens, g.prompt_lengths, g.response_tokens,
                                              0.8, return_entropy=entropy, logit_chunk=chunk)
                out = (lp * g.response_mask).sum()
                return out + (ent * g.response_mask).sum() if entropy else out

            with lora.active_adapters(model, ["sft", "chunk_t"]):
                val, grads = mx.value_and_grad(loss)(model.trainable_parameters())
            got[chunk] = (float(val), {k: np.array(v) for k, v in tree_flatten(grads)})
    finally:
        lora.remove_adapter(model, "chunk_t")
    (v0, g0), (v2, g2) = got[0], got[2]
    assert abs(v0 - v2) <= 1e-5 * max(1.0, abs(v0)) and g0.keys() == g2.keys() and g0
    for k in g0:
        assert np.abs(g0[k] - g2[k]).max() <= 1e-5 * max(1e-6, np.abs(g0[k]).max()), k
    assert any(np.abs(v).max() > 0 for v in g0.values())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_and_values_equal_teacher_forcing(model_tok, temperature):
    """The old log-probs and values PPO keeps from the rollout (no second policy pass) are
    what the teacher-forced pass computes, within 1e-5 (bit-equal measured on CPU), rows that
    stopped early at an EOS included."""
    from mindprint_mlx.models.heads import ScalarHead, hidden_size

    model, tok = model_tok
    head = ScalarHead(hidden_size(model), zero_init=False)
    with lora.active_adapters(model, ["sft"]):
        free = generate_batch(model, prompts(tok), 12, [], tok.pad_token_id, temperature,
                              key=mx.random.key(4))
        stop = int(free.response_tokens[1, 3])          # row 1 stops early, the others go on
        g = generate_batch(model, prompts(tok), 12, [stop], tok.pad_token_id, temperature,
                           key=mx.random.key(4), value_head=head)
        lp, v = batched_response_forward(model, g, temperature, head)
    m = np.array(g.response_mask) > 0
    assert bool(g.ended[1]) and int(g.response_lengths[1]) <= 4 and int(g.response_lengths.max()) > 4
    assert np.abs(np.array(lp) - np.array(g.sample_logprobs))[m].max() < 1e-5
    assert np.abs(np.array(v) - np.array(g.sample_values))[m].max() < 1e-5
    assert (np.array(g.sample_values)[~m] == 0).all() and np.abs(np.array(v))[m].mean() > 1e-2


def test_rollout_and_forward_old_logprobs_agree(model_tok):
    """old_logprobs="rollout" (the default on CPU) skips the policy's teacher-forced pass; its
    log-probs, values and the reference are those of old_logprobs="forward" within 1e-5."""
    model, tok = model_tok
    out = {}
    for mode in ("rollout", "forward"):
        cfg = PPOConfig(batch_size=3, mini_batch_size=3, max_new_tokens=6, temperature=0.8,
                        adapter_name="ppo_t2", old_logprobs=mode, progress=False)
        tr = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), cfg, frozen_adapters=["sft"])
        try:
            assert tr.rollout_logprobs == (mode == "rollout")
            tr.value_head.summary.weight = 0.1 * mx.random.normal(tr.value_head.summary.weight.shape,
                                                                 key=mx.random.key(0))
            for _, m in lora.lora_layers(model):
                m.adapters["ppo_t2"].lora_b = 0.5 * mx.random.normal(m.adapters["ppo_t2"].lora_b.shape,
                                                                     key=mx.random.key(1))
            gen, ro = tr.rollout(prompts(tok), mx.random.key(5))
            out[mode] = {k: np.array(ro[k]) for k in ("logprobs", "values", "ref_logprobs")}
            out[mode]["tokens"] = np.array(gen.tokens)
        finally:
            lora.remove_adapter(model, "ppo_t2")
    assert (out["rollout"]["tokens"] == out["forward"]["tokens"]).all()
    for k in ("logprobs", "values", "ref_logprobs"):
        assert np.abs(out["rollout"][k] - out["forward"][k]).max() < 1e-5, k
    assert np.abs(out["rollout"]["values"]).max() > 1e-3


def test_compiled_update_matches_the_plain_one(model_tok):
    """PPOConfig.compile=True (on a GPU by default): the compiled forward+backward gives the
    plain one's statistics and gradients (it works around an MLX compile failure on equal
    stop_gradient outputs by stacking the statistics)."""
    from mlx.utils import tree_flatten

    model, tok = model_tok
    got = {}
    for comp in (False, True):
        cfg = PPOConfig(batch_size=3, mini_batch_size=3, max_new_tokens=6, adapter_name="ppo_t3",
                        compile=comp, progress=False)
        tr = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), cfg, frozen_adapters=["sft"])
        try:
            batch = _batch_for(tr, tok)
            with lora.active_adapters(model, tr.policy_adapters):
                for _ in range(2):    # the second call runs the cached compiled graph
                    (loss, stats), grads = tr._loss_and_grad(tr.policy, batch)
            got[comp] = (float(loss), {k: float(v) for k, v in stats.items()},
                         {k: np.array(v) for k, v in tree_flatten(grads)})
        finally:
            lora.remove_adapter(model, "ppo_t3")
    (l0, s0, g0), (l1, s1, g1) = got[False], got[True]
    assert abs(l0 - l1) <= 1e-5 * max(abs(l0), 1.0) and s0.keys() == s1.keys()
    for k in s0:
        assert abs(s0[k] - s1[k]) <= 1e-5 * max(abs(s0[k]), 1.0), k
    assert g0.keys() == g1.keys()
    for k in g0:
        assert np.abs(g0[k] - g1[k]).max() <= 1e-5 * max(np.abs(g0[k]).max(), 1e-6), k


def test_top_p_samples_only_from_the_nucleus(model_tok):
    model, tok = model_tok
    g = generate_batch(model, prompts(tok), 5, [tok.eos_token_id], tok.pad_token_id, 1.0, 1e-6,
                       key=mx.random.key(2))
    lp, _, logits = response_forward(model, g.tokens, g.prompt_lengths, g.response_tokens,
                                     return_logits=True)
    greedy = np.array(mx.argmax(logits, axis=-1))
    m = np.array(g.response_mask) > 0
    assert (greedy[m] == np.array(g.response_tokens)[m]).all()


def test_first_minibatch_ratio_is_one_and_reference_excludes_ppo(model_tok):
    model, tok = model_tok
    cfg = PPOConfig(batch_size=3, mini_batch_size=2, max_new_tokens=6, temperature=0.8,
                    adapter_name="ppo_t1", progress=False)
    tr = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), cfg, frozen_adapters=["sft"])
    try:
        for _, m in lora.lora_layers(model):     # a PPO adapter that changes the policy
            m.adapters["ppo_t1"].lora_b = 0.5 * mx.random.normal(m.adapters["ppo_t1"].lora_b.shape)
        gen, ro = tr.rollout(prompts(tok), mx.random.key(5))
        mask = gen.response_mask
        m = np.array(mask) > 0
        # Reference = SFT only; the policy differs from it because the PPO adapter is active.
        with lora.active_adapters(model, ["sft"]):
            ref_direct, _ = batched_response_forward(model, gen, 0.8)
        assert np.array_equal(np.array(ref_direct), np.array(ro["ref_logprobs"]))
        assert np.abs(np.array(ro["logprobs"]) - np.array(ro["ref_logprobs"]))[m].max() > 1e-3
        # Teacher-forced policy log-probs match what the sampler saw.
        assert np.abs(np.array(ro["logprobs"]) - np.array(gen.sample_logprobs))[m].max() < 1e-4
        rewards, _ = kl_penalized_rewards(ro["scores"] + 1.0, ro["logprobs"], ro["ref_logprobs"],
                                          mask, 0.2)
        adv, ret = gae(rewards, ro["values"], mask)
        batch = _Batch(gen.tokens, gen.prompt_lengths, gen.response_tokens, mask, ro["logprobs"],
                       ro["values"], masked_whiten(adv, mask) * mask, ret)
        # A minibatch of other rows (other batch shape) through the training loss: ratio == 1.
        mb = batch.rows(np.array([2, 0]))
        with lora.active_adapters(model, tr.policy_adapters):
            new_lp, _, _ = response_forward(model, mb.tokens, mb.prompt_lengths, mb.response_tokens,
                                            0.8, tr.value_head)
        ratio = np.exp(np.array(new_lp) - np.array(mb.old_logprobs))[np.array(mb.mask) > 0]
        assert np.abs(ratio - 1).max() < 1e-4
        stats = tr.update(batch, np.random.default_rng(0))
        assert abs(stats["first_minibatch_ratio_mean"] - 1) < 1e-5
        assert stats["minibatches"] == cfg.ppo_epochs * 2 and stats["skipped_minibatches"] == 0
    finally:
        lora.remove_adapter(model, "ppo_t1")


def _batch_for(tr, tok, key=7):
    gen, ro = tr.rollout(prompts(tok), mx.random.key(key))
    mask = gen.response_mask
    rewards, _ = kl_penalized_rewards(mx.array([1.0, -1.0, 0.5]), ro["logprobs"], ro["ref_logprobs"],
                                      mask, 0.2)
    adv, ret = gae(rewards, ro["values"], mask)
    return _Batch(gen.tokens, gen.prompt_lengths, gen.response_tokens, mask, ro["logprobs"],
                  ro["values"], masked_whiten(adv, mask) * mask, ret)


def test_update_guards_skip_high_ratio_minibatches_and_stop_early(model_tok):
    model, tok = model_tok
    cfg = PPOConfig(batch_size=3, mini_batch_size=1, max_new_tokens=4, learning_rate=1e-2,
                    adapter_name="ppo_t2", progress=False, early_stopping=True, target_kl=1e9)
    tr = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), cfg, frozen_adapters=["sft"])
    try:
        batch = _batch_for(tr, tok)
        # Old log-probs 5 nats lower: ratio e^5 > 10 everywhere, so every minibatch is skipped
        # and the optimizer never steps (Adam's momentum would still move the weights).
        before = {k: np.array(v) for k, v in lora.adapter_state(model, "ppo_t2").items()}
        skewed = _Batch(**{**batch.__dict__, "old_logprobs": batch.old_logprobs - 5.0})
        st = tr.update(skewed, np.random.default_rng(0))
        assert st["skipped_minibatches"] == st["minibatches"] == 3 * cfg.ppo_epochs
        for k, v in lora.adapter_state(model, "ppo_t2").items():
            assert np.array_equal(np.array(v), before[k])
        # Early stopping: a policy KL bound that the first minibatch already exceeds.
        tr.cfg.target_kl = -1.0
        st = tr.update(batch, np.random.default_rng(0))
        assert st["minibatches"] == 1 and st["early_stopped"] == 1 and st["skipped_minibatches"] == 0
    finally:
        lora.remove_adapter(model, "ppo_t2")


def test_missing_eos_penalty_and_running_score_normalisation(model_tok):
    model, tok = model_tok
    cfg = PPOConfig(missing_eos_penalty=1.0, score_norm="running", adapter_name="ppo_t3",
                    progress=False)
    tr = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), cfg, frozen_adapters=["sft"])
    try:
        raw = mx.array([1.0, 2.0, 3.0, 4.0])
        out = tr._process_scores(raw, mx.array([True, False, True, False]))
        mean, std = 2.5, np.std([1, 2, 3, 4], ddof=1)   # first update: the batch's own moments
        expected = (np.array([1, 2, 3, 4]) - mean) / std - np.array([0, 1, 0, 1])
        np.testing.assert_allclose(np.array(out), expected, atol=1e-5)
        tr.cfg.score_norm = "none"
        out = tr._process_scores(raw, mx.array([True, True, False, True]))
        assert out.tolist() == [1.0, 2.0, 2.0, 4.0]
    finally:
        lora.remove_adapter(model, "ppo_t3")


def test_memory_plan_checkpoints_and_splits_only_large_bases(model_tok):
    """activation_budget: a tiny base keeps grad_checkpoint and gradient_accumulation_steps as
    given; a >= 20M-parameter base gets gradient checkpointing, then more micro-batches,
    until the planner's activation estimate fits the budget."""
    import dataclasses

    from mindprint_mlx.memory import _activations
    from mindprint_mlx.ppo.trainer import AUTO_MEMORY_PARAMS

    model, tok = model_tok
    cfg = PPOConfig(batch_size=8, mini_batch_size=8, max_new_tokens=6, adapter_name="ppo_t4",
                    progress=False)
    tr = PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), cfg, frozen_adapters=["sft"])
    try:
        assert tr.shape is not None and tr.shape.n_params < AUTO_MEMORY_PARAMS
        assert tr.memory_plan(8, 100) == (False, 1)
        # the 53M bench shape (8 x 768, intermediate 2048) with its fp32 weight bytes
        tr.shape = dataclasses.replace(tr.shape, n_params=52_000_000, hidden=768, intermediate=2048,
                                       num_layers=8, num_heads=12, num_kv_heads=4, head_dim=64,
                                       vocab=1717)
        tr.base_bytes = 52_000_000 * 4
        gc, ga = tr.memory_plan(8, 114)
        act = lambda rows, g: _activations(tr.shape, rows, 114, g, True, cfg.lora_rank, 4)
        assert gc and act(-(-8 // ga), True) <= 0.3 * tr.base_bytes < act(-(-8 // (ga - 1)), True)
        tr.cfg.activation_budget = None
        assert tr.memory_plan(8, 114) == (False, 1)
        tr.cfg.activation_budget, tr.cfg.grad_checkpoint = 0.3, False   # an explicit False stays
        assert tr.memory_plan(8, 114)[0] is False and tr.memory_plan(8, 114)[1] > ga
    finally:
        lora.remove_adapter(model, "ppo_t4")
