"""The refine phase's methods in the pipeline, on a tiny model: two topics of one unit, a run-
wide method and a per-topic override, each run stopped right after its first topic's
refinement and resumed (the refined adapter is loaded back from state.json and folded into
the unit); the config's refine keys checked with one-line errors; the plan per method."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mindprint_mlx.config import ConfigError
from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
from mindprint_mlx.models.adapters import adapter_metadata
from mindprint_mlx.pipeline import load_pipeline_config, run_pipeline
from mindprint_mlx.stop import clear_stop, request_stop

UNIT = "unit-1-foundations"
CHAPTER = "chapter-1-nature-of-cycles"
TOPICS = ["cycle-phases", "drivers-of-cycles"]
KEYS = [f"{UNIT}/{CHAPTER}/{t}" for t in TOPICS]
TITLE = {"grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO", "ditto": "DITTO", "ppo": "PPO"}


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    clear_stop()
    yield
    clear_stop()


def _data(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in DEMO_CURRICULUM_DIR.iterdir():
        if f.suffix == ".jsonl":
            keep = [line for line in f.read_text().splitlines()
                    if line.strip() and json.loads(line).get("chapter") == CHAPTER]
            (dst / f.name).write_text("\n".join(keep) + "\n")
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _config(model, data, run_dir, refine: dict) -> dict:
    small = {"save_every": 1, "progress": False, "lora_rank": 2, "lora_alpha": 4.0}
    return {
        "model": str(model), "data_dir": str(data), "run_dir": str(run_dir), "seed": 0,
        "reward": {"train": {"lora_rank": 2, "lora_alpha": 4.0, "epochs": 1, "batch_size": 8,
                             "max_seq_length": 96, "compile": False}, "continue_at_chance": True},
        "sft": {"lora_rank": 2, "lora_alpha": 4.0, "max_seq_length": 96, "compile": False},
        "refine": refine,
        "grpo": {**small, "steps": 2, "batch_size": 2, "group_size": 2, "max_new_tokens": 8,
                 "learning_rate": 1e-3},
        "dpo": {**small, "steps": 2, "batch_size": 2, "max_seq_length": 96, "learning_rate": 1e-3},
        "ditto": {**small, "rounds": 2, "steps": 1, "batch_size": 2, "samples_per_prompt": 1,
                  "max_new_tokens": 8, "max_seq_length": 96, "learning_rate": 1e-3},
        # a threshold no answer reaches: every topic is refined
        "adaptive": {"min_epochs": 1, "max_epochs": 1, "min_pass_threshold": 1.0,
                     "max_pass_threshold": 1.0},
        "eval": {"max_tokens": 8, "max_questions": 2, "judge": "reward", "retention": False,
                 "reward_samples": 1},
    }


def _cfg_file(tmp_path, model, refine: dict, name: str = "run") -> Path:
    f = tmp_path / f"{name}.yaml"
    data = tmp_path / "data"
    if not data.exists():
        _data(data)
    f.write_text(yaml.safe_dump(_config(model, data, tmp_path / name, refine)))
    return f


def _stop_after_refine(first_key: str, title: str, lines: list):
    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith(f"[{first_key}] {title}: mean reward"):
            request_stop()               # what Ctrl-C does: stop once this phase is saved
    return echo


@pytest.mark.parametrize("run_wide, override", [("grpo", "dpo"), ("rloo", "ditto")])
def test_methods_finish_resume_and_fold(tmp_path, tiny_demo_model, run_wide, override):
    """Topic 1 gets the run-wide method, topic 2 (overridden by name) the other; a run
    stopped after topic 1's refinement resumes to the end, the merged unit adapter being
    exactly both topics' sft + refine adapters stacked."""
    f = _cfg_file(tmp_path, tiny_demo_model, {"method": run_wide, "methods": {TOPICS[1]: override}})
    lines: list[str] = []
    cut = run_pipeline(load_pipeline_config(f), echo=_stop_after_refine(KEYS[0], TITLE[run_wide], lines))
    assert cut.status == "interrupted", lines
    assert set(cut.state["topics"][KEYS[0]]["phases"]) == {"sft", "quiz", "ppo"}
    res = run_pipeline(load_pipeline_config(f), resume=True, echo=lines.append)
    assert res.status == "finished", lines
    run_dir = res.run_dir
    st = json.loads((run_dir / "state.json").read_text())
    assert [p["refine_method"] for p in st["plan"]] == [run_wide, override]
    for key, topic, method in zip(KEYS, TOPICS, (run_wide, override)):
        rec = st["topics"][key]["phases"]["ppo"]
        assert rec["method"] == method and rec["adapter_name"] == method
        adir = run_dir / "adapters" / UNIT / CHAPTER / topic / f"{method}_adapter"
        assert rec["adapter"] == str(adir.relative_to(run_dir))
        assert (adir / "adapters.safetensors").is_file()
        meta = adapter_metadata(adir)
        assert meta["adapter_name"] == method and meta["method"] == method
        # the trainer ran its steps, the training-batch score (the method's metric) recorded
        want_steps = {"grpo": 2, "rloo": 2, "dpo": 2, "ditto": 2}[method]
        assert rec["steps"] == want_steps
        assert rec["score_key"] == ("objective/scores" if method in ("grpo", "rloo") else "rewards/margins")
        assert rec["trend"]["first"] is not None and rec["trend"]["rises"] in (True, False)
        assert np.isfinite(rec["reward_before"]) and np.isfinite(rec["reward_after"])
        assert (run_dir / "metrics" / rec["metrics"][0]).is_file()
        assert 0.0 <= st["topics"][key]["phases"]["final"]["score"] <= 1.0
        assert f"[{key}] {TITLE[method]} on " in "\n".join(lines)
    report = (run_dir / "report.md").read_text()
    assert f"| {run_wide} |" in report and f"| {override} |" in report
    assert f"- {TITLE[run_wide]}: 2 steps" in report and f"- {TITLE[override]}: 2 steps" in report
    assert any((run_dir / "plots").glob(f"{run_wide}-*.png"))

    # the unit's merged adapter is exactly sft + refine of both topics, stacked
    import mlx.core as mx

    from mindprint_mlx.models import load, lora
    from mindprint_mlx.models.adapters import load_adapter

    model, tok = load(str(tiny_demo_model))
    x = mx.array([tok.apply_chat_template([{"role": "user", "content": "What is a cycle?"}],
                                          add_generation_prompt=True)])
    for i, (topic, method) in enumerate(zip(TOPICS, (run_wide, override))):
        d = run_dir / "adapters" / UNIT / CHAPTER / topic
        load_adapter(model, d / "sft_adapter", name=f"sft{i}")
        load_adapter(model, d / f"{method}_adapter", name=f"r{i}")
    stacked = model(x)
    load_adapter(model, run_dir / "merged_adapters" / f"{UNIT}_merged", name="merged")
    with lora.active_adapters(model, ["merged"]):
        one = model(x)
    assert np.abs(np.array(stacked) - np.array(one)).max() < 1e-4


def test_refine_config_errors_are_one_line(tmp_path, tiny_demo_model):
    f = _cfg_file(tmp_path, tiny_demo_model, {"method": "grpo", "methods": {"no-such-topic": "dpo"}})
    with pytest.raises(ConfigError) as e:
        run_pipeline(load_pipeline_config(f), dry_run=True, echo=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and "key 'refine.methods.no-such-topic': no topic 'no-such-topic'" in msg
    assert not (tmp_path / "run").exists()
    for over, match in ((["refine.method=sppo"], r"refine\.method': 'sppo' is not one of"),
                        (["refine.methods.x=kto"], r"refine\.methods\.x': 'kto' is not one of"),
                        (["grpo.method=rloo"], r"grpo\.method': 'rloo' is set by refine\.method"),
                        (["refine.method=dpo", "dpo.num_layers=1"],
                         r"sft\.num_layers \(0\) and dpo\.num_layers \(1\) must match")):
        with pytest.raises(ConfigError, match=match) as e:
            load_pipeline_config(_cfg_file(tmp_path, tiny_demo_model, {}, "plain"), over)
        assert "\n" not in str(e.value)
    # through the CLI: one line, no traceback
    from mindprint_mlx.cli import cli

    out = CliRunner().invoke(cli, ["pipeline", "run", str(f), "--dry-run"])
    assert out.exit_code != 0 and "refine.methods.no-such-topic" in out.output
    assert "Traceback" not in out.output


def test_dry_run_plans_each_topic_method_and_its_peak(tmp_path, tiny_demo_model):
    f = _cfg_file(tmp_path, tiny_demo_model, {"method": "ditto", "methods": {KEYS[1]: "rloo"}})
    lines: list[str] = []
    res = run_pipeline(load_pipeline_config(f), dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert [p["refine_method"] for p in res.plan] == ["ditto", "rloo"]
    assert "DITTO if quiz < 1.00" in text and "RLOO if quiz < 1.00" in text
    assert set(res.estimate["memory_by_phase"]) == {"sft", "reward", "rloo", "ditto"}


def test_plan_cli_estimates_every_method(tmp_path, tiny_demo_model):
    """`mindprint plan --config` plans each refine method with its own section's settings,
    as the pipeline reads them (pipeline.plan.memory_settings)."""
    from mindprint_mlx import memory
    from mindprint_mlx.cli import cli
    from mindprint_mlx.pipeline.plan import memory_settings

    f = _cfg_file(tmp_path, tiny_demo_model, {"method": "grpo"})
    out = CliRunner().invoke(cli, ["plan", "--config", str(f)])
    assert out.exit_code == 0, out.output
    # by default the phases this run trains: its refine method (grpo), not the others
    assert "| grpo |" in out.output and "| dpo |" not in out.output
    out = CliRunner().invoke(cli, ["plan", "--config", str(f)] + [
        a for m in ("ppo", "grpo", "rloo", "dpo", "ditto") for a in ("--phase", m)])
    assert out.exit_code == 0, out.output
    cfg = load_pipeline_config(f)
    for m in ("ppo", "grpo", "rloo", "dpo", "ditto"):
        est = memory.estimate(tiny_demo_model, m, **memory_settings(cfg, m))
        assert f"| {m} |" in out.output and f"{m}: {memory.fmt_bytes(est.total)} " in out.output
    grpo = memory.estimate(tiny_demo_model, "grpo", **memory_settings(cfg, "grpo"))
    more = memory.estimate(tiny_demo_model, "grpo", **{**memory_settings(cfg, "grpo"), "group_size": 8})
    assert more.total > grpo.total            # k samples per prompt: more rows, more memory
