"""Every bad artefact is a one-line error naming the file, never a traceback.

One table: each case breaks one file of a good artefact (an mlx-lm adapter, a reward
model, a PEFT export, a base model, a run directory) and runs the command a user would;
the command must exit 1, print no traceback and name the broken file (and, where there
is one, the tensor or key).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mindprint_mlx.cli import cli
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter
from mindprint_mlx.models.heads import ScalarHead


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_llama):
    """Good artefacts, built once: adapter, reward model, PEFT export, run directory."""
    from mindprint_mlx.export import export_peft

    root = tmp_path_factory.mktemp("good")
    model, _ = load(tiny_llama)
    lora.apply_lora(model, "sft", targets=("q_proj", "o_proj"), r=2, alpha=4.0)
    rng = np.random.default_rng(0)
    for _, m in lora.lora_layers(model):
        a = m.adapters["sft"]
        a.lora_b = mx.array(rng.standard_normal(a.lora_b.shape).astype(np.float32) * 0.1)
    save_adapter(model, "sft", root / "adapter")
    mx.random.seed(0)
    head = ScalarHead(model.args.hidden_size, zero_init=False, bias=False)
    save_adapter(model, "sft", root / "reward_model" / "adapter", heads={"reward": head})
    export_peft(root / "adapter", root / "peft")
    run = root / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"version": 1, "topics": {}, "units": {},
                                                "reward_model": None, "finished": False}))
    return {"base": Path(tiny_llama), "root": root}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _empty(f: Path) -> None:
    f.write_bytes(b"")


def _huge_header(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])


def _bad_offsets(f: Path) -> None:
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    start = header[name]["data_offsets"][0]
    header[name]["data_offsets"] = [start, start + 10 ** 9]
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _nan_tensor(f: Path, name_part: str = "") -> str:
    """Put a NaN into the first tensor (whose name contains name_part); returns its name."""
    w = dict(mx.load(str(f)))
    name = sorted(k for k in w if name_part in k)[0]
    v = np.array(w[name].astype(mx.float32))
    v.reshape(-1)[0] = np.nan
    w[name] = mx.array(v).astype(w[name].dtype)
    mx.save_safetensors(str(f), w, metadata={"format": "pt"})
    return name


def _json_edit(f: Path, fn) -> None:
    f.write_text(json.dumps(fn(json.loads(f.read_text()))))


def _peft_wrong_shape(f: Path) -> str:
    """lora_A of one module one column too wide for the base's linear layer."""
    w = dict(mx.load(str(f)))
    name = sorted(k for k in w if "lora_A" in k)[0]
    w[name] = mx.concatenate([w[name], w[name][:, :1]], axis=1)
    mx.save_safetensors(str(f), w, metadata={"format": "pt"})
    return name


# (id, which artefact to copy, how to break it -> (broken file, extra text expected or None),
#  the command given the copy's path, the base and an output path)
def _gen(art, base, out):
    return ["generate", "-m", str(base), "-a", str(art), "-p", "hi", "--max-tokens", "2"]


def _exp(art, base, out):
    return ["export", "peft", str(art), "-o", str(out)]


def _rew(art, base, out):
    return ["export", "reward", str(art), "-o", str(out)]


def _imp(art, base, out):
    return ["import", "peft", str(art), "-o", str(out), "--model", str(base)]


def _fuse(art, base, out):
    return ["fuse", "-m", str(base), "-a", str(art), "-o", str(out)]


def _status(art, base, out):
    return ["pipeline", "status", str(art)]


def _w(rel, fn):
    def br(d: Path):
        r = fn(d / rel)
        return rel, r if isinstance(r, str) else None
    return br


def _j(rel, fn):
    return _w(rel, lambda f: _json_edit(f, fn))


W, C, M = "adapters.safetensors", "adapter_config.json", "mindprint.json"
H, PW, PC = "adapter/heads.safetensors", "adapter_model.safetensors", "adapter_config.json"


def _rm_heads(d: Path):
    (d / H).unlink()
    return "heads.safetensors", None


def _only_bias_head(d: Path):
    mx.save_safetensors(str(d / H), {"reward.summary.bias": mx.zeros((1,))})
    return H, "reward.summary.weight"


CASES = [
    # generate: the adapter's files
    ("generate-truncated", "adapter", _w(W, _truncate), _gen),
    ("generate-empty", "adapter", _w(W, _empty), _gen),
    ("generate-huge-header", "adapter", _w(W, _huge_header), _gen),
    ("generate-bad-offset", "adapter", _w(W, _bad_offsets), _gen),
    ("generate-config-list", "adapter", _j(C, lambda c: [c]), _gen),
    ("generate-lora-parameters-string", "adapter", _j(C, lambda c: {**c, "lora_parameters": "r2"}), _gen),
    ("generate-rank-0", "adapter", _j(C, lambda c: {**c, "lora_parameters": {**c["lora_parameters"], "rank": 0}}), _gen),
    ("generate-meta-list", "adapter", _j(M, lambda m: [m]), _gen),
    # export peft
    ("export-truncated", "adapter", _w(W, _truncate), _exp),
    ("export-huge-header", "adapter", _w(W, _huge_header), _exp),
    ("export-bad-offset", "adapter", _w(W, _bad_offsets), _exp),
    ("export-nan", "adapter", _w(W, _nan_tensor), _exp),
    ("export-rank-0", "adapter", _j(C, lambda c: {**c, "lora_parameters": {**c["lora_parameters"], "rank": 0}}), _exp),
    ("export-config-number", "adapter", _j(C, lambda c: 3), _exp),
    ("export-meta-frozen-below-int", "adapter", _j(M, lambda m: {**m, "frozen_below": 5}), _exp),
    # export reward (given the pipeline's reward_model/ directory)
    ("reward-heads-missing", "reward_model", _rm_heads, _rew),
    ("reward-heads-truncated", "reward_model", _w(H, _truncate), _rew),
    ("reward-heads-nan", "reward_model", _w(H, _nan_tensor), _rew),
    ("reward-head-without-weight", "reward_model", _only_bias_head, _rew),
    ("reward-adapter-empty", "reward_model", _w("adapter/" + W, _empty), _rew),
    # import peft
    ("import-truncated", "peft", _w(PW, _truncate), _imp),
    ("import-bad-offset", "peft", _w(PW, _bad_offsets), _imp),
    ("import-config-list", "peft", _j(PC, lambda c: [c]), _imp),
    ("import-r-0", "peft", _j(PC, lambda c: {**c, "r": 0}), _imp),
    ("import-r-string", "peft", _j(PC, lambda c: {**c, "r": "two"}), _imp),
    ("import-shape-does-not-fit-base", "peft", _w(PW, _peft_wrong_shape), _imp),
    ("import-nan", "peft", _w(PW, _nan_tensor), _imp),
    # fuse
    ("fuse-truncated", "adapter", _w(W, _truncate), _fuse),
    ("fuse-nan", "adapter", _w(W, lambda f: _nan_tensor(f, "lora_b")), _fuse),
    ("fuse-config-list", "adapter", _j(C, lambda c: []), _fuse),
    # pipeline status
    ("status-state-list", "run", _j("state.json", lambda s: [s]), _status),
    ("status-topics-list", "run", _j("state.json", lambda s: {**s, "topics": []}), _status),
    ("status-phases-string", "run", _j("state.json", lambda s: {**s, "topics": {"a/b/c": {"phases": "x"}}}), _status),
    ("status-invalid-json", "run", _w("state.json", lambda f: f.write_text('{"version": 1,')), _status),
]


def _assert_one_line_error(r, file_name: str, extra: str | None) -> None:
    out = r.output
    assert r.exit_code == 1, out
    assert isinstance(r.exception, SystemExit), repr(r.exception)   # not an uncaught exception
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    assert Path(file_name).name in errors[0], out
    if extra:
        assert extra in errors[0], out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_artefact_is_a_one_line_error_naming_the_file(tmp_path, good, case):
    _, which, breaker, command = case
    art = _copy(good["root"] / which, tmp_path / which)
    file_name, extra = breaker(art)
    r = CliRunner().invoke(cli, command(art, good["base"], tmp_path / "out"))
    _assert_one_line_error(r, file_name, extra)
    assert not (tmp_path / "out").exists()     # nothing half-written


def test_base_weights_that_are_cut_are_one_line_errors_in_fuse_and_generate(tmp_path, good):
    base = _copy(good["base"], tmp_path / "base")
    _truncate(base / "model.safetensors")
    adapter = good["root"] / "adapter"
    for args in (_fuse(adapter, base, tmp_path / "out"), _gen(adapter, base, None)):
        r = CliRunner().invoke(cli, args)
        _assert_one_line_error(r, "model.safetensors", None)
    assert not (tmp_path / "out").exists()


def test_resume_with_a_state_json_of_the_wrong_type_is_one_line(tmp_path, good):
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR

    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text(json.dumps({"version": 1, "topics": [], "units": {}}))
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(good["base"]), "data_dir": str(DEMO_CURRICULUM_DIR),
                                   "run_dir": str(run)}))
    r = CliRunner().invoke(cli, ["pipeline", "run", str(cfg), "--resume"])
    _assert_one_line_error(r, "state.json", "'topics'")


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_output(tmp_path, good):
    """RLIMIT_FSIZE makes writes past a size fail as a full disk does (EFBIG, not ENOSPC)."""
    out = tmp_path / "peft"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from mindprint_mlx.cli import cli; sys.argv[0] = 'mindprint'; cli()")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code, "export", "peft", str(good["root"] / "adapter"),
                        "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode == 1, text
    assert "Traceback" not in text, text
    err = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "adapter_model.safetensors" in err[0] and "cannot write" in err[0], text
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp left behind
    # with room again the same command works
    r = CliRunner().invoke(cli, ["export", "peft", str(good["root"] / "adapter"), "-o", str(out)])
    assert r.exit_code == 0, r.output
