"""Optimizer parity with torch (bias-corrected Adam / AdamW, the trainers' default) and
gradient accumulation that is the token mean over the accumulated batch (SFT and PPO)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mindprint_mlx.models import load, lora
from mindprint_mlx.ppo import PPOConfig, PPOTrainer
from mindprint_mlx.ppo.trainer import _Batch
from mindprint_mlx.train.loop import make_optimizer, optimizer_for
from mindprint_mlx.train.reward import RewardConfig
from mindprint_mlx.train.sft import SFTConfig, completion_loss, train_sft
from mindprint_mlx.data.batching import encode_records, pad_batch, pad_id

SHAPES = {"w": (5, 7), "b": (7,), "v": (3,)}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _run_pair(opt, torch_opt_cls, lr, **torch_kw):
    """10 steps of `opt` (mlx) and `torch_opt_cls` from the same weights and the same
    gradients; returns (mlx weights, torch weights) after every step."""
    rng = np.random.default_rng(0)
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (rng.normal(size=s) * 10 ** rng.uniform(-3, 1)).astype(np.float32)
              for k, s in SHAPES.items()} for _ in range(10)]
    params = {k: mx.array(v) for k, v in init.items()}
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    topt = torch_opt_cls(list(tparams.values()), lr=lr, **torch_kw)
    opt.init(params)
    out = []
    for g in grads:
        params = opt.apply_gradients({k: mx.array(v) for k, v in g.items()}, params)
        mx.eval(params)
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k])
        topt.step()
        out.append(({k: np.array(v) for k, v in params.items()},
                    {k: p.detach().numpy().copy() for k, p in tparams.items()}))
    return out


@pytest.mark.parametrize("cfg_cls", [SFTConfig, RewardConfig, PPOConfig])
def test_trainers_adam_matches_torch_adam_over_10_steps(cfg_cls):
    cfg = cfg_cls()
    assert cfg.adam_bias_correction is True and cfg.adam_epsilon == 1e-8
    lr = 1e-2
    for mine, ref in _run_pair(optimizer_for(cfg, lr), torch.optim.Adam, lr, eps=cfg.adam_epsilon):
        for k in SHAPES:
            assert _rel(mine[k], ref[k]) < 1e-6, k
    # mlx's own default (no bias correction) is far from torch: the test can tell them apart
    off = _run_pair(make_optimizer(lr, bias_correction=False), torch.optim.Adam, lr)
    init = _run_pair(make_optimizer(0.0), torch.optim.Adam, 0.0)[0][1]["w"]
    moved_off = np.abs(off[0][0]["w"] - init).mean()
    moved_ref = np.abs(off[0][1]["w"] - init).mean()
    assert 2.5 < moved_off / moved_ref < 3.5      # sqrt(1 - 0.999) / (1 - 0.9) = 3.16 at step 1


@pytest.mark.parametrize("cfg_cls", [SFTConfig, RewardConfig])
def test_trainers_adamw_matches_torch_adamw_with_weight_decay(cfg_cls):
    cfg = cfg_cls(weight_decay=0.05, adam_epsilon=1e-6)
    lr = 3e-3
    for mine, ref in _run_pair(optimizer_for(cfg, lr), torch.optim.AdamW, lr, eps=1e-6,
                               weight_decay=0.05):
        for k in SHAPES:
            assert _rel(mine[k], ref[k]) < 1e-6, k


def test_config_rejects_a_negative_adam_epsilon():
    from mindprint_mlx.config import ConfigError, load_config

    for cls in (SFTConfig, RewardConfig, PPOConfig):
        with pytest.raises(ConfigError, match="adam_epsilon"):
            load_config(None, cls, ["adam_epsilon=-1"])
        assert load_config(None, cls, ["adam_bias_correction=false"]).adam_bias_correction is False


RECORDS = [("hi there", "yes."),
           ("tell me a story", "the old clock near the river reads a small letter to my friend.")]


def _first_moments(ckpt_dir):
    """Adam's first moment after one step is (1 - beta1) * gradient: the gradient used."""
    opt = mx.load(str(ckpt_dir / "optimizer.safetensors"))
    return {k[:-2]: np.array(v) / 0.1 for k, v in opt.items() if k.endswith(".m")}


def test_sft_accumulation_is_the_token_mean_of_one_batch(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    rows, _ = encode_records(tok, [([{"role": "user", "content": p}], c) for p, c in RECORDS], 96, "x")
    counts = [len(t) - n for t, n in rows]
    assert counts[1] > 3 * counts[0]              # really different token counts

    def one_step(batch_size, accum, out):
        model, tok = load(tiny_llama)
        cfg = SFTConfig(lora_rank=2, lora_alpha=4.0, epochs=1, batch_size=batch_size,
                        gradient_accumulation_steps=accum, max_steps=1, learning_rate=1e-3, warmup_ratio=0.0,
                        max_grad_norm=0.0, compile=False)
        train_sft(model, tok, RECORDS, cfg, out, progress=False)
        return model, _first_moments(out / "checkpoint"), lora.adapter_state(model, "sft")

    m_one, g_one, w_one = one_step(2, 1, tmp_path / "one")
    _, g_acc, _ = one_step(1, 2, tmp_path / "acc")
    assert g_one.keys() == g_acc.keys() and g_one
    big = [k for k in g_one if np.abs(g_one[k]).max() > 0]
    assert big
    for k in big:
        assert _rel(g_acc[k], g_one[k]) < 1e-6, k

    # ... which is the gradient of the token-mean loss over both rows (computed directly),
    # and not the plain mean of the two micro-batches' gradients (the old weighting).
    model, tok = load(tiny_llama)
    mx.random.seed(0)
    lora.apply_lora(model, "sft", targets=SFTConfig().lora_targets, r=2, alpha=4.0, trainable=True)
    lag = nn.value_and_grad(model, completion_loss)

    def grad_of(idx):
        t, m = pad_batch([rows[i][0] for i in idx], [rows[i][1] for i in idx], pad_id(tok), 8)
        return {k: np.array(v) for k, v in tree_flatten(lag(model, t, m)[1])}

    direct, g0, g1 = grad_of([0, 1]), grad_of([0]), grad_of([1])
    assert direct.keys() == g_one.keys()
    for k in big:
        assert _rel(g_one[k], direct[k]) < 1e-5, k
    k = big[0]
    assert _rel((g0[k] + g1[k]) / 2, direct[k]) > 1e-2

    # The SFT step was bias-corrected Adam: lora_b moved from 0 by -lr * g / (|g| + eps).
    for name, w in w_one.items():
        if name.endswith("lora_b"):
            layer, _, leaf = name.rpartition(".")
            g = g_one[f"{layer}.adapters.sft.{leaf}"]
            np.testing.assert_allclose(np.array(w), -1e-3 * g / (np.abs(g) + 1e-8), rtol=1e-5, atol=1e-9)


def _ppo_trainer(path, ga):
    model, tok = load(path)
    mx.random.seed(0)
    cfg = PPOConfig(batch_size=4, mini_batch_size=4, gradient_accumulation_steps=ga,
                    max_new_tokens=6, learning_rate=1e-3, max_grad_norm=None, lora_rank=2,
                    progress=False)
    return PPOTrainer(model, tok, lambda t, l: mx.zeros((t.shape[0],)), cfg), tok


def test_ppo_accumulation_is_the_token_mean_of_the_minibatch(tiny_llama):
    tr1, tok = _ppo_trainer(tiny_llama, 1)
    tr2, _ = _ppo_trainer(tiny_llama, 2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in ("hi there", "a small boat", "why does it rain", "near the river")]
    gen, ro = tr1.rollout(prompts, mx.random.key(3))
    R = gen.response_tokens.shape[1]
    mask = np.array(gen.response_mask)
    mask[:2, 2:] = 0                               # micro-batch 1: 2 tokens a row; 2: up to 6
    assert mask[:2].sum() < mask[2:].sum()
    mask = mx.array(mask)
    rng = np.random.default_rng(0)
    adv = mx.array(rng.normal(size=(4, R)).astype(np.float32)) * mask
    ret = mx.array(rng.normal(size=(4, R)).astype(np.float32)) * mask
    batch = _Batch(gen.tokens, gen.prompt_lengths, gen.response_tokens, mask,
                   ro["logprobs"] * mask, ro["values"] * mask, adv, ret)
    moments = []
    for tr in (tr1, tr2):
        before = {k: np.array(v) for k, v in tree_flatten(tr.policy.trainable_parameters())}
        with lora.active_adapters(tr.model, tr.policy_adapters):
            stats, stepped = tr._minibatch(batch)
        assert stepped
        m = {k[:-2]: np.array(v) / 0.1 for k, v in tree_flatten(tr.optimizer.state) if k.endswith(".m")}
        moments.append(m)
        # bias-corrected Adam's first step: -lr * g / (|g| + eps)
        after = {k: np.array(v) for k, v in tree_flatten(tr.policy.trainable_parameters())}
        for k, g in m.items():
            np.testing.assert_allclose(after[k] - before[k], -1e-3 * g / (np.abs(g) + 1e-8),
                                       rtol=1e-4, atol=1e-7)
    nonzero = [k for k in moments[0] if np.abs(moments[0][k]).max() > 0]
    assert any(".lora_b" in k for k in nonzero) and any(k.startswith("value_head") for k in nonzero)
    for k in nonzero:
        # fp32 sums over different micro-batch splits differ in the last bits (~1e-6 relative)
        assert _rel(moments[1][k], moments[0][k]) < 1e-5, k
