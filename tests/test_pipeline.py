"""The curriculum pipeline on a tiny model: 1 unit, 2 topics, very few steps.

One run is interrupted twice (Ctrl-C after the first SFT, SIGKILL during PPO) and resumed;
it must end with every topic done and every artefact in its place in the run directory.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.pipeline import ResumeError, load_pipeline_config, run_pipeline

UNIT = "unit-1-foundations"
CHAPTER = "chapter-1-nature-of-cycles"
TOPICS = ["cycle-phases", "drivers-of-cycles"]
SKIPPED = "one-example"


def _small_data(dst: Path) -> Path:
    """The demo curriculum's first chapter: one unit, two topics."""
    dst.mkdir(parents=True)
    for f in DEMO_CURRICULUM_DIR.iterdir():
        if f.suffix == ".jsonl":
            keep = [line for line in f.read_text().splitlines()
                    if line.strip() and json.loads(line).get("chapter") == CHAPTER]
            if f.name == "sft_data.jsonl":   # a topic with too little data: skipped, with the reason
                keep.append(json.dumps({"unit": UNIT, "chapter": CHAPTER, "topic": SKIPPED,
                                        "prompt": "Is one example enough?", "completion": "No."}))
            if f.name == "quiz_data.jsonl":
                keep.append(json.dumps({"unit": UNIT, "chapter": CHAPTER, "topic": SKIPPED,
                                        "question": "Enough?", "reference_answer": "No."}))
            (dst / f.name).write_text("\n".join(keep) + "\n")
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _config(model: Path, data: Path, run_dir: Path) -> dict:
    return {
        "model": str(model), "data_dir": str(data), "run_dir": str(run_dir), "seed": 0,
        # (1 epoch on 16 pairs: at chance; the run goes on to PPO all the same)
        "reward": {"train": {"lora_rank": 2, "lora_alpha": 4.0, "epochs": 1, "batch_size": 8,
                             "max_seq_length": 96, "compile": False}, "continue_at_chance": True,
                   "contrast_samples": 1},
        "sft": {"lora_rank": 2, "lora_alpha": 4.0, "max_seq_length": 96, "compile": False},
        "ppo": {"steps": 3, "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1,
                "max_new_tokens": 8, "save_every": 1, "progress": False, "learning_rate": 1e-3},
        # a threshold no answer reaches: PPO runs on both topics
        "adaptive": {"min_epochs": 1, "max_epochs": 1, "min_pass_threshold": 1.0,
                     "max_pass_threshold": 1.0},
        "eval": {"max_tokens": 8, "max_questions": 2},
    }


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    """Tests that stop a run in process (request_stop) leave no stop request behind."""
    from mindprint_mlx.stop import clear_stop

    clear_stop()
    yield
    clear_stop()


@pytest.fixture()
def setup(tmp_path, tiny_demo_model):
    data = _small_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(yaml.safe_dump(_config(tiny_demo_model, data, run_dir)))
    return cfg_file, data, run_dir


def _cli(*args) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "mindprint_mlx.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _wait_for(proc, cond, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_dry_run_prints_the_plan_and_trains_nothing(setup, capsys):
    cfg_file, data, run_dir = setup
    cfg = load_pipeline_config(cfg_file)
    lines = []
    res = run_pipeline(cfg, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert res.status == "dry run"
    assert [p["topic"] for p in res.plan] == TOPICS + [SKIPPED]
    assert all(p["plan"]["sft_epochs"] == 1 and p["plan"]["pass_threshold"] == 1.0 for p in res.plan)
    assert [p["plan"]["trainable"] for p in res.plan] == [True, True, False]
    assert "SKIP: " in text and "1 SFT example (need at least 2)" in text
    for t in TOPICS:
        assert f"{UNIT}/{CHAPTER}/{t}" in text
    assert "sft_epochs=1" in text and "pass_threshold=1" in text      # every decision with its reason
    assert "peak memory" in text and "time ~" in text
    assert not run_dir.exists()


def test_dry_run_estimate_counts_the_contrast_sampling(setup):
    """reward.contrast_samples base-model answers per person-written answer are generated
    before the reward model trains: the estimate counts them (and the pairs they add)."""
    cfg_file, _, run_dir = setup
    d = yaml.safe_load(cfg_file.read_text())
    runs = {}
    for n in (0, 4):
        d.setdefault("reward", {})["contrast_samples"] = n
        cfg_file.write_text(yaml.safe_dump(d))
        lines = []
        runs[n] = (run_pipeline(load_pipeline_config(cfg_file), dry_run=True,
                                echo=lines.append).estimate, "\n".join(lines))
    (none, text0), (four, text4) = runs[0], runs[4]
    assert none["contrast_seconds"] == 0 and "contrast samples" not in text0
    assert four["contrast_seconds"] > 0 and "its contrast samples" in text4
    assert four["reward_seconds"] > none["reward_seconds"]
    assert four["total_seconds"] == pytest.approx(
        none["total_seconds"] + four["contrast_seconds"]
        + four["reward_seconds"] - none["reward_seconds"])
    # reward.labels.judge: the sampler's SFT, its answers and the pairs they add
    lines = []
    lab = run_pipeline(load_pipeline_config(cfg_file, ["reward.labels.judge=x.py:f"]), dry_run=True,
                       echo=lines.append).estimate
    assert four["labels_seconds"] == 0 and lab["labels_seconds"] > 0
    assert "the labels' SFT policy and samples" in "\n".join(lines)
    assert lab["total_seconds"] > four["total_seconds"] + lab["labels_seconds"]
    assert not run_dir.exists()


def test_unknown_key_is_an_error_naming_key_and_file(setup):
    cfg_file, _, _ = setup
    d = yaml.safe_load(cfg_file.read_text())
    d["ppo"]["stpes"] = 3
    cfg_file.write_text(yaml.safe_dump(d))
    with pytest.raises(MindprintError, match=r"pipeline.yaml.*ppo\.stpes.*did you mean 'steps'"):
        load_pipeline_config(cfg_file)


def test_interrupted_and_killed_run_resumes_to_the_same_result(setup):
    cfg_file, data, run_dir = setup
    planned = run_pipeline(load_pipeline_config(cfg_file), dry_run=True, echo=lambda s: None).plan
    # 1. Ctrl-C once the first topic's SFT is done: the run stops cleanly, state saved.
    p = _cli("pipeline", "run", str(cfg_file))
    first = f"{UNIT}/{CHAPTER}/{TOPICS[0]}"
    assert _wait_for(p, lambda: "sft" in _state(run_dir).get("topics", {}).get(first, {}).get("phases", {})), \
        p.communicate()[0]
    os.killpg(p.pid, signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out
    st = _state(run_dir)
    assert st["stopped"] == "interrupted" and not st["finished"]

    # 2. Resume, then SIGKILL in the middle of PPO (a PPO checkpoint exists, PPO not done).
    p = _cli("pipeline", "run", str(cfg_file), "--resume")
    assert _wait_for(p, lambda: any((run_dir / "work").glob("**/ppo/checkpoint"))), p.communicate()[0]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not _state(run_dir).get("finished")

    # 3. Resume to the end (in process).
    cfg = load_pipeline_config(cfg_file)
    res = run_pipeline(cfg, resume=True, echo=lambda s: None)
    assert res.status == "finished"
    st = json.loads((run_dir / "state.json").read_text())
    assert st["finished"]
    for t in TOPICS:
        key = f"{UNIT}/{CHAPTER}/{t}"
        phases = st["topics"][key]["phases"]
        assert {"sft", "quiz", "ppo", "final"} <= set(phases)
        assert phases["ppo"]["steps"] == 3
        for ph in ("sft", "ppo"):
            a = run_dir / "adapters" / UNIT / CHAPTER / t / f"{ph}_adapter"
            assert phases[ph]["adapter"] == str(a.relative_to(run_dir))
            assert (a / "adapters.safetensors").is_file() and (a / "adapter_config.json").is_file()
        assert (run_dir / phases["ppo"]["adapter"] / "heads.safetensors").is_file()   # PPO's value head
        assert 0.0 <= phases["final"]["score"] <= 1.0
    skipped = st["topics"][f"{UNIT}/{CHAPTER}/{SKIPPED}"]["phases"]
    assert set(skipped) == {"skip"} and "need at least 2" in skipped["skip"]["reason"]
    assert not (run_dir / "adapters" / UNIT / CHAPTER / SKIPPED).exists()
    merged = run_dir / "merged_adapters" / f"{UNIT}_merged"
    assert (merged / "adapters.safetensors").is_file()
    assert st["units"][UNIT]["done"] and len(st["units"][UNIT]["verify"]) == 2
    assert (run_dir / "reward_model" / "adapter" / "heads.safetensors").is_file()
    # reward.contrast_samples 1: the person's answers (17 SFT answers and the reward half's
    # chosen ones) each over one base-model sample, on top of the reward half of the 20 pairs
    rm = st["reward_model"]
    assert 0 < rm["contrast_pairs"] <= 27 and rm["pairs"] == 10 + rm["contrast_pairs"]
    assert (run_dir / "final_adapter" / "adapter_config.json").is_file()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["plan"] == planned == st["plan"]          # the dry run's plan is what ran
    assert run["seed"] == 0 and "mlx" in run["versions"] and "sft_data.jsonl" in run["data_hashes"]
    report = (run_dir / "report.md").read_text()
    # the headline grades the final adapter as saved, on every trained topic
    fin = st["final_eval"]
    assert sorted(fin) == sorted(f"{UNIT}/{CHAPTER}/{t}" for t in TOPICS)
    # the threshold is 1.0 and no answer of the tiny model is perfect: every topic fails,
    # its own final quiz as much as the final adapter's
    for key, v in fin.items():
        assert 0.0 <= v["score"] < 1.0 and v["passed"] is False
        assert st["topics"][key]["phases"]["final"]["passed"] is False
    assert "Pass rate of the final adapter: 0/2 = 0% of trained topics (1 skipped, 0 not run yet)." in report
    # the retention matrix: a row after each topic; the final adapter (one unit: the same
    # weights as the last row) scores what the last row scored
    ret = st["retention"]
    keys = [f"{UNIT}/{CHAPTER}/{t}" for t in TOPICS]
    assert ret["order"] == keys and list(ret["rows"]) == keys
    assert set(ret["rows"][keys[0]]) == {keys[0]} and set(ret["rows"][keys[1]]) == set(keys)
    assert ret["final"] == pytest.approx(ret["rows"][keys[1]], abs=1e-6)
    assert ret["metrics"]["average"] == pytest.approx(sum(ret["final"].values()) / 2)
    assert "## Retention" in report and "| final adapter |" in report
    assert all(t in report for t in TOPICS) and "| skipped |" in report
    assert "sft_epochs=1" in report and "PPO: 3 steps" in report
    assert any((run_dir / "metrics").glob("ppo-*.jsonl")) and any((run_dir / "metrics").glob("*.csv"))
    assert any((run_dir / "plots").glob("*.png"))
    from mindprint_mlx.io import topic_slug
    for t in TOPICS:   # metric and plot names carry a hash of the topic key (no collisions)
        slug = topic_slug(f"{UNIT}/{CHAPTER}/{t}", f"{UNIT}/{CHAPTER}/{t}")
        assert (run_dir / "metrics" / f"sft-{slug}.jsonl").is_file()
        assert (run_dir / "plots" / f"sft-{slug}.png").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    if umask == 0o022:   # under the usual umask every output is 0644 / 0755
        for p in [run_dir, *run_dir.rglob("*")]:
            assert oct(p.stat().st_mode & 0o777) == oct(0o755 if p.is_dir() else 0o644), p
    assert not list(run_dir.rglob(".*.tmp"))            # no half-written file left behind

    # The merged unit adapter is exactly both topics' sft + ppo adapters stacked.
    from mindprint_mlx.models import load, lora
    from mindprint_mlx.models.adapters import load_adapter

    model, tok = load(cfg.model)
    x = mx.array([tok.apply_chat_template([{"role": "user", "content": "What is a cycle?"}],
                                          add_generation_prompt=True)])
    names = [load_adapter(model, run_dir / "adapters" / UNIT / CHAPTER / t / f"{ph}_adapter",
                          name=f"{ph}{i}") for i, t in enumerate(TOPICS) for ph in ("sft", "ppo")]
    stacked = model(x)
    load_adapter(model, merged, name="merged")
    with lora.active_adapters(model, ["merged"]):
        one = model(x)
    assert np.abs(np.array(stacked) - np.array(one)).max() < 1e-4

    # Resuming with a changed config or data is refused, naming what changed.
    with pytest.raises(ResumeError, match=r"ppo\.steps: 3 -> 4"):
        run_pipeline(load_pipeline_config(cfg_file, ["ppo.steps=4"]), resume=True)
    with open(data / "quiz_data.jsonl", "a") as f:
        f.write(json.dumps({"unit": UNIT, "chapter": CHAPTER, "topic": TOPICS[0],
                            "question": "Why wait?", "reference_answer": "Patience."}) + "\n")
    with pytest.raises(ResumeError, match=r"quiz_data\.jsonl changed"):
        run_pipeline(load_pipeline_config(cfg_file), resume=True)
    # And a finished run_dir is not silently overwritten.
    with pytest.raises(MindprintError, match="--resume"):
        run_pipeline(load_pipeline_config(cfg_file))


def _files(d: Path, pattern: str) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.glob(pattern)) if p.is_file()}


def test_a_run_stopped_between_sft_and_ppo_resumes_to_the_same_bits(setup, tmp_path):
    """PPO's LoRA and value head come from ppo.seed, not from the global random state that
    the phases before it (run or skipped on resume) leave behind."""
    from mindprint_mlx.stop import request_stop

    cfg_file, _, run_dir = setup
    whole = run_pipeline(load_pipeline_config(cfg_file, [f"run_dir={tmp_path / 'whole'}"]),
                         echo=lambda s: None)
    assert whole.status == "finished"

    def stop_after_the_first_quiz(line: str) -> None:
        if line.startswith(f"[{UNIT}/{CHAPTER}/{TOPICS[0]}] quiz "):
            request_stop()         # what the first Ctrl-C does: stop after this phase
    cut = run_pipeline(load_pipeline_config(cfg_file), echo=stop_after_the_first_quiz)
    assert cut.status == "interrupted"
    phases = cut.state["topics"][f"{UNIT}/{CHAPTER}/{TOPICS[0]}"]["phases"]
    assert "sft" in phases and "quiz" in phases and "ppo" not in phases
    # ... and as if killed inside a directory replace (destination moved aside, the new one
    # still under its temporary name) and while writing a file: --resume repairs both.
    rm_adapter = run_dir / "reward_model" / "adapter"
    os.replace(rm_adapter, rm_adapter.with_name(".adapter.old"))
    (rm_adapter.with_name(".adapter.k3j.tmp")).mkdir()
    (run_dir / ".state.json.x9.tmp").write_text("{")
    lines: list[str] = []
    res = run_pipeline(load_pipeline_config(cfg_file), resume=True, echo=lines.append)
    assert res.status == "finished"
    assert "resume: restored reward_model/adapter (a replace was cut short)" in lines
    assert "resume: removed .state.json.x9.tmp" in lines
    assert any(line.startswith("reward model: done") for line in lines)   # not retrained
    assert not list(run_dir.rglob(".*.tmp")) and not list(run_dir.rglob(".*.old"))
    for pattern in ("adapters/**/*.safetensors", "merged_adapters/**/*.safetensors",
                    "final_adapter/*.safetensors"):
        want, got = _files(whole.run_dir, pattern), _files(run_dir, pattern)
        assert want and want == got, pattern
    for t in TOPICS:
        key = f"{UNIT}/{CHAPTER}/{t}"
        assert res.state["topics"][key]["phases"]["final"]["score"] == \
            whole.state["topics"][key]["phases"]["final"]["score"]


def test_guards_stop_the_run_before_harm(setup):
    """LoRA settings that do not fit the model fail before anything trains; a reward model at
    chance stops the run before PPO (reward.continue_at_chance, free to change on resume,
    goes on); a learning rate of 1000 is reported as diverged, not finished."""
    from mindprint_mlx.guards import DivergedError

    cfg_file, _, run_dir = setup
    with pytest.raises(MindprintError, match=r"sft\.lora_targets: LoRA target 'o_prj' matches no"):
        run_pipeline(load_pipeline_config(cfg_file, ["sft.lora_targets=[o_prj]",
                                                     "ppo.lora_targets=[o_prj]"]), echo=lambda s: None)
    with pytest.raises(MindprintError, match=r"sft\.num_layers=9, but the model has 2 decoder layers"):
        run_pipeline(load_pipeline_config(cfg_file, ["sft.num_layers=9", "ppo.num_layers=9"]),
                     echo=lambda s: None)
    assert not (run_dir / "reward_model").exists()           # nothing trained

    at_chance = ["reward.continue_at_chance=false"]
    res = run_pipeline(load_pipeline_config(cfg_file, at_chance), echo=lambda s: None)
    assert re.match(r"stopped: the reward model's validation accuracy is 0\.[0-5]\d* \(chance: 0\.5\)",
                    res.status), res.status
    assert not res.state["topics"].get(f"{UNIT}/{CHAPTER}/{TOPICS[0]}", {}).get("phases")
    from mindprint_mlx.stop import request_stop

    def stop_at_the_first_quiz(line: str) -> None:
        lines.append(line)
        if "] quiz " in line:
            request_stop()
    lines: list[str] = []
    res = run_pipeline(load_pipeline_config(cfg_file, ["reward.continue_at_chance=true"]),
                       resume=True, echo=stop_at_the_first_quiz)
    assert res.status == "interrupted" and "reward model: done" in "\n".join(lines)
    assert f"[{UNIT}/{CHAPTER}/{TOPICS[0]}] SFT on" in "\n".join(lines)   # past the gate

    other = str(run_dir) + "-lr1000"
    with pytest.raises(DivergedError, match=r"sft: training diverged \(the trainable weights' norm "
                       r"grew from .* at step 1 .*no checkpoint had been written yet"):
        run_pipeline(load_pipeline_config(cfg_file, ["sft.learning_rate=1000", f"run_dir={other}"]),
                     echo=lambda s: None)
    st = _state(Path(other))
    assert st["stopped"].startswith("failed: DivergedError") and not st["finished"]
    assert not list(Path(other).glob("adapters/**/*.safetensors"))


def test_two_runs_on_one_run_dir(setup):
    """A run holds run_dir/.lock: a concurrent --resume is refused naming it; once the holder
    is killed, the next run takes the lock over with a note."""
    from mindprint_mlx.stop import request_stop

    cfg_file, _, run_dir = setup
    first = _cli("pipeline", "run", str(cfg_file))
    try:
        assert _wait_for(first, lambda: (run_dir / "state.json").exists()), first.communicate()[0]
        second = _cli("pipeline", "run", str(cfg_file), "--resume")
        out = second.communicate(timeout=120)[0]
        assert second.returncode == 1, out
        assert f"is in use by another mindprint run (pid {first.pid} on " in out and "Traceback" not in out
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    lines: list[str] = []

    def stop_at_the_first_quiz(line: str) -> None:
        lines.append(line)
        if "] quiz " in line:
            request_stop()
    res = run_pipeline(load_pipeline_config(cfg_file), resume=True, echo=stop_at_the_first_quiz)
    assert res.status == "interrupted"
    assert any(f"took over the lock of {run_dir} from pid {first.pid}" in x for x in lines), lines
    assert not (run_dir / ".lock").exists()


def test_labels_on_the_policys_answers_train_the_reward_model(setup, tmp_path):
    """reward.labels.judge: an SFT policy's answers to the practice prompts, ranked by the
    judge, become preference pairs the reward model (not the judge of the quiz) trains on,
    written to labels/labels.jsonl and read back when a stopped run resumes; then
    `mindprint label` ranks the finished run's own answers, by a judge or by a person."""
    from click.testing import CliRunner

    from mindprint_mlx.cli import cli
    from mindprint_mlx.data import load_records_file
    from mindprint_mlx.stop import request_stop

    cfg_file, _, run_dir = setup
    judge = tmp_path / "judge.py"
    judge.write_text("def distinct_words(prompt, answer):\n"
                     "    return min(1.0, len(set(answer.split())) / 8)\n")
    over = [f"reward.labels.judge={judge}:distinct_words", "reward.labels.samples=3", "run_ppo=false"]
    lines: list[str] = []

    def stop_once_labelled(line: str) -> None:
        lines.append(line)
        if re.match(r"labels: \d+ pairs from", line):
            request_stop()          # the reward model's training sees it and stops
    res = run_pipeline(load_pipeline_config(cfg_file, over), echo=stop_once_labelled)
    assert res.status == "interrupted", res.status
    lab = _state(run_dir)["labels"]
    # 12 practice prompts in the chapter, 3 answers each: at most 3 pairs a prompt
    assert lab["prompts"] == 12 and lab["answers"] == 36 and 0 < lab["pairs"] <= 36
    recs = load_records_file("preference", run_dir / lab["file"])
    assert len(recs) == lab["pairs"] and {r.topic for r in recs} <= set(TOPICS)
    assert not (run_dir / "work" / "label_sampler").exists()

    lines.clear()
    res = run_pipeline(load_pipeline_config(cfg_file, over), resume=True, echo=lines.append)
    assert res.status == "finished"
    assert f"labels: done ({lab['pairs']} pairs, labels/labels.jsonl)" in lines
    rm = res.state["reward_model"]
    assert rm["labelled_pairs"] == lab["pairs"] and rm["pairs"] == 10 + rm["contrast_pairs"] + lab["pairs"]
    assert res.state["judge_model"]["pairs"] == 10          # the quiz's judge: its half alone

    runner = CliRunner()
    out = tmp_path / "mine.jsonl"
    r = runner.invoke(cli, ["label", str(run_dir), "--out", str(out), "--judge",
                            f"{judge}:distinct_words", "--samples", "3", "--limit", "2"])
    assert r.exit_code == 0, r.output
    first = load_records_file("preference", out)
    assert "2 prompts to label" in r.output and len(first) <= 6
    # a person: answer 1 over 2, then a tie (no pair), then quit; prompts already labelled
    # (the judge's two, where it found a pair) are not asked again
    mine = tmp_path / "person.jsonl"
    r = runner.invoke(cli, ["label", str(run_dir), "--out", str(mine)], input="1\nt\nq\n")
    assert r.exit_code == 0, r.output
    (rec,) = load_records_file("preference", mine)
    shown = re.findall(r"^  1\) (.*)$", r.output, flags=re.M)
    assert rec.chosen.strip() == shown[0] and "which sounds more like you?" in r.output
    r = runner.invoke(cli, ["label", str(run_dir), "--out", str(mine), "--limit", "1"], input="q\n")
    assert r.exit_code == 0 and f"[1/1] {rec.topic}: " in r.output
    asked = re.search(r"\[1/1\] [\w-]+: (.*)", r.output).group(1)
    assert asked != rec.prompt[-1]["content"]               # the labelled prompt is done
    r = runner.invoke(cli, ["label", str(tmp_path)])
    assert r.exit_code == 1 and "not a pipeline run directory" in r.output
