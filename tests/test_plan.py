"""The memory planner against measured peaks (mx.get_peak_memory) of real LoRA steps."""

from __future__ import annotations

import gc
import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mindprint_mlx import memory
from mindprint_mlx.train.loop import gradient_checkpointing
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.heads import ScalarHead, gather_last, hidden_states

B, T, R = 4, 64, 8


def _batch(vocab, rows=B):
    mx.random.seed(1)
    return mx.random.randint(4, vocab, (rows, T + 1))


def _peak(step) -> int:
    gc.collect()            # arrays of earlier tests held only by reference cycles
    mx.clear_cache()
    mx.reset_peak_memory()
    step()
    return mx.get_peak_memory()


def _sft_peak(model_dir, grad_checkpoint=False) -> int:
    model, _ = load(model_dir)
    lora.apply_lora(model, "sft", r=R)
    opt = optim.AdamW(learning_rate=1e-3)
    toks = _batch(model.args.vocab_size)
    mask = mx.ones((B, T))

    def loss_fn(m):
        logits = m(toks[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, toks[:, 1:], reduction="none")
        return (ce * mask).sum() / mask.sum()

    vg = nn.value_and_grad(model, loss_fn)
    mx.eval(model.parameters())
    with gradient_checkpointing(model, grad_checkpoint):
        def step():
            loss, g = vg(model)
            opt.update(model, g)
            mx.eval(model.parameters(), opt.state, loss)
        return _peak(step)


def _reward_peak(model_dir) -> int:
    """Bradley-Terry step: chosen and rejected rows together through the trunk + head."""
    model, _ = load(model_dir)
    lora.apply_lora(model, "reward", r=R)
    model.head = ScalarHead(model.args.hidden_size, zero_init=False)
    opt = optim.AdamW(learning_rate=1e-3)
    toks = _batch(model.args.vocab_size, 2 * B)[:, :T]
    mask = mx.ones((2 * B, T))

    def loss_fn(m):
        scores = gather_last(m.head(hidden_states(m, toks)), mask)
        return -nn.log_sigmoid(scores[:B] - scores[B:]).mean()

    vg = nn.value_and_grad(model, loss_fn)
    mx.eval(model.parameters())

    def step():
        loss, g = vg(model)
        opt.update(model, g)
        mx.eval(model.parameters(), opt.state, loss)
    return _peak(step)


def test_peak_memory_reports_on_this_backend():
    a = mx.ones((256, 256))
    peak = _peak(lambda: mx.eval(a @ a))
    assert peak >= 256 * 256 * 4


@pytest.mark.parametrize("gc", [False, True])
def test_sft_estimate_within_25_percent(tiny_llama, gc):
    measured = _sft_peak(tiny_llama, grad_checkpoint=gc)
    est = memory.estimate(tiny_llama, "sft", batch=B, seq_len=T, lora_rank=R, grad_checkpoint=gc)
    assert est.total == est.weights + est.adapters + est.optimizer + est.activations + est.kv_cache
    assert abs(est.total - measured) / measured < 0.25, (est, measured)


def test_sft_estimate_qwen2_and_reward(tiny_qwen2):
    measured = _sft_peak(tiny_qwen2)
    est = memory.estimate(tiny_qwen2, "sft", batch=B, seq_len=T, lora_rank=R)
    assert abs(est.total - measured) / measured < 0.25, (est, measured)
    measured = _reward_peak(tiny_qwen2)
    est = memory.estimate(tiny_qwen2, "reward", batch=B, seq_len=T, lora_rank=R)
    assert abs(est.total - measured) / measured < 0.25, (est, measured)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_weight_bytes_exact_from_config_only(tiny_llama, bits):
    """Weights (plain, 4-bit, 8-bit) from config.json alone equal the loaded model's bytes."""
    model, _ = load(tiny_llama, quantize=bits)
    loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    config = json.loads((tiny_llama / "config.json").read_text())
    shape = memory.model_shape(config, quantize=bits, dtype="float32")
    assert shape.weight_bytes == loaded
    assert memory.model_shape(tiny_llama, quantize=bits).weight_bytes == loaded


@pytest.mark.parametrize("bits", [None, 4])
def test_tied_gemma3_counts_no_lm_head(tmp_path, bits):
    """mlx-lm's gemma3_text always builds an lm_head and drops it in sanitize() when the
    checkpoint ties it: the planner counts what load() keeps, not the throwaway head."""
    from mindprint_mlx.models.tiny import build_tiny_model

    d = build_tiny_model(tmp_path / "g", arch="gemma3_text", num_layers=6)
    model, _ = load(d, quantize=bits)
    loaded = tree_flatten(model.parameters())
    assert not any("lm_head" in k for k, _ in loaded)
    shape = memory.model_shape(d, quantize=bits)
    assert shape.weight_bytes == sum(v.nbytes for _, v in loaded)
    assert shape.n_params == sum(v.size for _, v in tree_flatten(load(d)[0].parameters()))


def test_ppo_estimate_and_errors(tiny_llama):
    est = memory.estimate(tiny_llama, "ppo", batch=8, seq_len=96, max_new_tokens=32, lora_rank=4)
    sft = memory.estimate(tiny_llama, "sft", batch=8, seq_len=96, lora_rank=4)
    assert est.adapters > sft.adapters and est.total >= est.weights
    s = memory.model_shape(tiny_llama)
    assert memory.kv_cache_bytes(s, 2, 10) == 2 * s.num_layers * 2 * s.num_kv_heads * s.head_dim * 256 * 4
    with pytest.raises(MindprintError, match="phase"):
        memory.estimate(tiny_llama, "kto")
    with pytest.raises(MindprintError, match="q_projj"):
        memory.estimate(tiny_llama, "sft", targets=("q_projj",))


def test_plan_cli(tiny_llama, tmp_path):
    from mindprint_mlx.cli import cli

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_llama}\nsft:\n  batch_size: 2\n  max_seq_length: 32\n"
                   "  lora_rank: 4\nppo:\n  max_new_tokens: 16\n")
    res = CliRunner().invoke(cli, ["plan", "--config", str(cfg), "--quantize", "4"])
    assert res.exit_code == 0, res.output
    assert "| sft |" in res.output and "| reward |" in res.output and "| ppo |" in res.output
    assert "4-bit" in res.output and "usable" in res.output and "fits" in res.output
    # each phase is planned with its own section's settings, exactly as the pipeline reads them
    sft = memory.estimate(tiny_llama, "sft", batch=2, seq_len=32, lora_rank=4, quantize=4)
    ppo = memory.estimate(tiny_llama, "ppo", batch=4, seq_len=32, max_new_tokens=16, lora_rank=1,
                          mini_batch=4, quantize=4)
    assert f"sft: {memory.fmt_bytes(sft.total)} fits" in res.output
    assert f"ppo: {memory.fmt_bytes(ppo.total)} fits" in res.output
    cfg.write_text(f"model: {tiny_llama}\nsft:\n  max_seq_len: 32\n")
    res = CliRunner().invoke(cli, ["plan", "--config", str(cfg)])
    assert res.exit_code == 1 and "sft.max_seq_len" in res.output and "max_seq_length" in res.output
    res = CliRunner().invoke(cli, ["plan", "--model", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "error:" in res.output


def test_plan_memory_gb_judges_another_machine(tiny_llama, tmp_path):
    """--memory-gb 64: the verdict for a 64 GB Mac (75% of 64 GiB usable), not this machine's;
    a data_dir that does not exist yet only skips the final adapter's size."""
    from mindprint_mlx.cli import cli

    assert memory.working_set_limit(64) == (48 * memory.GiB, "75% of 64 GiB RAM, --memory-gb")
    with pytest.raises(MindprintError, match="memory_gb"):
        memory.working_set_limit(0)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_llama}\ndata_dir: {tmp_path / 'not-yet'}\n")
    res = CliRunner().invoke(cli, ["plan", "--config", str(cfg), "--memory-gb", "64"])
    assert res.exit_code == 0, res.output
    assert "a 64 GiB machine: 48.00 GiB usable (75% of 64 GiB RAM, --memory-gb)" in res.output
    assert "this machine" not in res.output and "| yes (0%) |" in res.output
    assert "final adapter: data_dir" in res.output and "not found here" in res.output
    res = CliRunner().invoke(cli, ["plan", "--model", str(tiny_llama), "--memory-gb", "0.0001"])
    assert res.exit_code == 0 and "does NOT fit" in res.output
    res = CliRunner().invoke(cli, ["plan", "--model", str(tiny_llama), "--memory-gb", "0"])
    assert res.exit_code == 2 and "--memory-gb" in res.output


def test_plan_cli_shows_the_final_adapter_per_merge_mode(tiny_llama, tmp_path):
    """A pipeline config: the final adapter's rank, parameters and bytes under each mode."""
    from mindprint_mlx.cli import cli
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"model: {tiny_llama}\ndata_dir: {DEMO_CURRICULUM_DIR}\n"
                   "sft: {lora_rank: 16, lora_targets: [q_proj, v_proj]}\n"
                   "ppo: {lora_rank: 4, lora_targets: [q_proj, v_proj]}\nmerge: {mode: svd}\n")
    res = CliRunner().invoke(cli, ["plan", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    shape = memory.model_shape(tiny_llama)
    per_rank = memory._lora_params(shape, ["q_proj", "v_proj"], 1)
    lines = {ln.split()[1 if ln.lstrip().startswith("*") else 0]: ln
             for ln in res.output.split("final adapter by merge.mode")[1].splitlines()[1:4]}
    # the demo curriculum: 8 topics in 2 units; svd's rank 0 = 16 + 4
    assert "rank 128-160" in lines["concat"] and "rank 20 " in lines["svd"]
    assert lines["svd"].lstrip().startswith("*") and "rank 64-80" in lines["fold_into_base"]
    assert f"{20 * per_rank / 1e6:.2f}M params" in lines["svd"]
