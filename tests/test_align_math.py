"""The pure math of DPO, GRPO and RLOO: TRL's formulas re-derived in torch on fixed inputs,
and group / leave-one-out advantages by hand."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mindprint_mlx.grpo import group_advantages, grpo_loss, k3_kl, loss_denominator, rloo_advantages
from mindprint_mlx.preference import dpo_loss, rpo_nll, sequence_logps

PC = [-12.5, -30.25, -7.0, -41.0, -3.3]
PR = [-14.0, -29.0, -9.5, -40.0, -8.1]
RC = [-13.0, -30.0, -8.0, -40.5, -4.0]
RR = [-13.5, -30.5, -8.5, -41.5, -6.6]


def trl_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    """TRL DPOTrainer.dpo_loss, re-derived with torch in float64."""
    pc, pr, rc, rr = (torch.tensor(x, dtype=torch.float64) for x in (pc, pr, rc, rr))
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses.numpy(), (beta * (pc - rc)).numpy(), (beta * (pr - rr)).numpy()


@pytest.mark.parametrize("loss_type,beta,ls", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0),
                                               ("sigmoid", 0.1, 0.2), ("sigmoid", 2.0, 0.05),
                                               ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0)])
def test_dpo_loss_matches_trl(loss_type, beta, ls):
    got = dpo_loss(*(mx.array(x) for x in (PC, PR, RC, RR)), beta, loss_type, ls)
    want = trl_dpo(PC, PR, RC, RR, beta, loss_type, ls)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g, dtype=np.float64), w, rtol=0, atol=1e-6 * max(1, np.abs(w).max()))


def test_dpo_loss_by_hand_and_no_reward_gradient():
    # policy == reference: h = 0, loss = log 2 per pair, rewards 0
    z = mx.array([-3.0, -5.0])
    losses, cr, rr = dpo_loss(z, z, z, z, 0.1)
    np.testing.assert_allclose(np.array(losses), [math.log(2)] * 2, atol=1e-7)
    assert np.all(np.array(cr) == 0) and np.all(np.array(rr) == 0)
    # h = 2, beta = 0.5: -log sigmoid(1) = log(1 + e^-1); ipo: (2 - 1)^2 = 1
    a = [mx.array([x]) for x in (-1.0, -3.0, -2.0, -2.0)]
    np.testing.assert_allclose(np.array(dpo_loss(*a, 0.5)[0]), [math.log1p(math.exp(-1))], atol=1e-7)
    np.testing.assert_allclose(np.array(dpo_loss(*a, 0.5, "ipo")[0]), [1.0], atol=1e-7)
    # label smoothing 0.25: 0.75 * log(1 + e^-1) + 0.25 * log(1 + e^1)
    np.testing.assert_allclose(np.array(dpo_loss(*a, 0.5, "sigmoid", 0.25)[0]),
                               [0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.e)], atol=1e-7)
    # the rewards are detached: gradients flow through the loss only
    g = mx.grad(lambda pc: dpo_loss(pc, a[1], a[2], a[3], 0.5)[1].sum())(a[0])
    assert float(g.item()) == 0.0


def test_dpo_loss_rejects_bad_settings():
    a = [mx.array([-1.0])] * 4
    for kw in ({"beta": 0.0}, {"beta": 0.1, "loss_type": "hinge"}, {"beta": 0.1, "label_smoothing": 0.5},
               {"beta": 0.1, "loss_type": "ipo", "label_smoothing": 0.1}):
        with pytest.raises(ValueError):
            dpo_loss(*a, **kw)


def test_sequence_logps_sum_and_mean():
    lp = mx.array([[-1.0, -2.0, -4.0], [-0.5, float("nan"), 0.0]])
    m = mx.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.array(sequence_logps(lp, m)), [-3.0, -0.5])
    np.testing.assert_allclose(np.array(sequence_logps(lp, m, average=True)), [-1.5, -0.5])


def test_rpo_nll_is_the_chosen_answers_per_token_nll():
    lp = mx.array([[-1.0, -2.0, -4.0], [-0.5, float("nan"), 0.0]])
    m = mx.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.array(rpo_nll(lp, m)), [7.0 / 3.0, 0.5])


def test_group_advantages_by_hand():
    s = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0]          # groups of 3: (1, 2, 3), (6, 0, 0)
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-4)
    # group 2: mean 2, unbiased std sqrt(((16 + 4 + 4) / 2)) = sqrt(12)
    a = np.array(group_advantages(s, 3))
    np.testing.assert_allclose(a[:3], np.array([-1, 0, 1]) / (1 + 1e-4), atol=1e-6)
    np.testing.assert_allclose(a[3:], np.array([4, -2, -2]) / (math.sqrt(12) + 1e-4), atol=1e-6)
    np.testing.assert_allclose(np.array(group_advantages(s, 3, scale_by_std=False)), [-1, 0, 1, 4, -2, -2])
    # all-equal group: advantage 0 both ways
    np.testing.assert_allclose(np.array(group_advantages([5.0, 5.0], 2)), [0, 0])
    # TRL: (r - mean) / (std + 1e-4) with torch's unbiased std
    r = torch.tensor([0.3, -1.2, 2.5, 0.0, 0.7, 0.7, 1.1, -0.4])
    g = r.view(-1, 4)
    want = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
    np.testing.assert_allclose(np.array(group_advantages(r.numpy(), 4)), want.numpy(), atol=1e-6)


def test_rloo_advantages_by_hand():
    # (1, 2, 3): baselines (2+3)/2, (1+3)/2, (1+2)/2 = 2.5, 2, 1.5 -> -1.5, 0, 1.5
    np.testing.assert_allclose(np.array(rloo_advantages([1.0, 2.0, 3.0, 4.0, 0.0, 2.0], 3)),
                               [-1.5, 0.0, 1.5, 3.0, -3.0, 0.0])
    # k = 2: each minus the other
    np.testing.assert_allclose(np.array(rloo_advantages([1.0, 4.0], 2)), [-3.0, 3.0])
    # = k / (k - 1) * (r - group mean)
    s = np.array([0.3, -1.2, 2.5, 0.0])
    np.testing.assert_allclose(np.array(rloo_advantages(s, 4)), 4 / 3 * (s - s.mean()), atol=1e-6)
    with pytest.raises(ValueError):
        rloo_advantages([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError):
        group_advantages([1.0, 2.0], 1)


def trl_grpo(lp, old, ref, adv, mask, beta, eps_lo, eps_hi, loss_type, max_len):
    """TRL GRPOTrainer.compute_loss (token importance sampling), re-derived in torch."""
    lp, old, ref, adv, mask = (torch.tensor(np.array(x), dtype=torch.float64) for x in (lp, old, ref, adv, mask))
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    c1 = torch.exp(lp - old)
    c2 = torch.clamp(c1, 1 - eps_lo, 1 + eps_hi)
    ptl = -torch.min(c1 * adv[:, None], c2 * adv[:, None]) + beta * kl
    if loss_type == "grpo":
        return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean().item()
    if loss_type == "dapo":
        return ((ptl * mask).sum() / mask.sum().clamp(min=1)).item()
    return ((ptl * mask).sum() / (ptl.size(0) * max_len)).item()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_hi", [(0.04, None), (0.0, 0.28), (0.3, 0.1)])
def test_grpo_loss_matches_trl_and_splits_exactly(loss_type, beta, eps_hi):
    rng = np.random.default_rng(0)
    B, R = 6, 5
    old = rng.normal(-2, 0.5, (B, R)).astype(np.float32)
    lp = (old + rng.normal(0, 0.3, (B, R))).astype(np.float32)
    ref = (old + rng.normal(0, 0.2, (B, R))).astype(np.float32)
    adv = rng.normal(0, 1, B).astype(np.float32)
    mask = (np.arange(R)[None] < np.array([5, 3, 1, 4, 5, 2])[:, None]).astype(np.float32)
    lp[mask == 0] = np.nan                           # padding never leaks in
    args = [mx.array(x) for x in (lp, old, ref, adv, mask)]
    loss, st = grpo_loss(*args[:3], args[3], args[4], beta, 0.2, eps_hi, loss_type, 7)
    want = trl_grpo(np.nan_to_num(lp), old, ref, adv, mask, beta, 0.2, 0.2 if eps_hi is None else eps_hi,
                    loss_type, 7)
    assert abs(float(loss) - want) < 1e-6
    # micro-batches with the whole batch's denominator sum to the full loss
    total = loss_denominator(args[4], loss_type, 7)
    parts = [grpo_loss(*(a[i:j] for a in args[:3]), args[3][i:j], args[4][i:j], beta, 0.2, eps_hi,
                       loss_type, 7, total=total)[0] for i, j in ((0, 2), (2, 6))]
    assert abs(sum(float(p) for p in parts) - want) < 1e-6
    assert 0 <= float(st["policy/clipfrac"]) <= 1


def test_k3_by_hand_and_zero_at_equal():
    np.testing.assert_allclose(np.array(k3_kl(mx.array([-1.0]), mx.array([-2.0]))),
                               [math.exp(-1) + 1 - 1], atol=1e-7)
    assert float(k3_kl(mx.array([-3.0]), mx.array([-3.0])).item()) == 0.0
    # ratio 1 and beta 0: the loss is -mean advantage; its gradient is -A on each token
    lp = mx.array([[-1.0, -2.0]])
    g = mx.grad(lambda x: grpo_loss(x, mx.stop_gradient(x), None, mx.array([2.0]),
                                    mx.ones((1, 2)), beta=0.0)[0])(lp)
    np.testing.assert_allclose(np.array(g), [[-1.0, -1.0]], atol=1e-7)
