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


def test_demo_plan_runs_ppo_below_a_threshold_and_trains_nothing(tmp_path):
    cfg = load_pipeline_config(None, base={**DEMO_CONFIG, "model": "demo", "data_dir": "demo",
                                           "run_dir": str(tmp_path / "run"), **FAST_OVERRIDES})
    lines = []
    res = run_pipeline(cfg, dry_run=True, echo=lines.append)
    assert [p["topic"] for p in res.plan] == ["cycle-phases", "drivers-of-cycles"]
    assert all(p["plan"]["trainable"] and p["plan"]["pass_threshold"] == 0.45 for p in res.plan)
    assert "PPO if quiz < 0.45" in "\n".join(lines)
    assert not (tmp_path / "run").exists()


def test_demo_never_replaces_a_directory_that_is_not_a_demo_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(MindprintError, match="not a previous demo run"):
        _clear_previous(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "mine")])
    assert res.exit_code == 1 and "not a previous demo run" in res.output
