"""LoRA SFT: completion-only loss, lower held-out loss, exact resume, NaN stops cleanly."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mindprint_mlx.data import load_data_dir
from mindprint_mlx.data.batching import encode_pair, pad_batch, pad_id
from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, lora
from mindprint_mlx.train.checkpoint import read_checkpoint_state
from mindprint_mlx.train.sft import SFTConfig, token_loss, train_sft


@pytest.fixture(scope="module")
def demo_sft():
    return list(load_data_dir(DEMO_CURRICULUM_DIR).sft)


def _cfg(**kw):
    base = dict(lora_rank=4, lora_alpha=8.0, batch_size=4, epochs=1, learning_rate=3e-3, warmup_ratio=0.1,
                save_every=100, compile=False, pad_to_multiple=8)
    return SFTConfig(**{**base, **kw})


def test_sft_lowers_held_out_loss_and_keeps_other_adapters_frozen_and_active(tiny_demo_model, demo_sft, tmp_path):
    model, tok = load(tiny_demo_model)
    lora.apply_lora(model, "unit1", r=2, alpha=2.0, trainable=True)
    layers = dict(lora.lora_layers(model))
    for m in layers.values():
        m.adapters["unit1"].lora_b = mx.ones_like(m.adapters["unit1"].lora_b) * 0.01
    before = {k: np.array(v) for k, v in lora.adapter_state(model, "unit1").items()}

    # lr 1e-2: bias-corrected Adam moves ~3-5x less per step than mlx's uncorrected default did at 3e-3
    res = train_sft(model, tok, demo_sft[:32], _cfg(epochs=2, learning_rate=1e-2), tmp_path,
                    eval_records=demo_sft[56:], progress=False)

    print(res.eval_loss_start, res.eval_loss)
    assert res.eval_loss < res.eval_loss_start - 0.5, (res.eval_loss_start, res.eval_loss)
    assert res.steps == 16 and (res.adapter_dir / "adapters.safetensors").is_file()
    after = lora.adapter_state(model, "unit1")
    assert all(np.array_equal(before[k], np.array(after[k])) for k in before)
    assert all({"unit1", "sft"} <= m.active for m in layers.values())
    assert all(not m.adapters["sft"].trainable for m in layers.values())  # frozen afterwards
    assert all(m.adapters["unit1"].trainable for m in layers.values())  # its flag is restored
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, 17))
    assert {"train/lr", "train/tokens_per_sec", "train/grad_norm"} <= set(lines[1])
    assert sum("eval/loss" in x for x in lines) == 3  # start, after each epoch


def test_prompt_tokens_carry_no_gradient(tiny_llama):
    model, tok = load(tiny_llama)
    lora.apply_lora(model, "sft", r=4, alpha=8.0)
    for _, m in lora.lora_layers(model):  # non-zero B so every LoRA tensor gets gradient
        m.adapters["sft"].lora_b = mx.random.normal(m.adapters["sft"].lora_b.shape) * 0.1
    msgs = [{"role": "user", "content": "When does the cycle turn?"}]
    row, n_prompt, _ = encode_pair(tok, msgs, "Mind the season.", 64)
    tokens, mask = pad_batch([row], [n_prompt], pad_id(tok))
    inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    grad_fn = nn.value_and_grad(model, token_loss)

    def grads(t):
        (_, _), g = grad_fn(model, inputs, t, tmask)
        return {k: np.array(v) for k, v in tree_flatten(g)}

    g0 = grads(targets)
    changed = np.array(targets)
    changed[0, n_prompt - 3] = (changed[0, n_prompt - 3] + 7) % 100  # a prompt position's target
    g1 = grads(mx.array(changed))
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert all(np.array_equal(g0[k], g1[k]) for k in g0)
    changed = np.array(targets)
    changed[0, n_prompt + 1] = (changed[0, n_prompt + 1] + 7) % 100  # a completion target
    g2 = grads(mx.array(changed))
    assert any(not np.allclose(g0[k], g2[k]) for k in g0)


class Stop(Exception):
    pass


def test_killed_run_resumes_to_the_same_adapter(tiny_llama, demo_sft, tmp_path):
    # 26 rows, batch 4 -> 7 micro-batches an epoch; accumulation 2 -> windows cross epochs.
    cfg = _cfg(epochs=2, gradient_accumulation_steps=2, lora_dropout=0.1, save_every=2, seed=5)
    records = demo_sft[:26]
    model, tok = load(tiny_llama)
    full = train_sft(model, tok, records, cfg, tmp_path / "full", progress=False)
    want = {k: np.array(v) for k, v in lora.adapter_state(model, "sft").items()}

    def kill(step, _):
        if step == 5:
            raise Stop  # dies after step 5; the last checkpoint is step 4 (mid-epoch)

    model, tok = load(tiny_llama)
    with pytest.raises(Stop):
        train_sft(model, tok, records, cfg, tmp_path / "cut", progress=False, on_step=kill)
    assert read_checkpoint_state(tmp_path / "cut" / "checkpoint")["step"] == 4
    model, tok = load(tiny_llama)  # a fresh process would load the base again
    resumed = train_sft(model, tok, records, cfg, tmp_path / "cut", resume=True, progress=False)
    got = lora.adapter_state(model, "sft")
    assert resumed.steps == full.steps == 7
    assert max(float(np.abs(want[k] - np.array(got[k])).max()) for k in want) < 1e-6


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tiny_llama, demo_sft, tmp_path):
    model, tok = load(tiny_llama)

    def poison(step, _):
        if step == 3:  # a fault after step 3 (checkpoint at 2): the next loss is NaN
            emb = model.model.embed_tokens
            emb.weight = mx.full(emb.weight.shape, float("nan"))

    with pytest.raises(MindprintError, match=r"loss became nan .*at step 4.*checkpoint \(step 2\)"):
        train_sft(model, tok, demo_sft[:24], _cfg(save_every=2), tmp_path, progress=False, on_step=poison)
    ckpt = tmp_path / "checkpoint"
    assert read_checkpoint_state(ckpt)["step"] == 2
    weights = mx.load(str(ckpt / "trainable.safetensors"))
    assert weights and all(bool(mx.isfinite(v).all()) for v in weights.values())
    assert "sft" not in lora.adapter_names(model)  # the failed adapter is not left behind


def test_gradient_checkpointing_gives_the_same_adapter_and_is_undone(tiny_llama, demo_sft, tmp_path):
    got = {}
    for flag in (False, True):
        model, tok = load(tiny_llama)
        layer_call = type(model.layers[0]).__call__
        train_sft(model, tok, demo_sft[:8], _cfg(grad_checkpoint=flag), tmp_path / str(flag), progress=False)
        assert type(model.layers[0]).__call__ is layer_call
        got[flag] = {k: np.array(v) for k, v in lora.adapter_state(model, "sft").items()}
    assert max(float(np.abs(got[True][k] - got[False][k]).max()) for k in got[True]) < 1e-5


def test_sft_cli_trains_from_config_and_overrides_and_reports_bad_keys(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from mindprint_mlx.cli import cli

    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {tiny_llama}\ndata_dir: {DEMO_CURRICULUM_DIR}\nlora_rank: 2\ncompile: false\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["sft", "--config", str(cfg), f"out_dir={out}", "max_steps=2",
                                 "batch_size=2"])
    assert r.exit_code == 0, r.output
    assert (out / "adapter" / "adapters.safetensors").is_file() and (out / "config.yaml").is_file()
    assert json.loads((out / "adapter" / "mindprint.json").read_text())["steps"] == 2
    r = CliRunner().invoke(cli, ["sft", "--config", str(cfg), "lora_rnk=4"])
    assert r.exit_code == 1 and "unknown key 'lora_rnk'" in r.output and "did you mean 'lora_rank'" in r.output
    r = CliRunner().invoke(cli, ["sft", "--config", str(cfg), "lora_r=4"])
    assert r.exit_code == 1 and "key 'lora_r' was renamed to 'lora_rank'" in r.output


def test_compiled_step_trains_the_same_adapter_as_the_plain_one(tiny_llama, demo_sft, tmp_path):
    """`compile: true` (the default on a GPU) must be the same computation. On the CPU
    backend the first compile builds kernels once (tens of seconds with a cold cache)."""
    records = demo_sft[:8]
    states = {}
    for compiled in (False, True):
        model, tok = load(tiny_llama)
        res = train_sft(model, tok, records, _cfg(compile=compiled, max_steps=2),
                        tmp_path / f"c{compiled}", progress=False)
        assert res.steps == 2
        states[compiled] = {k: np.array(v) for k, v in lora.adapter_state(model, "sft").items()}
    plain, comp = states[False], states[True]
    assert plain.keys() == comp.keys() and plain
    assert max(float(np.abs(plain[k] - comp[k]).max()) for k in plain) < 1e-5
    assert max(float(np.abs(plain[k]).max()) for k in plain if k.endswith("lora_b")) > 0


def test_training_leaves_the_model_in_eval_mode_so_answers_after_it_are_deterministic(
        tiny_llama, demo_sft, tmp_path):
    # With adapter dropout, a model left in training mode answers the quiz after SFT with
    # dropout on: the same prompt gives different logits on each call.
    from mindprint_mlx.data.batching import encode_prompt

    model, tok = load(tiny_llama)
    assert not model.training                      # mlx-lm loads in eval mode
    train_sft(model, tok, demo_sft[:8], _cfg(epochs=1, lora_dropout=0.5), tmp_path / "a",
              progress=False)
    assert not model.training
    assert not any(a.training for _, m in lora.lora_layers(model) for a in m.adapters.values())
    x = mx.array([encode_prompt(tok, demo_sft[0].prompt)])
    np.testing.assert_array_equal(np.array(model(x)), np.array(model(x)))
