"""The whole pipeline under `mlx.launch --backend ring -n 2` on loopback equals one process.

One launch (tests/_dist_pipeline.py) runs three pipelines, each stopped by rank 0 alone
(the ranks agree on the stop) and resumed (rank 0 reads state.json and sends the other rank
its state and the adapters it saved; rank 1's run_dir does not exist, and stays so); each
ends with the state.json and the files of the same script run as one process:
1. the tiny 1-unit, 2-topic curriculum without PPO, stopped after its first topic:
   state.json's numbers (reward model, SFT, quizzes, verify, retention, final_eval) and
   every saved adapter equal the single-process run's, to float32 rounding;
2. one topic with PPO and merge.mode svd, on the reward model and judge of run 1
   (reward.path, eval.judge), stopped after the topic: PPO's rollouts are the single
   process's (each rank samples its rows of the whole batch), so this equals one process too;
3. two units of one topic each (PPO on both) with merge.mode fold_into_base, stopped after
   the first unit was folded: rank 0 writes the folded checkpoint, rank 1 takes its weights
   over the collective, in the run and again on resume, and unit 2 trains on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from test_distributed import OPENBLAS, _free_port_pair, _import_helper, _launcher
from test_merge import TOPICS as FOLD_TOPICS, _two_units
from test_pipeline import CHAPTER, TOPICS, UNIT, _config, _small_data

HERE = Path(__file__).resolve().parent
KEYS = [f"{UNIT}/{CHAPTER}/{t}" for t in TOPICS]
TIMES = ("started", "updated", "wall_seconds")


def _close(a, b, path: str = "state") -> None:
    """a == b, floats to float32 rounding; timestamps skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        ka = {k for k in a if k not in TIMES and not (k == "finished" and isinstance(a[k], float))}
        kb = {k for k in b if k not in TIMES and not (k == "finished" and isinstance(b[k], float))}
        assert ka == kb, f"{path}: keys {sorted(ka ^ kb)}"
        for k in ka:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def runs(tiny_demo_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-dist")
    data = _small_data(root / "data")
    cfg = _config(tiny_demo_model, data, root / "unused")
    cfg["run_ppo"] = False
    cfg_file = root / "pipeline.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    dist_run = root / "dist"
    scorers = {"reward": {"path": str(dist_run / "reward_model" / "adapter")},
               "eval": {"judge": str(dist_run / "judge_model" / "adapter")}}
    ppo_run = {"run_ppo": True, "topics": [TOPICS[0]], "ppo": {"steps": 1},
               "merge": {"mode": "svd", "rank": 2}, **scorers}
    fold_run = {"run_ppo": True, "data_dir": str(_two_units(root / "data-2units")),
                "ppo": {"steps": 1}, "merge": {"mode": "fold_into_base"}, **scorers,
                "_stop_on": f"[unit {next(iter(FOLD_TOPICS))}] merged"}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))   # two ranks share the cores
    extra = ["--env", "OPENBLAS_NUM_THREADS=1", "--env", f"PYTHONPATH={HERE.parent}"]
    if sys.platform.startswith("linux") and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = ":".join(p for p in (OPENBLAS, env.get("LD_PRELOAD")) if p)
        extra += ["--env", f"LD_PRELOAD={env['LD_PRELOAD']}"]
    cmd = [*_launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()),
           *extra, "--", sys.executable, str(HERE / "_dist_pipeline.py"), str(cfg_file),
           str(root / "out"), json.dumps([{"run_dir": str(dist_run)},
                                          {**ppo_run, "run_dir": str(root / "dist-ppo")},
                                          {**fold_run, "run_dir": str(root / "dist-fold")}])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(HERE.parent))
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    # (mlx.launch exits 0 even when a rank failed: every rank's report must be there)
    assert proc.returncode == 0 and (root / "out" / "rank1-1.json").is_file(), log
    # The reference: the same script as one process, the same stops and resumes.
    _import_helper("_dist_pipeline").main(str(cfg_file), str(root / "out-single"), [
        {"run_dir": str(root / "single")}, {**ppo_run, "run_dir": str(root / "single-ppo")},
        {**fold_run, "run_dir": str(root / "single-fold")}])
    out = {name: json.loads((root / d / f"rank{r}-{i}.json").read_text())
           for name, d, r, i in [("single", "out-single", 0, 0), ("rank0", "out", 0, 0),
                                 ("rank1", "out", 1, 0), ("ppo0", "out", 0, 1), ("ppo1", "out", 1, 1),
                                 ("single-ppo", "out-single", 0, 1), ("fold0", "out", 0, 2),
                                 ("fold1", "out", 1, 2), ("single-fold", "out-single", 0, 2)]}
    return root, out


def _same_files(a: Path, b: Path) -> float:
    """a and b hold the same files; the largest abs difference of their weights (adapters,
    heads, optimizer states, folded checkpoints)."""
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    diff = 0.0
    for f in files:
        if f.endswith(".safetensors"):
            x, y = mx.load(str(a / f)), mx.load(str(b / f))
            assert x.keys() == y.keys() and x, f
            diff = max(diff, max(mx.abs(x[k].astype(mx.float32) - y[k].astype(mx.float32)).max().item()
                                 for k in x))
    return diff


def test_two_ranks_run_the_pipeline_like_one_process(runs):
    root, out = runs
    single, rank0, rank1 = out["single"], out["rank0"], out["rank1"]
    assert single["size"] == 1 and rank0["size"] == rank1["size"] == 2
    for r in (single, rank0, rank1):
        assert r["statuses"] == ["interrupted", "finished"]
    disk = json.loads((root / "dist" / "state.json").read_text())
    st = single["state"]
    assert st["finished"] and set(st["final_eval"]) == set(KEYS)
    # rank 0 wrote state.json; rank 1 ended with the same state, in memory only
    _close(disk, rank0["state"])
    _close(rank0["state"], rank1["state"])
    # ... and it is the single process's: every score, loss and decision
    _close(st, disk)
    assert disk["topics"][KEYS[1]]["phases"]["sft"]["replay_per_epoch"] > 0
    assert disk["retention"]["rows"][KEYS[1]] and disk["units"][UNIT]["verify"]
    # one run printed its lines once (rank 0), the other rank nothing
    assert rank1["lines"] == [] and any("] final " in x for x in rank0["lines"])
    assert any(x.startswith("reward model: done") for x in rank0["lines"])   # resumed, not retrained

    # The same files, and the saved weights equal to float32 rounding (the ranks sum
    # their halves of every batch in another order than one process does).
    assert _same_files(root / "single", root / "dist") < 1e-6
    weights = sorted((root / "single").rglob("adapters.safetensors"))
    assert len(weights) == 6          # reward, judge, 2 x sft, merged, final
    for f in weights:
        if "sft_adapter" in str(f):   # it trained: LoRA B starts at zero
            assert max(mx.abs(v).max().item() for k, v in mx.load(str(f)).items()
                       if k.endswith("lora_b")) > 1e-4


def test_two_ranks_run_ppo_like_one_process(runs):
    """PPO's rollouts are the single process's (each rank samples its rows of the whole
    batch, with the batch's noise): every score, loss and decision, and the adapters, equal
    one process's (adapters and value head to 6.4e-8, measured)."""
    root, out = runs
    a, b = out["ppo0"], out["ppo1"]
    assert a["statuses"] == b["statuses"] == out["single-ppo"]["statuses"] == ["interrupted", "finished"]
    _close(a["state"], b["state"])
    _close(json.loads((root / "dist-ppo" / "state.json").read_text()), a["state"])
    _close(out["single-ppo"]["state"], a["state"])
    assert _same_files(root / "single-ppo", root / "dist-ppo") < 1e-6
    ppo = a["state"]["topics"][KEYS[0]]["phases"]["ppo"]
    assert ppo["steps"] == 1 and not ppo.get("skipped")
    assert a["state"]["reward_model"]["reused"] and a["state"]["judge_model"]["reused"]
    assert a["state"]["units"][UNIT]["svd"]["rank"] == 2 and a["state"]["final_merge"]["mode"] == "svd"
    assert (root / "dist-ppo" / ppo["adapter"] / "heads.safetensors").is_file()
    assert (root / "dist-ppo" / "final_adapter" / "adapters.safetensors").is_file()
    assert not list(root.rglob(".*.tmp"))           # no half-written file left behind


def test_two_ranks_fold_into_base_like_one_process(runs):
    """merge.mode fold_into_base under mlx.launch: rank 0 wrote folded_base/unit-0, rank 1
    trained unit 2 on its weights (sent over the collective, in the run and on resume):
    the same state, folded checkpoint and adapters as one process (3e-8, measured)."""
    root, out = runs
    a, b, single = out["fold0"], out["fold1"], out["single-fold"]
    assert a["statuses"] == b["statuses"] == single["statuses"] == ["interrupted", "finished"]
    _close(a["state"], b["state"])
    _close(json.loads((root / "dist-fold" / "state.json").read_text()), a["state"])
    _close(single["state"], a["state"])
    first, second = FOLD_TOPICS
    assert a["state"]["units"][first]["folded_base"] == "folded_base/unit-0"
    assert a["state"]["final_merge"]["folded_base"] == "folded_base/unit-0"
    assert (root / "dist-fold" / "folded_base" / "unit-0" / "model.safetensors").is_file()
    assert all(t["phases"]["ppo"]["steps"] == 1 for t in a["state"]["topics"].values())
    # the cut came after unit 1's fold: the resumed session loaded the folded base again
    cut = next(i for i, x in enumerate(a["lines"]) if x.startswith("interrupted"))
    assert any("folded into the base" in x for x in a["lines"][:cut])
    assert not any("folded into the base" in x for x in a["lines"][cut:])
    assert _same_files(root / "single-fold", root / "dist-fold") < 1e-6


def test_the_other_rank_never_touches_run_dir(runs):
    """Rank 1 was given a run_dir that does not exist (as on a second Mac without a copy of
    the run): it trained, resumed and finished on what rank 0 sent it alone."""
    root, out = runs
    for name in ("rank1", "ppo1", "fold1"):
        assert out[name]["statuses"] == ["interrupted", "finished"], name
    assert not list(root.glob("*.rank1"))


def test_an_error_on_rank_0_stops_every_rank_with_its_line(runs):
    root, _ = runs
    r0, r1 = (json.loads((root / "out" / f"rank{r}-refused.json").read_text()) for r in (0, 1))
    assert "already holds a run (state.json); pass --resume" in r0
    assert r1 == f"rank 0 failed: {r0}"
