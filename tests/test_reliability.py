"""Reliability: the run lock (two processes), repairable directory replaces and orphan
removal, metrics that hold each step once after a resume, non-finite and divergence guards,
config values NaN/inf can never take, the model reference check."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mindprint_mlx import guards
from mindprint_mlx.config import ConfigError, load_config
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.io import atomic_dir, read_jsonl, repair_tree, replace_dir
from mindprint_mlx.runlock import LOCK_NAME, RunLocked, acquire


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    from mindprint_mlx.stop import clear_stop

    clear_stop()
    yield
    clear_stop()


# ------------------------------------------------------------------ the run lock

_HOLDER = """
import sys, time
from mindprint_mlx.runlock import acquire
lock = acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def _hold(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE,
                         text=True, env=dict(os.environ))
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        info = json.loads((run_dir / LOCK_NAME).read_text())
        assert info["pid"] == holder.pid and info["host"] and info["started"] <= time.time()
        with pytest.raises(RunLocked, match=rf"in use by another mindprint run \(pid {holder.pid} on "):
            acquire(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / LOCK_NAME).exists()          # a killed holder leaves its file behind
    notes: list[str] = []
    with acquire(run_dir, note=notes.append) as lock:
        assert lock.info["pid"] == os.getpid()
        assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "process is gone" in notes[0]
        with pytest.raises(RunLocked):             # one holder at a time, in-process too
            acquire(run_dir)
    assert not (run_dir / LOCK_NAME).exists()      # released: removed
    with acquire(run_dir, note=notes.append):      # a clean release leaves nothing to take over
        pass
    assert len(notes) == 1


def test_the_pipeline_cli_refuses_a_locked_run_dir(tmp_path, tiny_llama):
    import yaml

    run_dir = tmp_path / "run"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_llama), "data_dir": "demo", "run_dir": str(run_dir)}))
    holder = _hold(run_dir)
    try:
        r = subprocess.run([sys.executable, "-m", "mindprint_mlx.cli", "pipeline", "run", str(cfg),
                            "--resume"], capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and f"pid {holder.pid}" in r.stderr
    assert not (run_dir / "state.json").exists()   # refused before touching anything


# ------------------------------------------------------------------ replaces and orphans

def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_replace_cut_between_its_renames_is_repaired_and_orphans_are_removed(tmp_path):
    ckpt = tmp_path / "work" / "checkpoint"
    with atomic_dir(ckpt) as tmp:
        (tmp / "state.json").write_text("old")
    # A kill between replace_dir's two renames: the destination is missing, the old tree is
    # aside and the new one still under its temporary name.
    new = tmp_path / "work" / ".checkpoint.abc123.tmp"
    new.mkdir()
    (new / "state.json").write_text("new, maybe incomplete")
    os.replace(ckpt, ckpt.with_name(".checkpoint.old"))
    (tmp_path / ".state.json.x1y2.tmp").write_text("{")                  # atomic_path's temp
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / ".adapters.q9.tmp.safetensors").write_bytes(b"\0")
    (tmp_path / ".lock").write_text("{}")                                # not an orphan
    done = repair_tree(tmp_path)
    assert (ckpt / "state.json").read_text() == "old"
    assert any("restored work/checkpoint" in d for d in done)
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".lock"]
    assert (tmp_path / ".lock").exists()
    assert repair_tree(tmp_path) == []                                   # idempotent
    # replace_dir itself, and an old copy beside a complete destination, which is just removed
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("2")
    replace_dir(src, ckpt)
    assert _tree(ckpt) == {"f": "2"} and not src.exists()
    aside = ckpt.with_name(".checkpoint.old")
    aside.mkdir()
    assert repair_tree(tmp_path) == ["removed work/.checkpoint.old"] and _tree(ckpt) == {"f": "2"}


def test_sft_and_reward_metrics_hold_each_step_once_after_a_resume(tiny_llama, tmp_path):
    from mindprint_mlx.data import load_data_dir
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
    from mindprint_mlx.models import load
    from mindprint_mlx.train.reward import RewardConfig, train_reward_model
    from mindprint_mlx.train.sft import SFTConfig, train_sft

    demo = load_data_dir(DEMO_CURRICULUM_DIR)
    model, tok = load(tiny_llama)
    cfg = SFTConfig(lora_rank=2, lora_alpha=4.0, batch_size=2, epochs=1, save_every=2, compile=False,
                    max_seq_length=48)
    out = tmp_path / "sft"
    train_sft(model, tok, list(demo.sft[:10]), cfg, out, progress=False)      # 5 steps
    full = read_jsonl(out / "metrics.jsonl")
    # A kill after step 5 was logged but before its checkpoint: the checkpoint says step 4.
    st = json.loads((out / "checkpoint" / "state.json").read_text())
    st.update(step=4, micro=4)
    (out / "checkpoint" / "state.json").write_text(json.dumps(st))
    model, tok = load(tiny_llama)
    train_sft(model, tok, list(demo.sft[:10]), cfg, out, progress=False, resume=True)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == [r["step"] for r in full] == [1, 2, 3, 4, 5]

    rcfg = RewardConfig(lora_rank=2, lora_alpha=4.0, batch_size=4, epochs=2, log_every=1,
                        compile=False, max_seq_length=48, patience=5)
    rout = tmp_path / "rm"
    pairs = list(demo.preference[:10])
    model, tok = load(tiny_llama)
    train_reward_model(model, tok, pairs, rcfg, rout, progress=False)
    first = read_jsonl(rout / "metrics.jsonl")
    # Replay epoch 2 as if killed before its checkpoint: rewind the checkpoint to epoch 1.
    ep1 = [r for r in first if r.get("epoch") == 1 and "reward/val_loss" in r][0]
    st = json.loads((rout / "checkpoint" / "state.json").read_text())
    st.update(micro=ep1["step"], step=ep1["step"], done=False, history=st["history"][:1])
    (rout / "checkpoint" / "state.json").write_text(json.dumps(st))
    model, tok = load(tiny_llama)
    train_reward_model(model, tok, pairs, rcfg, rout, progress=False, resume=True)
    again = read_jsonl(rout / "metrics.jsonl")
    key = [(r["step"], "reward/val_loss" in r) for r in again]
    assert key == [(r["step"], "reward/val_loss" in r) for r in first] and len(set(key)) == len(key)


# ------------------------------------------------------------------ non-finite and divergence

def test_nothing_non_finite_is_saved_or_folded(tiny_llama, tmp_path):
    import mlx.optimizers as optim

    from mindprint_mlx.models import load, lora
    from mindprint_mlx.models.adapters import save_adapter
    from mindprint_mlx.train.checkpoint import last_good, save_checkpoint

    model, _ = load(tiny_llama)
    lora.apply_lora(model, "a", r=2)
    lora.apply_lora(model, "b", r=2)
    path, m = next(lora.lora_layers(model))
    m.adapters["a"].lora_b = mx.full(m.adapters["a"].lora_b.shape, float("nan"))
    with pytest.raises(guards.NonFiniteError, match=r"adapter 'a'.*lora_b.*not finite"):
        save_adapter(model, "a", tmp_path / "a")
    with pytest.raises(guards.NonFiniteError, match="adapter 'a'"):
        lora.combine_adapters(model, ["a", "b"], "ab")
    opt = optim.Adam(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    with pytest.raises(guards.NonFiniteError, match="checkpoint"):
        save_checkpoint(tmp_path / "ckpt", model, opt, {"step": 3})
    assert not (tmp_path / "a").exists() and not (tmp_path / "ckpt").exists()
    assert last_good(tmp_path / "ckpt") == "no checkpoint had been written yet"
    save_adapter(model, "b", tmp_path / "b")          # a finite one is written


def test_ppo_stops_on_a_non_finite_score_naming_the_step_and_saves_nothing(tiny_llama, tmp_path):
    from mindprint_mlx.models import load
    from mindprint_mlx.ppo import PPOConfig, train_ppo

    model, tok = load(tiny_llama)
    cfg = PPOConfig(steps=3, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4,
                    progress=False, save_every=1)
    calls = []

    def reward(tokens, lengths):        # finite on step 1, NaN on step 2
        calls.append(1)
        return mx.full((tokens.shape[0],), 1.0 if len(calls) == 1 else float("nan"))

    with pytest.raises(guards.NonFiniteError, match=r"reward score became nan at step 2; the last "
                       r"good checkpoint \(step 1\) is kept"):
        train_ppo(model, tok, ["Hello?", "Why?"], reward, cfg, tmp_path / "ppo")
    assert not (tmp_path / "ppo" / "ppo_adapter").exists()
    ckpt = tmp_path / "ppo" / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 1
    w = mx.load(str(ckpt / "adapter" / "adapters.safetensors"))
    assert guards.nonfinite_tensors(w) == []


def test_divergence_and_the_other_decisions():
    assert guards.divergence(2.0, 2.5, 1.0, 3.0) is None                    # noise, growth
    assert "far above its start" in guards.divergence(2.0, 9.0, None, None)
    assert guards.divergence(0.1, 0.5, None, None) is None                  # 5x, but +0.4 only
    assert "norm grew" in guards.divergence(None, None, 2.0, 5e4)
    assert guards.first_nonfinite({"a": 1.0, "b": None, "c": float("inf")}) == ("c", math.inf)
    assert guards.reward_at_chance(0.5) and guards.reward_at_chance(None)
    assert guards.reward_at_chance(float("nan")) and not guards.reward_at_chance(0.75)


def test_a_learning_rate_of_1000_is_reported_as_diverged_not_finished(tiny_llama, tmp_path):
    from mindprint_mlx.data import load_data_dir
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
    from mindprint_mlx.models import load
    from mindprint_mlx.train.sft import SFTConfig, train_sft

    demo = load_data_dir(DEMO_CURRICULUM_DIR)
    model, tok = load(tiny_llama)
    cfg = SFTConfig(lora_rank=2, lora_alpha=4.0, batch_size=2, epochs=1, learning_rate=1000.0, compile=False,
                    max_seq_length=48, save_every=1)
    with pytest.raises(guards.DivergedError, match=r"sft: training diverged \(the trainable "
                       r"weights' norm grew .* at step 1 .*no checkpoint had been written yet"):
        train_sft(model, tok, list(demo.sft[:6]), cfg, tmp_path / "sft", progress=False)
    assert not (tmp_path / "sft" / "adapter").exists()


# ------------------------------------------------------------------ config values

@pytest.mark.parametrize("text,match", [
    ("learning_rate: .nan\n", r"key 'learning_rate': nan is not a finite number"),
    ("weight_decay: .inf\n", r"key 'weight_decay': inf is not a finite number"),
    ("lora_dropout: 1.0\n", r"key 'lora_dropout': invalid value 1.0"),
    ("lora_dropout: -0.1\n", r"key 'lora_dropout'"),
    ("num_layers: -1\n", r"key 'num_layers'"),
    ("lora_targets: []\n", r"key 'lora_targets'"),
])
def test_sft_config_values(tmp_path, text, match):
    from mindprint_mlx.train.sft import SFTConfig

    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f, SFTConfig)


def test_nan_and_inf_are_rejected_for_every_float_key(tmp_path):
    import dataclasses
    import typing

    from mindprint_mlx.pipeline import PipelineConfig, load_pipeline_config
    from mindprint_mlx.ppo import PPOConfig

    def float_keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from float_keys(hints[f.name], f"{prefix}{f.name}.")
            elif "float" in str(hints[f.name]):
                yield prefix + f.name

    keys = list(float_keys(PipelineConfig))
    for section in ("sft", "ppo", "reward.train", "adaptive", "eval.weights", "verify"):
        assert any(k.startswith(section + ".") for k in keys), section
    for key in keys:
        for bad in ("inf", "nan", "-inf"):
            with pytest.raises(ConfigError, match=rf"{key}.*not a finite number"):
                load_pipeline_config(None, ["model=m", "data_dir=d", f"{key}={bad}"])
    with pytest.raises(ConfigError, match="learning_rate"):
        PPOConfig(learning_rate=float("inf")).validate()        # built in code, not from YAML


def test_model_reference_check(tmp_path, tiny_llama, monkeypatch):
    guards.check_model_ref(str(tiny_llama))
    guards.check_model_ref("Qwen/Qwen2.5-0.5B-Instruct")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "models" / "tiny-llama" / "config.json").write_text("{}")
    with pytest.raises(MindprintError, match=r"models/tiny-lama: no such directory \(did you mean "
                       r"models/tiny-llama\?\)"):
        guards.check_model_ref("models/tiny-lama")       # org/name shape, but models/ is local
    for bad in ("./nope", "/abs/nope", "a/b/c"):
        with pytest.raises(MindprintError, match="no such directory"):
            guards.check_model_ref(bad)
    (tmp_path / "f").write_text("x")
    with pytest.raises(MindprintError, match="is a file"):
        guards.check_model_ref("f")


def test_a_bad_model_never_poisons_the_run_directory(tmp_path):
    import yaml

    from mindprint_mlx.pipeline import load_pipeline_config, run_pipeline

    run_dir = tmp_path / "run"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tmp_path / "modles" / "tiny"), "data_dir": "demo",
                                   "run_dir": str(run_dir)}))
    for extra in ([], ["--dry-run"]):
        r = subprocess.run([sys.executable, "-m", "mindprint_mlx.cli", "pipeline", "run", str(cfg),
                            *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "modles/tiny: no such directory" in r.stderr
        assert not run_dir.exists()
    # A directory that looks like a model but does not load: the run fails, and the next run
    # (without --resume) is not told that the directory "already holds a run".
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "nonesuch"}')
    for _ in range(2):
        with pytest.raises(MindprintError, match="nonesuch"):
            run_pipeline(load_pipeline_config(None, [f"model={bad}", "data_dir=demo",
                                                     f"run_dir={run_dir}"]), echo=lambda s: None)
    assert not (run_dir / LOCK_NAME).exists()
