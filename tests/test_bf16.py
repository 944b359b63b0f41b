"""The pipeline on a bf16 base: SFT learns, the reward model separates easy pairs, PPO's first
ratio is 1, exports match transformers at bf16 tolerance, and what must be fp32 is fp32."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter

TEXTS = ["hi there", "the teacher reads", "why does it rain", "a small boat", "tell me a story",
         "the old clock", "my friend writes a letter", "near the river"]
PROMPTS = [[{"role": "user", "content": t}] for t in TEXTS]


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    from mindprint_mlx.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bf16") / "model", arch="llama", seed=0,
                            dtype="bfloat16")


def _dtypes(params) -> set:
    return {v.dtype for _, v in tree_flatten(params)}


def test_base_loads_in_bf16_and_lora_and_heads_are_fp32(bf16_base):
    from mindprint_mlx.models.heads import ScalarHead, hidden_states

    model, tok = load(bf16_base)
    base = {k: v for k, v in tree_flatten(model.parameters())}
    assert {v.dtype for v in base.values()} == {mx.bfloat16}
    lora.apply_lora(model, "sft", r=2, alpha=4.0)
    assert _dtypes(lora.adapter_state(model, "sft")) == {mx.float32}
    head = ScalarHead(64)
    h = hidden_states(model, mx.array([[5, 6, 7]]))
    assert h.dtype == mx.bfloat16 and head(h).dtype == mx.float32
    assert _dtypes(head.parameters()) == {mx.float32}
    # one step of the trainers' Adam on the LoRA parameters (apply_lora froze the base):
    # fp32 loss, gradients and moments
    import mlx.nn as nn

    from mindprint_mlx.train.loop import make_optimizer
    from mindprint_mlx.train.sft import completion_loss

    tokens = mx.array([[5, 6, 7, 8, 9]])
    mask = mx.array([[0, 0, 1, 1, 1]], dtype=mx.float32)
    (loss, _), grads = nn.value_and_grad(model, completion_loss)(model, tokens, mask)
    assert loss.dtype == mx.float32 and _dtypes(grads) == {mx.float32}
    opt = make_optimizer(1e-3)
    opt.update(model, grads)
    assert _dtypes(opt.state) <= {mx.float32, mx.uint64, mx.int32, mx.int64}
    moments = [v for k, v in tree_flatten(opt.state) if k.endswith((".m", ".v"))]
    assert moments and {v.dtype for v in moments} == {mx.float32}


def test_sft_loss_falls_on_bf16_as_it_does_in_fp32(bf16_base, tmp_path):
    from mindprint_mlx.models.tiny import build_tiny_model
    from mindprint_mlx.train.sft import SFTConfig, train_sft

    fp32_base = build_tiny_model(tmp_path / "fp32", arch="llama", seed=0)
    records = [(p, "the teacher reads the book near the river.") for p in PROMPTS]
    cfg = SFTConfig(epochs=6, batch_size=4, learning_rate=1e-2, lora_rank=4, lora_alpha=8.0, save_every=100,
                    warmup_ratio=0.0)
    out = {}
    for name, base in (("bf16", bf16_base), ("fp32", fp32_base)):
        model, tok = load(base)
        out[name] = train_sft(model, tok, records, cfg, tmp_path / name, eval_records=records[:4],
                              progress=False)
    res = out["bf16"]
    assert math.isfinite(res.eval_loss) and res.eval_loss < 0.5 * res.eval_loss_start, \
        (res.eval_loss_start, res.eval_loss)
    # measured: 6.645 -> 1.985 in bf16, 6.642 -> 1.973 in fp32
    assert abs(res.eval_loss - out["fp32"].eval_loss) < 0.1, (res.eval_loss, out["fp32"].eval_loss)
    assert _dtypes(lora.adapter_state(model, "sft")) == {mx.float32}
    model, _ = load(bf16_base)
    assert {v.dtype for k, v in tree_flatten(model.parameters()) if ".adapters." not in k} == {mx.bfloat16}


def test_reward_model_beats_chance_on_bf16(bf16_base, tmp_path):
    from mindprint_mlx.train.reward import RewardConfig, RewardModel, train_reward_model

    model, tok = load(bf16_base)
    good, bad = "the teacher reads the book near the river.", "a warm coat , a warm coat ?"
    pairs = [SimpleNamespace(prompt=p, chosen=good, rejected=bad) for p in PROMPTS]
    pairs += [SimpleNamespace(prompt=[{"role": "user", "content": t + " now"}], chosen=good,
                              rejected=bad) for t in TEXTS]
    cfg = RewardConfig(lora_rank=4, lora_alpha=8.0, batch_size=4, epochs=6, learning_rate=3e-3, patience=10,
                       compile=False, max_seq_length=128)
    res = train_reward_model(model, tok, pairs, cfg, tmp_path, progress=False)
    assert res.best_val_accuracy > 0.5 and math.isfinite(res.best_val_loss), res.history
    rm = RewardModel.load(model, tok, tmp_path)
    assert _dtypes(rm.head.parameters()) == {mx.float32}
    s = rm.score_batch(PROMPTS[:2] * 2, [good, good, bad, bad])
    assert s[0] > s[2] and s[1] > s[3]


def test_ppo_first_minibatch_ratio_is_one_on_bf16(bf16_base, tmp_path):
    from mindprint_mlx.ppo import PPOConfig, train_ppo

    model, tok = load(bf16_base)
    mx.random.seed(0)
    lora.apply_lora(model, "sft", r=2, alpha=4.0, trainable=False)
    for _, m in lora.lora_layers(model):
        m.adapters["sft"].lora_b = 0.2 * mx.random.normal(m.adapters["sft"].lora_b.shape)
    reward_fn = lambda tokens, lengths: mx.array(lengths).astype(mx.float32) / 10
    cfg = PPOConfig(steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=6, ppo_epochs=2,
                    learning_rate=1e-3, progress=False, save_every=0)
    res = train_ppo(model, tok, PROMPTS, reward_fn, cfg, tmp_path / "run", frozen_adapters=["sft"])
    for h in res.history:
        assert abs(h["ppo/first_minibatch_ratio_mean"] - 1) < 1e-3, h
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float)), h
    assert _dtypes(lora.adapter_state(model, "ppo")) == {mx.float32}


def _hf_logits(path, ids, peft_dir=None):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    if peft_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(peft_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float().numpy()


def test_exports_match_transformers_at_bf16_tolerance(bf16_base, tmp_path):
    from mindprint_mlx.export import export_peft, fuse

    model, tok = load(bf16_base)
    lora.apply_lora(model, "sft", targets=("q_proj", "o_proj", "down_proj"), r=3, alpha=6.0)
    rng = np.random.default_rng(1)
    for _, m in lora.lora_layers(model):
        a = m.adapters["sft"]
        a.lora_a = mx.array(rng.standard_normal(a.lora_a.shape).astype(np.float32) * 0.3)
        a.lora_b = mx.array(rng.standard_normal(a.lora_b.shape).astype(np.float32) * 0.3)
    ids = tok.encode("the teacher reads the book near the river, because it matters")
    ours = np.array(model(mx.array([ids])).astype(mx.float32))
    with lora.active_adapters(model, []):
        plain = np.array(model(mx.array([ids])).astype(mx.float32))
    save_adapter(model, "sft", tmp_path / "sft")
    export_peft(tmp_path / "sft", tmp_path / "peft", model=str(bf16_base))
    fuse(bf16_base, tmp_path / "sft", tmp_path / "fused")

    scale = np.abs(ours).max()
    base_err = np.abs(plain - _hf_logits(bf16_base, ids)).max()
    peft_err = np.abs(ours - _hf_logits(bf16_base, ids, tmp_path / "peft")).max()
    fused_err = np.abs(ours - _hf_logits(tmp_path / "fused", ids)).max()
    print(f"bf16 logits max |x| {scale:.3f}; max abs diff vs transformers: base {base_err:.4f}, "
          f"peft {peft_err:.4f}, fused {fused_err:.4f}; adapter effect {np.abs(ours - plain).max():.3f}")
    assert np.abs(ours - plain).max() > 0.2                      # the adapter does something
    # bf16 keeps 8 bits of mantissa: one rounding is 2^-8 relative; a few layers' worth
    tol = 0.05 * scale
    assert base_err < tol and peft_err < tol and fused_err < tol
