"""Data parallel on mx.distributed: two ranks on loopback (ring backend) take one averaged
step that equals the single-process step on the union batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from mindprint_mlx import distributed as dist
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.train.loop import gradient_checkpointing

HERE = Path(__file__).resolve().parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def _launcher() -> list[str]:
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [str(script)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; "
                                  "sys.argv[0] = 'mlx.launch'; sys.exit(main())"]


def _free_port_pair() -> int:
    """A port p with p and p+1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def test_single_process_world_and_helpers():
    rank, size, group = dist.world()
    assert (rank, size) == (0, 1) and group.size() == 1
    assert dist.is_main()
    items = list(range(11))
    shards = [dist.shard(items, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]              # equal steps on every rank
    assert sorted(sum(shards, [])) == list(range(9))           # disjoint, deterministic
    assert dist.shard(items, 1, 3) == shards[1]
    assert dist.shard(items) == items                          # one process: everything
    assert dist.shard_batch(8, 1, 2) == slice(4, 8)
    with pytest.raises(MindprintError, match="not divisible"):
        dist.shard_batch(5, 0, 2)
    g = {"a": mx.ones((2, 3)), "b": [mx.zeros(4)]}
    assert dist.average_gradients(g) is g
    assert dist.global_sum(mx.array(3.0)).item() == 3.0
    assert dist.token_loss_scale(mx.array(7.0)).item() == 7.0
    # the pipeline's helpers: on one process, rank 0's work is just done here
    assert dist.on_main(lambda: {"score": 0.5}) == {"score": 0.5}
    assert dist.fetch_dir("some/dir") == Path("some/dir")
    dist.check_all(lambda: None)
    with pytest.raises(MindprintError, match="^missing$"):
        dist.check_all(lambda: (_ for _ in ()).throw(MindprintError("missing")))


def test_grad_checkpoint_same_gradients(tiny_llama):
    """Checkpointed decoder layers give the same loss and LoRA gradients."""
    from mindprint_mlx.models import load, lora

    model, _ = load(tiny_llama)
    mx.random.seed(0)
    lora.apply_lora(model, "x", r=2)
    for _, m in lora.lora_layers(model):
        m.adapters["x"].lora_b = 0.1 * mx.random.normal(m.adapters["x"].lora_b.shape)
    tokens = mx.array([[5, 6, 7, 8, 9, 10, 11, 12]])

    def loss_fn(m):
        return nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).mean()

    vg = nn.value_and_grad(model, loss_fn)
    l0, g0 = vg(model)
    mx.eval(l0, g0)
    with gradient_checkpointing(model):
        l1, g1 = vg(model)
        mx.eval(l1, g1)
    assert abs(l0.item() - l1.item()) < 1e-6
    from mlx.utils import tree_flatten
    f0, f1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    assert f0.keys() == f1.keys() and f0
    assert max(mx.abs(f0[k] - f1[k]).max().item() for k in f0) < 1e-6


def _import_helper(name: str):
    sys.path.insert(0, str(HERE))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(HERE))


@pytest.fixture(scope="module")
def ring_run(tiny_llama, tmp_path_factory) -> Path:
    """One `mlx.launch --backend ring -n 2` on loopback for every test below: the bare
    averaged step (_dist_step.py into out/step), then the real SFT, reward and PPO trainers."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OPENBLAS_NUM_THREADS="1")   # two ranks share the cores
    extra = ["--env", "OPENBLAS_NUM_THREADS=1"]
    if sys.platform.startswith("linux") and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = ":".join(p for p in (OPENBLAS, env.get("LD_PRELOAD")) if p)
        extra += ["--env", f"LD_PRELOAD={env['LD_PRELOAD']}"]
    out = tmp_path_factory.mktemp("ring") / "dist"
    cmd = [*_launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()),
           *extra, "--", sys.executable, str(HERE / "_dist_train.py"), str(tiny_llama), str(out),
           "--with-step", "--with-ppo"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(HERE.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _max_diff(a: dict, b: dict, keys=None) -> float:
    assert a.keys() == b.keys() and a
    return max(mx.abs(a[k] - b[k]).max().item() for k in (keys or a))


def test_two_ranks_ring_equals_single_process(tiny_llama, tmp_path, ring_run):
    _dist_step = _import_helper("_dist_step")

    # The reference: one process, the whole batch.
    single = tmp_path / "single"
    _dist_step.main(str(tiny_llama), str(single), "sgd", 1)

    distdir = ring_run / "step"
    rep = json.loads((distdir / "report.json").read_text())
    ref = json.loads((single / "report.json").read_text())
    assert rep["size"] == 2 and ref["size"] == 1
    assert rep["global_tokens"] == ref["global_tokens"]
    assert abs(rep["losses"][0] - ref["losses"][0]) < 1e-5
    # gather_rows: every rank's rows in the order shard dealt them, padded to one width
    assert rep["gathered"] == [[0, -1, -1], [1, 1, -1], [2, -1, -1], [3, 3, -1]]
    assert ref["gathered"] == [[0, -1], [1, -1]]
    # Rank 0 alone wrote: exactly one adapter directory and no stray temporary files.
    assert sorted(p.name for p in distdir.iterdir()) == ["adapter", "grads.safetensors", "report.json",
                                                        "weighted_grads.safetensors"]

    for name in ("adapter/adapters.safetensors", "grads.safetensors", "weighted_grads.safetensors"):
        diff = _max_diff(mx.load(str(single / name)), mx.load(str(distdir / name)))
        assert diff < 1e-5, f"{name}: max abs diff {diff}"
    # The step moved the adapter (the comparison is not trivially between zeros).
    g = mx.load(str(single / "grads.safetensors"))
    assert max(mx.abs(v).max().item() for v in g.values()) > 1e-3


def test_two_ranks_train_sft_and_reward_like_one_process(tiny_llama, tmp_path, ring_run):
    """The real trainers under mlx.launch: 2 SFT steps (batch 4 = 2 rows per rank, then 3
    rows: one rank gets a masked filler row) and one reward epoch end with the adapters,
    optimizer moments and logged losses of a single process on the same data."""
    _dist_train = _import_helper("_dist_train")
    single = tmp_path / "single"
    _dist_train.main(str(tiny_llama), str(single), with_ppo=True)

    ranks = [json.loads((ring_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    ref = json.loads((single / "rank0.json").read_text())
    for r in ranks:
        for h in r["reward_history"]:
            h.pop("reward/epoch_seconds")
    # The ranks agree, PPO's adapter included.
    assert ranks[0]["size"] == 2 and ref["size"] == 1 and ranks[0] == ranks[1]
    assert ranks[0]["ppo"]["steps"] == 2 and ranks[0]["ppo"]["checksum"] > 0
    assert len((ring_run / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2
    assert ranks[0]["sft_steps"] == ref["sft_steps"] == 2
    for k in ("sft_train_loss", "sft_eval_loss", "sft_eval_loss_start", "reward_val_loss",
              "reward_val_accuracy"):
        assert abs(ranks[0][k] - ref[k]) < 1e-5 * max(1.0, abs(ref[k])), k

    for name in ("sft/adapter/adapters.safetensors", "reward/adapter/adapters.safetensors",
                 "ppo/ppo_adapter/adapters.safetensors", "ppo/ppo_adapter/heads.safetensors",
                 "grpo/grpo_adapter/adapters.safetensors"):
        a, b = mx.load(str(single / name)), mx.load(str(ring_run / name))
        # it trained: LoRA B starts at zero and is now non-zero
        assert max(mx.abs(v).max().item() for k, v in a.items() if not k.endswith("lora_a")) > 1e-4
        diff = _max_diff(a, b)
        # PPO and GRPO: the ranks sampled the single process's rollouts (each row its row of
        # the whole batch's noise), so the runs differ by float rounding alone (at learning
        # rate 1e-2: PPO 2.6e-7 over 4 updates, GRPO 1.5e-7, measured)
        assert diff < 1e-5, f"{name}: max abs diff {diff}"
    for k in ("scores", "grpo_scores"):
        assert ranks[0]["ppo"][k] == pytest.approx(ref["ppo"][k], rel=1e-5, abs=1e-6), k
    # Adam's moments are linear in the gradients: the averaged gradients match closely.
    for name in ("sft/checkpoint/optimizer.safetensors", "reward/checkpoint/optimizer.safetensors"):
        diff = _max_diff(mx.load(str(single / name)), mx.load(str(ring_run / name)))
        assert diff < 1e-6, f"{name}: max abs diff {diff}"
    ha = mx.load(str(single / "reward/adapter/heads.safetensors"))
    hb = mx.load(str(ring_run / "reward/adapter/heads.safetensors"))
    assert _max_diff(ha, hb, ["reward.summary.weight"]) < 1e-5
    # The reward head has no bias (Bradley-Terry cannot train one), so none can drift.
    assert "reward.summary.bias" not in ha and "reward.summary.bias" not in hb

    # Rank 0 alone wrote the trainers' files: metrics lines once, no stray temp files.
    for phase in ("sft", "reward"):
        a = (single / phase / "metrics.jsonl").read_text().splitlines()
        b = (ring_run / phase / "metrics.jsonl").read_text().splitlines()
        assert len(a) == len(b) > 0
        names = sorted(p.relative_to(ring_run / phase).as_posix() for p in (ring_run / phase).rglob("*"))
        assert names == sorted(p.relative_to(single / phase).as_posix()
                               for p in (single / phase).rglob("*"))
