"""Configs (YAML -> dataclasses, errors that name file/line/key) and atomic, safe file I/O."""

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Literal, Optional

import pytest

from mindprint_mlx.config import ConfigError, load_config, parse_overrides, save_config, to_dict
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.io import (append_jsonl, atomic_dir, atomic_path, atomic_save_safetensors,
                              atomic_write_json, atomic_write_text, read_jsonl, safe_name,
                              sha256_files)
from mindprint_mlx.progress import Progress


@dataclasses.dataclass
class Opt:
    lr: float = 1e-4
    steps: int = 10
    warmup: bool = False


@dataclasses.dataclass
class Cfg:
    name: str = "run"
    seed: int = 0
    optim: Opt = dataclasses.field(default_factory=Opt)
    targets: list[str] = dataclasses.field(default_factory=lambda: ["o_proj"])
    mode: Literal["fast", "full"] = "fast"
    limit: Optional[int] = None


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error(fn, *a, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*a, **kw)
    assert isinstance(e.value, MindprintError)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_yaml_into_nested_dataclasses(tmp_path):
    p = write(tmp_path, "name: mine\noptim:\n  lr: 3e-4\n  steps: 5\ntargets: [q_proj, v_proj]\nmode: full\n")
    cfg = load_config(p, Cfg)
    assert cfg == Cfg(name="mine", optim=Opt(lr=3e-4, steps=5), targets=["q_proj", "v_proj"], mode="full")
    assert isinstance(cfg.optim.lr, float)  # YAML reads "3e-4" as a string; coerced
    assert load_config(None, Cfg) == Cfg()
    assert load_config(write(tmp_path, "", "empty.yaml"), Cfg) == Cfg()
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml", Cfg) == cfg
    assert to_dict(cfg)["optim"] == {"lr": 3e-4, "steps": 5, "warmup": False}


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "seed: 1\noptim:\n  lrr: 0.1\n")
    msg = error(load_config, p, Cfg)
    assert str(p) in msg and "'optim.lrr'" in msg and "did you mean 'lr'" in msg
    msg = error(load_config, write(tmp_path, "sead: 1\n", "b.yaml"), Cfg)
    assert "b.yaml" in msg and "'sead'" in msg and "did you mean 'seed'" in msg


def test_bad_values_name_the_key(tmp_path):
    msg = error(load_config, write(tmp_path, "optim:\n  steps: many\n"), Cfg)
    assert "cfg.yaml" in msg and "'optim.steps'" in msg and "'many'" in msg and "integer" in msg
    assert "'mode'" in error(load_config, write(tmp_path, "mode: slow\n"), Cfg)
    assert "expected a mapping" in error(load_config, write(tmp_path, "optim: 3\n"), Cfg)
    assert "top level must be a mapping" in error(load_config, write(tmp_path, "- a\n- b\n"), Cfg)
    assert "not found" in error(load_config, tmp_path / "missing.yaml", Cfg)


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, "name: ok\nseed: 1\noptim:\n  lr: [1, 2\n  steps: 3\nmode: fast\n")
    msg = error(load_config, p, Cfg)
    assert msg.startswith(f"{p}:") and "invalid YAML" in msg
    line = int(msg[len(str(p)) + 1:].split(":")[0])
    assert 4 <= line <= 6


def test_overrides_coerce_types(tmp_path):
    assert parse_overrides(["optim.lr=0.001", "seed=3", "optim.warmup=true", "name=x=y"]) == \
        {"optim": {"lr": 0.001, "warmup": True}, "seed": 3, "name": "x=y"}
    p = write(tmp_path, "optim:\n  steps: 5\n")
    assert load_config(p, Cfg, ["optim.lr=1e-5"]).optim.lr == 1e-5  # YAML 1.1 reads a string
    cfg = load_config(p, Cfg, ["optim.lr=3", "optim.steps=7", "name=42", "limit=8",
                               "targets=[a, b]", "optim.warmup=yes"])
    assert cfg.optim == Opt(lr=3.0, steps=7, warmup=True)
    assert isinstance(cfg.optim.lr, float) and cfg.name == "42" and cfg.limit == 8
    assert cfg.targets == ["a", "b"]
    assert load_config(p, Cfg, {"limit": None}).limit is None
    assert "did you mean 'steps'" in error(load_config, p, Cfg, ["optim.step=1"])
    assert "key=value" in error(parse_overrides, ["seed"])
    assert "'seed'" in error(load_config, p, Cfg, ["seed=1.5"])


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"step": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]
    fresh = tmp_path / "sub" / "new.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(fresh) as tmp:
            tmp.write_text("partial")
            raise RuntimeError
    assert not fresh.exists() and os.listdir(fresh.parent) == []
    atomic_write_text(fresh, "whole")
    assert fresh.read_text() == "whole" and os.listdir(fresh.parent) == ["new.txt"]


def test_atomic_safetensors_and_dir(tmp_path):
    import mlx.core as mx

    f = atomic_save_safetensors(tmp_path / "w.safetensors", {"a": mx.arange(3)}, {"k": "v"})
    assert f.name == "w.safetensors" and mx.load(str(f))["a"].tolist() == [0, 1, 2]
    d = tmp_path / "out"
    with atomic_dir(d) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(d) as tmp:
            (tmp / "x").write_text("2")
            raise ValueError
    assert (d / "x").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["out", "w.safetensors"]


def test_read_jsonl_skips_torn_last_line(tmp_path):
    p = tmp_path / "metrics" / "train.jsonl"
    append_jsonl(p, {"step": 1, "train/loss": 2.5})
    append_jsonl(p, {"step": 2, "train/loss": Path("x")})  # not JSON-native: stringified
    with open(p, "a") as f:
        f.write('{"step": 3, "train/lo')  # a run killed mid-line
    assert read_jsonl(p) == [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": "x"}]
    assert read_jsonl(tmp_path / "none.jsonl") == []


@pytest.mark.parametrize("raw, clean", [
    ("unit 1", "unit-1"), ("../../etc", "etc"), ("/abs/path", "abs-path"), ("a/b", "a-b"),
    ("Ünïcödé", "Unicode"), ("..hidden", "hidden"), ("x..y", "x.y"), ("ok_name-1.2", "ok_name-1.2"),
])
def test_safe_name_cleans(raw, clean):
    s = safe_name(raw)
    assert s == clean
    assert "/" not in s and ".." not in s and not os.path.isabs(s) and s not in (".", "..")


@pytest.mark.parametrize("raw", ["..", "/", ".", "", "///", "???"])
def test_safe_name_rejects(raw):
    with pytest.raises(MindprintError, match="topic"):
        safe_name(raw, what="topic")
    with pytest.raises(MindprintError, match="must be a string"):
        safe_name(None)


def test_sha256_files_order_independent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("1")
    b.write_text("2")
    before = sha256_files([a, b])
    assert before == sha256_files([b, a])
    b.write_text("3")
    assert sha256_files([a, b]) != before


def test_progress_plain_lines_when_not_a_tty():
    out = io.StringIO()
    with Progress(4, "sft", stream=out, every=0.0) as bar:
        bar.update(1, loss=1.23456)
        bar.update(3, loss=0.5)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sft [") and "1/4" in lines[0] and "loss=1.23" in lines[0]
    assert "4/4" in lines[-1] and "loss=0.5" in lines[-1]
    quiet = io.StringIO()
    Progress(2, "x", enabled=False, stream=quiet).update(2)
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("section,old,new", [("sft", "lr", "learning_rate"), ("sft", "lora_r", "lora_rank"),
                                             ("sft", "grad_accumulation", "gradient_accumulation_steps"),
                                             ("reward.train", "max_len", "max_seq_length")])
def test_old_keys_are_errors_naming_the_new_key(tmp_path, section, old, new):
    from mindprint_mlx.pipeline.config import load_pipeline_config

    p = tmp_path / "run.yaml"
    body = {"sft": f"sft:\n  {old}: 1\n", "reward.train": f"reward:\n  train:\n    {old}: 64\n"}[section]
    p.write_text("model: m\ndata_dir: d\n" + body)
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(p)
    msg = str(e.value)
    assert str(p) in msg and f"'{section}.{old}' was renamed to '{section}.{new}'" in msg


def test_pipeline_sections_are_the_trainers_configs_and_ppo_keeps_the_pipeline_default(tmp_path):
    from mindprint_mlx.data.adaptive import AdaptiveBounds
    from mindprint_mlx.pipeline.config import load_pipeline_config
    from mindprint_mlx.ppo import PPOConfig
    from mindprint_mlx.train.reward import RewardConfig
    from mindprint_mlx.train.sft import SFTConfig

    base = ["model=m", "data_dir=d"]
    cfg = load_pipeline_config(None, base)
    assert (type(cfg.sft), type(cfg.ppo), type(cfg.reward.train), type(cfg.adaptive)) == \
        (SFTConfig, PPOConfig, RewardConfig, AdaptiveBounds)
    # the pipeline normalises PPO's scores; the standalone trainer keeps the classic default
    assert PPOConfig().reward_norm == "none" and cfg.ppo.reward_norm == "sft_samples"
    # a `ppo:` section is merged over that default, and may still change it
    cfg = load_pipeline_config(None, base + ["ppo.steps=3"])
    assert (cfg.ppo.steps, cfg.ppo.reward_norm) == (3, "sft_samples")
    assert load_pipeline_config(None, base + ["ppo.reward_norm=none"]).ppo.reward_norm == "none"
    # one style of error for every section, naming file, key and the closest key
    p = tmp_path / "run.yaml"
    p.write_text("model: m\ndata_dir: d\nadaptive:\n  min_epoch: 2\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'adaptive.min_epoch' \(did you "
                                          r"mean 'min_epochs'\?\)"):
        load_pipeline_config(p)
    with pytest.raises(ConfigError, match=r"sft.num_layers \(2\) and ppo.num_layers \(all\) must match"):
        load_pipeline_config(None, base + ["sft.num_layers=2"])


def test_a_trainer_yaml_holds_run_keys_and_trainer_keys(tmp_path):
    from mindprint_mlx.config import load_run_config
    from mindprint_mlx.ppo import PPOConfig
    from mindprint_mlx.ppo.run import PPORun
    from mindprint_mlx.train.sft import SFTConfig, SFTRun

    p = tmp_path / "sft.yaml"
    p.write_text("model: m\ndata_dir: d\neval_fraction: 0.2\nlora_rank: 4\nepochs: 2\n")
    run, cfg = load_run_config(p, SFTRun, SFTConfig, ["out_dir=o", "learning_rate=2e-4"])
    assert (run.model, run.data_dir, run.out_dir, run.eval_fraction) == ("m", "d", "o", 0.2)
    assert (cfg.lora_rank, cfg.epochs, cfg.learning_rate) == (4, 2, 2e-4)
    with pytest.raises(ConfigError, match=r"unknown key 'eval_fracton' \(did you mean 'eval_fraction'\?\)"):
        load_run_config(p, SFTRun, SFTConfig, ["eval_fracton=0.1"])
    with pytest.raises(ConfigError, match=r"key 'lr' was renamed to 'learning_rate'"):
        load_run_config(p, SFTRun, SFTConfig, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"key 'model' is required"):
        load_run_config(None, SFTRun, SFTConfig, ["data_dir=d"])
    with pytest.raises(ConfigError, match=r"key 'eval_fraction': invalid value 1.0"):
        load_run_config(p, SFTRun, SFTConfig, ["eval_fraction=1.0"])
    # PPO: trainer keys under `ppo:` (the usual layout) or at the top level, not both
    p = tmp_path / "ppo.yaml"
    p.write_text("model: m\nprompts: p.jsonl\nreward_model: rm\nvalue_head_init: reward\n"
                 "ppo:\n  steps: 5\n")
    run, cfg = load_run_config(p, PPORun, PPOConfig, ["ppo.top_p=0.9"], section="ppo")
    assert (run.model, run.prompts, run.reward_model) == ("m", "p.jsonl", "rm")
    assert (cfg.steps, cfg.top_p, cfg.value_head_init) == (5, 0.9, "reward")
    with pytest.raises(ConfigError, match=r"key 'steps' is set both at the top level and as 'ppo.steps'"):
        load_run_config(p, PPORun, PPOConfig, ["steps=3"], section="ppo")
    with pytest.raises(ConfigError, match=r"unknown key 'ppo.stpes' \(did you mean 'steps'\?\)"):
        load_run_config(p, PPORun, PPOConfig, ["ppo.stpes=3"], section="ppo")


def test_every_setting_a_user_sets_has_one_line_of_help():
    import typing

    from mindprint_mlx.cli.ditto import DITTORunConfig
    from mindprint_mlx.cli.dpo import DPORunConfig
    from mindprint_mlx.cli.grpo import GRPORunConfig
    from mindprint_mlx.evaluate import QuizWeights
    from mindprint_mlx.grpo import GRPOConfig
    from mindprint_mlx.pipeline.config import PipelineConfig
    from mindprint_mlx.ppo.run import PPORun
    from mindprint_mlx.preference import DITTOConfig, DPOConfig
    from mindprint_mlx.train.reward import RewardRun
    from mindprint_mlx.train.sft import SFTRun

    seen, todo = set(), [PipelineConfig, SFTRun, RewardRun, PPORun, DPOConfig, DITTOConfig,
                         GRPOConfig, QuizWeights, DPORunConfig, GRPORunConfig, DITTORunConfig]
    while todo:                 # PipelineConfig brings its sections: SFTConfig, PPOConfig, ...
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            h = f.metadata.get("help")
            assert isinstance(h, str) and h.strip() and "\n" not in h, f"{cls.__name__}.{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                todo.append(hints[f.name])
    assert {c.__name__ for c in seen} >= {"SFTConfig", "PPOConfig", "RewardConfig", "AdaptiveBounds",
                                          "RewardSection", "EvalSettings", "VerifySettings",
                                          "EstimateSettings", "QuizWeights"}
