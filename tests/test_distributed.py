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
    assert dist.rank_seed(5) == 5 and dist.rank_seed(5, 1) != dist.rank_seed(5, 0)
    g = {"a": mx.ones((2, 3)), "b": [mx.zeros(4)]}
    assert dist.average_gradients(g) is g
    assert dist.global_sum(mx.array(3.0)).item() == 3.0
    assert dist.token_loss_scale(mx.array(7.0)).item() == 7.0


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
    try:
        assert dist.checkpoint_layers(model, True)
        l1, g1 = vg(model)
        mx.eval(l1, g1)
    finally:
        dist.checkpoint_layers(model, False)
    assert abs(l0.item() - l1.item()) < 1e-6
    from mlx.utils import tree_flatten
    f0, f1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    assert f0.keys() == f1.keys() and f0
    assert max(mx.abs(f0[k] - f1[k]).max().item() for k in f0) < 1e-6


def test_two_ranks_ring_equals_single_process(tiny_llama, tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import _dist_step
    finally:
        sys.path.remove(str(HERE))

    # The reference: one process, the whole batch.
    single = tmp_path / "single"
    _dist_step.main(str(tiny_llama), str(single), "sgd", 1)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    extra = []
    if sys.platform.startswith("linux") and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = ":".join(p for p in (OPENBLAS, env.get("LD_PRELOAD")) if p)
        extra = ["--env", f"LD_PRELOAD={env['LD_PRELOAD']}"]
    distdir = tmp_path / "dist"
    cmd = [*_launcher(), "--backend", "ring", "-n", "2", "--starting-port", str(_free_port_pair()),
           *extra, "--", sys.executable, str(HERE / "_dist_step.py"), str(tiny_llama),
           str(distdir), "sgd", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                          cwd=str(HERE.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rep = json.loads((distdir / "report.json").read_text())
    ref = json.loads((single / "report.json").read_text())
    assert rep["size"] == 2 and ref["size"] == 1
    assert rep["global_tokens"] == ref["global_tokens"]
    assert len(set(rep["seeds"])) == 2                          # sampling seeds differ per rank
    assert abs(rep["losses"][0] - ref["losses"][0]) < 1e-5
    # Rank 0 alone wrote: exactly one adapter directory and no stray temporary files.
    assert sorted(p.name for p in distdir.iterdir()) == ["adapter", "grads.safetensors", "report.json",
                                                        "weighted_grads.safetensors"]

    for name in ("adapter/adapters.safetensors", "grads.safetensors", "weighted_grads.safetensors"):
        a, b = mx.load(str(single / name)), mx.load(str(distdir / name))
        assert a.keys() == b.keys() and a
        diff = max(mx.abs(a[k] - b[k]).max().item() for k in a)
        assert diff < 1e-5, f"{name}: max abs diff {diff}"
    # The step moved the adapter (the comparison is not trivially between zeros).
    g = mx.load(str(single / "grads.safetensors"))
    assert max(mx.abs(v).max().item() for v in g.values()) > 1e-3
