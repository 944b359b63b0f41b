"""Each refine method's peak memory against memory.estimate, on a model whose weights are a
large part of the peak: the measured extra over the loaded model is what the estimate's
non-weight terms predict (within 35%), never a second copy of the base."""

import gc

import mlx.core as mx
import pytest

from mindprint_mlx import memory
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.tiny import build_tiny_model

PROMPTS = [f"Question number {i} about cycles and patience?" for i in range(4)]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    # 512 wide, 6 layers: ~59 MB of fp32 weights, short rows: weights dominate the peak
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", arch="llama", seed=0,
                            hidden_size=512, num_layers=6, intermediate_size=1024)


def _train(method: str, model, tok, out):
    from mindprint_mlx.grpo import GRPOConfig, train_grpo
    from mindprint_mlx.preference import DITTOConfig, DPOConfig, train_ditto, train_dpo

    def length_reward(tokens, lengths):
        return mx.array(lengths).astype(mx.float32)

    common = {"lora_rank": 4, "save_every": 0, "progress": False}
    if method in ("grpo", "rloo"):
        cfg = GRPOConfig(method=method, steps=2, batch_size=2, group_size=2, max_new_tokens=8, **common)
        return train_grpo(model, tok, PROMPTS, length_reward, cfg, out, frozen_adapters=["sft"]), \
            {"batch": 2, "group_size": 2, "max_new_tokens": 8}
    if method == "dpo":
        pairs = [(p, "Patience is a position.", "No idea.") for p in PROMPTS]
        cfg = DPOConfig(steps=2, batch_size=2, max_seq_length=48, **common)
        return train_dpo(model, tok, pairs, cfg, out, frozen_adapters=["sft"]), {"batch": 2}
    demos = [(p, "Patience is a position, and cycles turn.") for p in PROMPTS]
    cfg = DITTOConfig(steps=1, rounds=2, batch_size=2, samples_per_prompt=1, max_new_tokens=8,
                      max_seq_length=48, **common)
    return train_ditto(model, tok, demos, cfg, out, frozen_adapters=["sft"]), \
        {"batch": 2, "max_new_tokens": 8, "forward_batch": 16}


@pytest.mark.parametrize("method", ["grpo", "dpo", "ditto"])    # (ppo: the same model, older)
def test_refine_peak_is_one_base_and_matches_the_estimate(wide_model, tmp_path, method):
    model, tok = load(wide_model)
    lora.apply_lora(model, "sft", r=4, trainable=False)
    lora.set_active(model, ["sft"])
    gc.collect()
    mx.clear_cache()
    loaded = mx.get_active_memory()              # the model (and whatever else is alive)
    res, kw = _train(method, model, tok, tmp_path / method)
    peak = max(h[f"{method}/memory/peak_bytes"] for h in res.history)
    extra = peak - loaded
    # the rows' real length: the longest prompt (chat template) + answer / sample
    prompt = max(len(tok.apply_chat_template([{"role": "user", "content": p}],
                                             add_generation_prompt=True)) for p in PROMPTS)
    seq = min(48, prompt + 12) if method in ("dpo", "ditto") else prompt + 8   # answers: ~12
    est = memory.estimate(wide_model, method, seq_len=seq, prompt_len=prompt, lora_rank=4, **kw)
    base, predicted = est.weights, est.total - est.weights
    # a second copy of the base would add `base` bytes the estimate (one base) does not have
    assert extra < predicted + 0.5 * base, f"{method}: {extra} bytes over the loaded model"
    assert abs((base + extra) - est.total) < 0.35 * est.total, (method, extra, est)
