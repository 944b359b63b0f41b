"""`mindprint demo`'s settings and guards (the demo itself runs in CI as a script: it takes minutes)."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mindprint_mlx.cli import cli
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.pipeline import load_pipeline_config, run_pipeline
from mindprint_mlx.pipeline.demo import DEMO_CONFIG, FAST_OVERRIDES, _clear_previous

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_configs_demo_yaml_holds_the_embedded_demo_settings():
    d = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert (d.pop("model"), d.pop("data_dir"), d.pop("run_dir")) == ("demo", "demo", "mindprint-demo")
    assert d == DEMO_CONFIG


def test_pipeline_yaml_is_a_valid_config_for_a_real_model():
    cfg = load_pipeline_config(CONFIGS / "pipeline.yaml")
    assert "Instruct-4bit" in cfg.model and cfg.ppo["steps"] >= 50


def test_demo_plan_runs_ppo_below_a_threshold_and_trains_nothing(tmp_path, monkeypatch,
                                                                pretrained_demo_model):
    from mindprint_mlx.config import deep_merge

    # `model: demo` resolves to the cached demo model: the session's, not a new pretraining.
    monkeypatch.setenv("MINDPRINT_CACHE", str(pretrained_demo_model.parent))

    base = deep_merge(DEMO_CONFIG, {**FAST_OVERRIDES, "model": "demo", "data_dir": "demo",
                                    "run_dir": str(tmp_path / "run")})
    cfg = load_pipeline_config(None, base=base)
    lines = []
    res = run_pipeline(cfg, dry_run=True, echo=lines.append)
    assert [p["topic"] for p in res.plan] == ["cycle-phases", "drivers-of-cycles"]
    assert all(p["plan"]["trainable"] and p["plan"]["pass_threshold"] == 0.5 for p in res.plan)
    assert "PPO if quiz < 0.5" in "\n".join(lines)
    assert not (tmp_path / "run").exists()
    assert cfg.model == str(pretrained_demo_model)


def test_demo_never_replaces_a_directory_that_is_not_a_demo_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(MindprintError, match="not a previous demo run"):
        _clear_previous(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "mine")])
    assert res.exit_code == 1 and "not a previous demo run" in res.output


def test_fast_demo_learns_the_voice_and_ppo_raises_the_reward_with_bounded_kl(
        tmp_path, pretrained_demo_model):
    """The real `mindprint demo --fast` (tiny model, 2 topics): what the demo claims holds.
    (Its model cache is the `pretrained_demo_model` fixture's: one pretraining per session.)"""
    from mindprint_mlx.pipeline.demo import HONEST, parts_text, run_demo, where_text

    made = run_demo(tmp_path / "demo", fast=True, echo=lambda s: None,
                    cache_dir=pretrained_demo_model.parent)
    assert made["model"] == str(pretrained_demo_model)
    assert made["status"] == "finished"
    # SFT: greedy quiz answers use the persona's voice markers on at least one topic.
    assert made["voice"]["topics"] == 2 and made["voice"]["with_markers"] >= 1
    assert made["parts"]["sft"]["markers"] > 0
    # PPO ran below the threshold, raised the mean reward on the topic's prompts (same
    # sampling keys before and after), and stayed close to the SFT policy.
    assert made["ppo"], "PPO ran on no topic"
    for p in made["ppo"]:
        assert p["reward_after"] > p["reward_before"], p
        assert p["kl_mean"] is not None and 0 <= p["kl_last"] < 10.0, p
        assert p["answer_before"] is not None and p["answer_after"] is not None
    text = parts_text(made)
    assert "Voice after SFT" in text and "PPO " in text and "KL to the SFT policy" in text
    assert "| topic |" in made["summary"] and "Pass rate of the final adapter" in made["summary"]
    assert (tmp_path / "demo" / "final_adapter" / "adapter_config.json").is_file()
    assert "final_adapter/" in where_text(made) and "not meant to be good" in HONEST
