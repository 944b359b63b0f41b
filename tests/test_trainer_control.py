"""Trainer control: a stop request (the pipeline's first Ctrl-C) checkpoints after the
current optimizer step and resumes identically; gradient checkpointing in the reward and
PPO trainers changes nothing.
(The compiled-vs-plain SFT check is in test_sft.py.)"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mindprint_mlx.data import load_data_dir
from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
from mindprint_mlx.models import load, lora
from mindprint_mlx.ppo import PPOConfig, train_ppo
from mindprint_mlx.train.checkpoint import read_checkpoint_state
from mindprint_mlx.errors import Interrupted
from mindprint_mlx.stop import clear_stop, request_stop, stop_requested
from mindprint_mlx.train.reward import RewardConfig, train_reward_model
from mindprint_mlx.train.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def demo():
    return load_data_dir(DEMO_CURRICULUM_DIR)


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    clear_stop()
    yield
    clear_stop()


def _state(model, name):
    return {k: np.array(v) for k, v in lora.adapter_state(model, name).items()}


def _max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_sft_stop_request_checkpoints_at_that_step_and_resumes_identically(tiny_llama, demo, tmp_path):
    cfg = SFTConfig(lora_rank=4, lora_alpha=8.0, batch_size=2, epochs=1, learning_rate=3e-3, save_every=100,
                    compile=False, max_seq_length=64, lora_dropout=0.1, seed=3)
    records = list(demo.sft[:10])                                   # 5 steps
    model, tok = load(tiny_llama)
    full = train_sft(model, tok, records, cfg, tmp_path / "full", progress=False)
    want = _state(model, "sft")

    def stop_after_2(step, _):
        if step == 2:
            request_stop()             # what the pipeline's SIGINT handler does

    model, tok = load(tiny_llama)
    with pytest.raises(Interrupted, match="stopped at step 2") as e:
        train_sft(model, tok, records, cfg, tmp_path / "cut", progress=False, on_step=stop_after_2)
    assert stop_requested() and e.value.step == 2
    assert read_checkpoint_state(tmp_path / "cut" / "checkpoint")["step"] == 2   # save_every=100
    clear_stop()
    model, tok = load(tiny_llama)
    resumed = train_sft(model, tok, records, cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == full.steps == 5
    assert _max_diff(want, _state(model, "sft")) < 1e-6


def test_reward_stop_request_mid_epoch_resumes_identically(tiny_llama, demo, tmp_path):
    cfg = RewardConfig(lora_rank=2, lora_alpha=4.0, batch_size=2, epochs=2, learning_rate=3e-3, max_seq_length=64,
                       compile=False, log_every=1, patience=5)
    pairs = list(demo.preference[:10])                              # 8 train pairs: 4 steps/epoch
    model, tok = load(tiny_llama)
    full = train_reward_model(model, tok, pairs, cfg, tmp_path / "full", progress=False)

    calls = {"n": 0}
    import mindprint_mlx.train.reward as reward_mod
    orig = reward_mod.bradley_terry

    def counting(scores, margin):       # the stop arrives during step 3 (mid-epoch 1)
        calls["n"] += 1
        if calls["n"] == 3:
            request_stop()
        return orig(scores, margin)

    model, tok = load(tiny_llama)
    reward_mod.bradley_terry = counting
    try:
        with pytest.raises(Interrupted) as e:
            train_reward_model(model, tok, pairs, cfg, tmp_path / "cut", progress=False)
    finally:
        reward_mod.bradley_terry = orig
    assert e.value.step == 3
    st = read_checkpoint_state(tmp_path / "cut" / "checkpoint")
    assert st["step"] == 3 and st["micro"] == 3       # 3 of epoch 1's 4 batches
    clear_stop()
    model, tok = load(tiny_llama)
    resumed = train_reward_model(model, tok, pairs, cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed.epochs == full.epochs == 2
    a = mx.load(str(full.adapter_dir / "adapters.safetensors"))
    b = mx.load(str(resumed.adapter_dir / "adapters.safetensors"))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-6
    for x, y in zip(full.history, resumed.history):
        assert abs(x["reward/val_loss"] - y["reward/val_loss"]) < 1e-6
        assert abs(x["reward/epoch_train_loss"] - y["reward/epoch_train_loss"]) < 1e-6


PROMPTS = [[{"role": "user", "content": f"Say something about {w}."}]
           for w in ("rivers", "stone", "rain", "moss")]


def _ppo_run(tiny_llama, out, steps=3, resume=False, stop_at_call=None, **kw):
    model, tok = load(tiny_llama)
    calls = {"n": 0}

    def reward_fn(tokens, lengths):
        calls["n"] += 1
        if calls["n"] == stop_at_call:
            request_stop()
        return (tokens == 40).astype(mx.float32).sum(axis=1)

    cfg = PPOConfig(steps=steps, batch_size=4, mini_batch_size=2, max_new_tokens=4, ppo_epochs=1,
                    learning_rate=1e-2, lora_rank=2, seed=1, progress=False, save_every=0, **kw)
    mx.random.seed(7)                   # the PPO adapter's initialisation draws from it
    res = train_ppo(model, tok, PROMPTS, reward_fn, cfg, out, resume=resume)
    return res, _state(model, "ppo")


def test_ppo_stop_request_checkpoints_and_resumes_identically(tiny_llama, tmp_path):
    full, want = _ppo_run(tiny_llama, tmp_path / "full")
    with pytest.raises(Interrupted) as e:
        _ppo_run(tiny_llama, tmp_path / "cut", stop_at_call=2)      # during step 2's rollout
    assert e.value.step == 2
    assert (tmp_path / "cut" / "checkpoint" / "trainer_state.json").is_file()   # save_every=0
    clear_stop()
    resumed, got = _ppo_run(tiny_llama, tmp_path / "cut", resume=True)
    assert resumed.steps == full.steps == 3
    assert _max_diff(want, got) < 1e-6


def test_ppo_gradient_checkpointing_gives_the_same_adapter(tiny_llama, tmp_path):
    _, plain = _ppo_run(tiny_llama, tmp_path / "a", steps=2)
    _, ckpt = _ppo_run(tiny_llama, tmp_path / "b", steps=2, grad_checkpoint=True)
    assert _max_diff(plain, ckpt) < 1e-6
    model, _ = load(tiny_llama)
    assert not getattr(type(model.layers[0]).__call__, "__name__", "") == "checkpointed"  # undone


def test_reward_gradient_checkpointing_gives_the_same_adapter(tiny_llama, demo, tmp_path):
    got = {}
    for flag in (False, True):
        cfg = RewardConfig(lora_rank=2, lora_alpha=4.0, batch_size=4, epochs=1, learning_rate=3e-3, max_seq_length=64,
                           compile=False, grad_checkpoint=flag)
        model, tok = load(tiny_llama)
        res = train_reward_model(model, tok, list(demo.preference[:10]), cfg, tmp_path / str(flag),
                                 progress=False)
        got[flag] = mx.load(str(res.adapter_dir / "adapters.safetensors"))
    assert max(mx.abs(got[True][k] - got[False][k]).max().item() for k in got[False]) < 1e-6


def test_ctrl_c_on_mindprint_sft_checkpoints_exits_130_and_resumes(tiny_llama, tmp_path):
    """A real SIGINT to the `mindprint sft` process: it finishes the step, saves a
    checkpoint, says how to resume and exits 130; `--resume` then completes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "sft.yaml"
    out = tmp_path / "run"
    cfg.write_text(f"model: {tiny_llama}\ndata_dir: {DEMO_CURRICULUM_DIR}\nout_dir: {out}\n"
                   "lora_rank: 2\ncompile: false\nbatch_size: 2\nmax_steps: 400\nsave_every: 1000\n")
    cmd = [sys.executable, "-m", "mindprint_mlx.cli", "sft", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, MINDPRINT_NO_OPENBLAS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    stopped_at = read_checkpoint_state(out / "checkpoint")["step"]
    assert 0 < stopped_at < 80

    done = subprocess.run(cmd + ["--resume"],
                          capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, MINDPRINT_NO_OPENBLAS="1"))
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "adapter" / "mindprint.json").read_text())["steps"] > stopped_at
