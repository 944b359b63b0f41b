"""PPO math: hand-computed values, and agreement with an independent numpy reference of the
classic formulation (TRL's PPOTrainer up to v0.11), on ragged masks."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mindprint_mlx.ppo import (AdaptiveKLController, FixedKLController, gae, kl_estimate,
                               kl_penalized_rewards, masked_mean, masked_var, masked_whiten,
                               ppo_losses)
from mindprint_mlx.ppo.losses import entropy_from_logits


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=tol, rtol=tol)


# Row 0: response of 3 tokens ending in EOS; row 1: a response of length 1;
# row 2: no EOS (ran to the length limit, so every position is a response token).
MASK = mx.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=mx.float32)


def test_kl_penalized_rewards_hand_computed():
    logprobs = mx.array([[-1.0, -2.0, -0.5, -9.0], [-0.3, -9.0, -9.0, -9.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = mx.array([[-1.5, -1.0, -0.5, -1.0], [-0.1, 0.0, 0.0, 0.0], [-2.0, -1.0, -0.5, -1.0]])
    scores = mx.array([1.0, 2.0, 0.5])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, MASK, 0.1)
    close(kl, [[0.5, -1.0, 0.0, 0.0], [-0.2, 0, 0, 0], [1.0, 0.0, -0.5, 0.0]])
    # -0.1 * kl per token; the score lands on the last response token of each row.
    close(rewards, [[-0.05, 0.1, 1.0, 0.0], [2.02, 0, 0, 0], [-0.1, 0.0, 0.05, 0.5]])


def test_kl_estimators_hand_computed():
    lp, ref = mx.array([[0.0, -1.0]]), mx.array([[-0.5, -0.5]])   # k1 = [0.5, -0.5]
    close(kl_estimate(lp, ref, "k1"), [[0.5, -0.5]])
    close(kl_estimate(lp, ref, "abs"), [[0.5, 0.5]])
    close(kl_estimate(lp, ref, "mse"), [[0.125, 0.125]])
    close(kl_estimate(lp, ref, "k3"), [[math.exp(-0.5) - 1 + 0.5, math.exp(0.5) - 1 - 0.5]])
    assert float(kl_estimate(lp, ref, "k3").min()) >= 0
    rewards, _ = kl_penalized_rewards(mx.array([0.0]), lp, ref, mx.array([[1.0, 1.0]]), 2.0, "mse")
    close(rewards, [[-0.25, -0.25]])
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k2")


def test_gae_hand_computed_ragged_rows():
    rewards = mx.array([[0.0, 0.0, 1.0, 5.0], [2.02, 7.0, 7.0, 7.0], [1.0, 2.0, 0.0, 0.0]])
    values = mx.array([[0.5, 0.25, 0.75, 9.0], [0.5, 9.0, 9.0, 9.0], [1.0, 1.0, 3.0, 3.0]])
    mask = mx.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=mx.float32)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: deltas (t=2) 1 - 0.75 = 0.25, (t=1) 0.75 - 0.25 = 0.5, (t=0) 0.25 - 0.5 = -0.25;
    # A2 = 0.25, A1 = 0.5 + 0.5 * 0.25 = 0.625, A0 = -0.25 + 0.5 * 0.625 = 0.0625.
    # Row 1 (length 1): V after the last token is 0, so A = 2.02 - 0.5 = 1.52.
    # Row 2: A1 = 2 - 1 = 1, A0 = 1 + 1 - 1 + 0.5 * 1 = 1.5.
    close(adv, [[0.0625, 0.625, 0.25, 0.0], [1.52, 0, 0, 0], [1.5, 1.0, 0, 0]])
    close(ret, [[0.5625, 0.875, 1.0, 0.0], [2.02, 0, 0, 0], [2.5, 2.0, 0, 0]])
    adv, _ = gae(rewards[2:], values[2:], mask[2:], gamma=0.5, lam=1.0)
    # A1 = 2 - 1 = 1; A0 = 1 + 0.5 * 1 - 1 + 0.5 * 1 * 1 = 1.0
    close(adv, [[1.0, 1.0, 0, 0]])


def test_gae_skips_unmasked_positions_before_the_response():
    """A token-axis layout (prompt first) gives the same advantages as the compact one."""
    rewards = mx.array([[0.0, 0.0, 1.0]])
    values = mx.array([[0.5, 0.25, 0.75]])
    mask = mx.array([[1.0, 1.0, 1.0]])
    adv, ret = gae(rewards, values, mask, 1.0, 0.5)
    pad = lambda x, v: mx.concatenate([mx.full((1, 2), v), x], axis=1)
    adv2, ret2 = gae(pad(rewards, 3.0), pad(values, 4.0), pad(mask, 0.0), 1.0, 0.5)
    close(adv2[:, 2:], adv)
    close(ret2[:, 2:], ret)
    close(adv2[:, :2], [[0.0, 0.0]])


def test_masked_mean_var_whiten_hand_computed():
    x = mx.array([[1.0, 2.0, 3.0, 100.0]])
    m = mx.array([[1.0, 1.0, 1.0, 0.0]])
    close(masked_mean(x, m), 2.0)
    close(masked_var(x, m), 1.0)                       # unbiased: ((1 + 0 + 1) / 3) * 3 / 2
    close(masked_var(x, m, unbiased=False), 2.0 / 3.0)
    close(masked_whiten(x, m)[:, :3], [[-1.0, 0.0, 1.0]])
    close(masked_whiten(x, m, shift_mean=False)[:, :3], [[1.0, 2.0, 3.0]])
    one = mx.array([[0.0, 1.0, 0.0, 0.0]])             # a single masked entry: variance 0
    close(masked_var(x, one), 0.0)
    close(masked_whiten(x, one)[:, 1], [0.0])


def test_ppo_losses_hand_computed():
    mask = mx.array([[1.0, 1.0, 0.0]])
    logprobs = mx.array([[math.log(1.5), math.log(0.5), 50.0]])    # ratio 1.5, 0.5 (third masked)
    old = mx.zeros((1, 3))
    adv = mx.array([[1.0, 1.0, 100.0]])
    values, old_values = mx.array([[1.0, 0.0, 9.0]]), mx.array([[0.5, 0.0, 0.0]])
    returns = mx.array([[0.0, 1.0, -9.0]])
    loss, st = ppo_losses(logprobs, old, values, old_values, adv, returns, mask, 0.2, 0.2, 0.1)
    # policy: max(-1.5, -1.2) = -1.2 and max(-0.5, -0.8) = -0.5 -> mean -0.85; the first is clipped.
    close(st["loss/policy"], -0.85)
    close(st["policy/clipfrac"], 0.5)
    # value: clip(1.0, 0.3, 0.7) = 0.7 -> max((1-0)^2, 0.49) = 1; second 1 -> 0.5 * mean = 0.5.
    close(st["loss/value"], 0.5)
    close(st["val/clipfrac"], 0.0)
    close(loss, -0.85 + 0.1 * 0.5)
    close(st["loss/total"], -0.8)
    close(st["policy/approxkl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    close(st["policy/policykl"], -(math.log(1.5) + math.log(0.5)) / 2)
    close(st["policy/ratio_mean"], 1.0)
    close(st["policy/ratio_var"], 0.5)                 # unbiased var of [1.5, 0.5]
    # explained variance: 1 - Var(R - V) / Var(R) = 1 - Var([-1, 1]) / Var([0, 1]) = 1 - 2 / 0.5
    close(st["val/explained_variance"], -3.0, tol=1e-4)
    # val/mean and val/var are the rollout's (old) values, val/vpred the new predictions
    close(st["val/mean"], 0.25)
    close(st["val/var"], 0.125)                        # unbiased var of [0.5, 0.0]
    close(st["val/vpred"], 0.5)
    assert "policy/entropy" not in st


def test_ppo_losses_entropy_from_logits():
    logits = mx.array([[[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]]])
    ent = entropy_from_logits(logits)
    close(ent[0, 0], math.log(4))
    assert float(ent[0, 1]) < 1e-6
    z = mx.zeros((1, 2))
    _, st = ppo_losses(z, z, z, z, z, z, mx.array([[1.0, 0.0]]), logits=logits)
    close(st["policy/entropy"], math.log(4))


def test_kl_controllers():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 4)                    # error clipped to +0.2
    close(ctl.value, 0.2 * (1 + 0.2 * 4 / 10000))
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(5.4, 100)                   # error -0.1
    close(ctl.value, 0.2 * (1 - 0.1 * 100 / 10000))
    ctl.update(-50.0, 10000)               # error clipped to -0.2
    close(ctl.value, 0.2 * 0.999 * 0.8)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 4)
    assert fixed.value == 0.3


# ---------------------------------------------------------------- numpy reference (TRL <= 0.11)

def np_masked_mean(x, m):
    return (x * m).sum() / m.sum()


def np_masked_var(x, m):
    mean = np_masked_mean(x, m)
    var = np_masked_mean((x - mean) ** 2, m)
    return var * m.sum() / (m.sum() - 1)


def np_masked_whiten(x, m, shift_mean=True):
    mean, var = np_masked_mean(x, m), np_masked_var(x, m)
    w = (x - mean) / np.sqrt(var + 1e-8)
    return w if shift_mean else w + mean


def np_compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef):
    rewards, non_score = [], []
    for score, lp, ref, m in zip(scores, logprobs, ref_logprobs, masks):
        kl = lp - ref
        r = -kl_coef * kl
        non_score.append(r.copy())
        r[np.nonzero(m)[0][-1]] += score
        rewards.append(r)
    return np.stack(rewards), np.stack(non_score)


def np_compute_advantages(values, rewards, mask, gamma, lam):
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[-1]
    lastgaelam, rev = 0.0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        rev.append(lastgaelam)
    adv = np.stack(rev[::-1], axis=1)
    returns = adv + values
    return np_masked_whiten(adv, mask), returns


def np_loss(old_lp, values, logprobs, vpred, mask, adv, returns, clip, clip_v, vf_coef):
    vclipped = np.clip(vpred, values - clip_v, values + clip_v)
    vf1, vf2 = (vpred - returns) ** 2, (vclipped - returns) ** 2
    vf_loss = 0.5 * np_masked_mean(np.maximum(vf1, vf2), mask)
    vf_clipfrac = np_masked_mean((vf2 > vf1).astype(float), mask)
    ratio = np.exp(logprobs - old_lp)
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)
    pg_loss = np_masked_mean(np.maximum(pg1, pg2), mask)
    pg_clipfrac = np_masked_mean((pg2 > pg1).astype(float), mask)
    approxkl = 0.5 * np_masked_mean((logprobs - old_lp) ** 2, mask)
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approxkl


def test_matches_numpy_reference_of_the_classic_formulation():
    rng = np.random.default_rng(0)
    B, T = 5, 7
    lengths = np.array([7, 1, 4, 2, 6])                 # right-padded, ragged, one of length 1
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    logprobs, ref, values = f(B, T) - 2, f(B, T) - 2, f(B, T)
    scores = f(B)
    new_logprobs = logprobs + 0.3 * f(B, T)
    vpred = values + 0.5 * f(B, T)
    gamma, lam, beta = 0.99, 0.95, 0.2

    r_np, _ = np_compute_rewards(scores, logprobs, ref, mask, beta)
    adv_np, ret_np = np_compute_advantages(values, r_np, mask, gamma, lam)
    loss_np = np_loss(logprobs, values, new_logprobs, vpred, mask, adv_np, ret_np, 0.2, 0.2, 0.1)

    m = mx.array(mask)
    rewards, _ = kl_penalized_rewards(mx.array(scores), mx.array(logprobs), mx.array(ref), m, beta)
    adv, ret = gae(rewards, mx.array(values), m, gamma, lam)
    adv = masked_whiten(adv, m)
    sel = mask > 0
    close(np.array(rewards)[sel], r_np[sel])
    close(np.array(adv)[sel], adv_np[sel], tol=1e-4)
    close(np.array(ret)[sel], ret_np[sel], tol=1e-4)
    loss, st = ppo_losses(mx.array(new_logprobs), mx.array(logprobs), mx.array(vpred), mx.array(values),
                          adv * m, ret, m, 0.2, 0.2, 0.1)
    close(loss, loss_np[0], tol=1e-4)
    close(st["loss/policy"], loss_np[1], tol=1e-4)
    close(st["loss/value"], loss_np[2], tol=1e-4)
    close(st["policy/clipfrac"], loss_np[3])
    close(st["val/clipfrac"], loss_np[4])
    close(st["policy/approxkl"], loss_np[5], tol=1e-4)
    # Reward whitening (off by default) keeps the mean.
    close(np.array(masked_whiten(rewards, m, shift_mean=False))[sel],
          np_masked_whiten(r_np, mask, shift_mean=False)[sel], tol=1e-4)
