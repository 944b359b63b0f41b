"""merge.mode: the SVD of a LoRA sum, the folded base checkpoint, and short pipeline runs
with each mode that stop after the first unit and resume."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from _helpers import forward_logits, randomize
from mindprint_mlx.config import ConfigError
from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter
from mindprint_mlx.pipeline import load_pipeline_config, run_pipeline
from mindprint_mlx.pipeline.merge import (compress_adapter, final_size, negate_into,
                                          set_base_weights, svd_lora)


def test_svd_of_a_low_rank_sum_is_exact():
    rng = np.random.default_rng(0)
    a1, b1 = rng.normal(size=(64, 4)), rng.normal(size=(4, 48))
    m = rng.normal(size=(4, 4))
    # two rank-4 adapters spanning the same 4 directions: concatenated rank 8, true rank 4
    a, b = np.concatenate([a1, a1 @ m], 1), np.concatenate([b1, 0.5 * b1], 0)
    a_k, b_k, err, s = svd_lora(a, b, 4)
    assert a_k.shape == (64, 4) and b_k.shape == (4, 48)
    assert err < 1e-12 and np.abs(a_k @ b_k - a @ b).max() < 1e-10
    assert np.all(s[4:] < 1e-10 * s[0])        # (directions of zero weight are dropped)


def test_truncation_error_is_the_norm_of_the_discarded_singular_values():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(12, 30))
    dense = a @ b
    sv = np.linalg.svd(dense, compute_uv=False)
    for k in (1, 5, 11):
        a_k, b_k, err, s = svd_lora(a, b, k)
        want = np.sqrt(np.sum(sv[k:] ** 2) / np.sum(sv ** 2))
        assert err == pytest.approx(want, rel=1e-9)
        assert np.linalg.norm(dense - a_k @ b_k) / np.linalg.norm(dense) == pytest.approx(want, rel=1e-9)
        assert np.allclose(s, sv[:12], rtol=1e-9)
    a_k, b_k, err, _ = svd_lora(a, b, 12)       # rank >= R: nothing discarded
    assert err < 1e-12 and np.allclose(a_k @ b_k, dense)


def test_compressed_adapter_matches_the_truncated_dense_delta(tiny_llama):
    model, tok = load(tiny_llama)
    for i, r in enumerate((4, 6)):
        lora.apply_lora(model, f"t{i}", targets=["q_proj", "down_proj"], r=r, alpha=2.0 * r)
        randomize(model, f"t{i}", seed=i)
    x = mx.array([tok.encode("the market turns")])
    lora.combine_adapters(model, ["t0", "t1"], "unit")
    with lora.active_adapters(model, ["unit"]):
        full = forward_logits(model, x)
    dense = {p: np.array(m.adapters["unit"].delta_weight()) for p, m in lora.lora_layers(model)}
    info = compress_adapter(model, "unit", 10)           # rank 10 = 4 + 6: exact
    assert info["rank_before"] == 10 and info["rank"] == 10 and info["max_error"] == 0.0
    info = compress_adapter(model, "unit", 3)
    assert info["rank"] == 3 and len(info["errors"]) == 4 and 0 < info["max_error"] < 1
    for p, m in lora.lora_layers(model):
        ad = m.adapters["unit"]
        assert ad.r == 3 and ad.lora_a.shape[1] == 3
        u, s, vt = np.linalg.svd(dense[p].astype(np.float64))
        want = (u[:, :3] * s[:3]) @ vt[:3]
        assert np.abs(np.array(ad.delta_weight()) - want).max() < 1e-4 * np.abs(want).max()
        assert info["errors"][p] == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2)), rel=1e-4)
    with lora.active_adapters(model, ["unit"]):
        approx = forward_logits(model, x)
    # the truncated delta applied densely gives the same outputs as the compressed factors
    for p, m in lora.lora_layers(model):
        d = m.adapters["unit"].delta_weight()
        m.linear.weight = m.linear.weight + d.astype(m.linear.weight.dtype)
    with lora.active_adapters(model, []):
        densely = forward_logits(model, x)
    assert np.abs(approx - densely).max() < 1e-4 and np.abs(approx - full).max() > 1e-4


def test_fold_writes_a_checkpoint_mlx_lm_loads_with_the_logits_of_base_plus_adapter(tiny_llama, tmp_path):
    from mlx_lm import load as mlx_load

    from mindprint_mlx.export.fuse import fuse

    model, tok = load(tiny_llama)
    lora.apply_lora(model, "u0", targets=["q_proj", "v_proj", "up_proj"], r=4, alpha=8.0)
    lora.apply_lora(model, "reward", targets=["q_proj", "v_proj", "up_proj"], r=2, alpha=4.0)
    randomize(model, "u0", seed=3)
    randomize(model, "reward", seed=4)
    save_adapter(model, "u0", tmp_path / "u0")
    x = mx.array([tok.encode("cycles have phases")])
    with lora.active_adapters(model, ["u0"]):
        want = forward_logits(model, x)
    with lora.active_adapters(model, ["reward"]):
        reward_before = forward_logits(model, x)
    fuse(tiny_llama, tmp_path / "u0", tmp_path / "folded" / "unit-0")
    folded, _ = mlx_load(str(tmp_path / "folded" / "unit-0"))
    assert np.abs(forward_logits(folded, x) - want).max() < 1e-4
    # in memory, as the pipeline does it: the folded weights, u0 moved into the `unfold` adapter
    set_base_weights(model, tmp_path / "folded" / "unit-0")
    negate_into(model, "u0")
    assert "u0" not in lora.adapter_names(model) and "unfold" in lora.adapter_names(model)
    with lora.active_adapters(model, []):
        assert np.abs(forward_logits(model, x) - want).max() < 1e-4
    with lora.active_adapters(model, ["unfold", "reward"]):  # the reward model sees its own base
        assert np.abs(forward_logits(model, x) - reward_before).max() < 1e-4


def test_final_size_per_mode():
    units = [[(16, 20), (16, 16)], [(16, 20)]]
    c = final_size("concat", 20, units, 1000, base_bytes=10 ** 6)
    s = final_size("svd", 20, units, 1000, base_bytes=10 ** 6)
    f = final_size("fold_into_base", 20, units, 1000, base_bytes=10 ** 6)
    assert (c["rank_min"], c["rank_max"], c["bytes_max"]) == (48, 56, 4 * 56 * 1000)
    assert (s["rank_min"], s["rank_max"], s["params_max"]) == (20, 20, 20000)
    assert (f["rank_min"], f["rank_max"], f["extra_bytes"]) == (16, 20, 10 ** 6)


@pytest.mark.parametrize("merge, message", [
    ({"mode": "svdd"}, r"key 'merge\.mode': must be one of concat, svd, fold_into_base"),
    ({"mode": "svd", "rank": -1}, r"key 'merge\.rank': must be an integer >= 0"),
    ({"mode": "concat", "rank": 8}, r"key 'merge\.rank': only merge\.mode svd uses it"),
])
def test_bad_merge_settings_are_one_line_errors_naming_the_key(tmp_path, merge, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_pipeline_config(None, {"model": "m", "data_dir": str(tmp_path), "merge": merge})
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- short pipeline runs

TOPICS = {"unit-1-foundations": "cycle-phases", "unit-2-practice": "sentiment-extremes"}


def _two_units(dst: Path) -> Path:
    """One topic of each demo unit: two units, so a unit is merged before another trains."""
    dst.mkdir(parents=True)
    for f in DEMO_CURRICULUM_DIR.iterdir():
        if f.suffix == ".jsonl":
            keep = [line for line in f.read_text().splitlines() if line.strip()
                    and TOPICS.get(json.loads(line).get("unit")) == json.loads(line).get("topic")]
            (dst / f.name).write_text("\n".join(keep) + "\n")
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _config(model, data, run_dir, mode, rank=0) -> dict:
    return {
        "model": str(model), "data_dir": str(data), "run_dir": str(run_dir), "seed": 0,
        "reward": {"train": {"lora_rank": 2, "lora_alpha": 4.0, "epochs": 1, "batch_size": 8,
                             "max_seq_length": 64, "compile": False}, "continue_at_chance": True},
        "sft": {"lora_rank": 3, "lora_alpha": 6.0, "max_seq_length": 64, "compile": False},
        "ppo": {"steps": 1, "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1, "lora_rank": 2,
                "max_new_tokens": 4, "save_every": 1, "progress": False},
        "adaptive": {"min_epochs": 1, "max_epochs": 1, "min_pass_threshold": 1.0,
                     "max_pass_threshold": 1.0},
        "eval": {"max_tokens": 4, "max_questions": 1, "reward_samples": 1},
        "merge": {"mode": mode, **({"rank": rank} if rank else {})},
    }


def _stop_after_first_unit(line: str) -> None:
    from mindprint_mlx.stop import request_stop

    if line.startswith("[unit unit-1-foundations] merged"):
        request_stop()


@pytest.fixture()
def clear_stop():
    from mindprint_mlx.stop import clear_stop

    clear_stop()
    yield
    clear_stop()


def _run_cut_and_resume(cfg: dict, tmp_path: Path, name: str):
    f = tmp_path / f"{name}.yaml"
    import yaml

    f.write_text(yaml.safe_dump(cfg))
    cut = run_pipeline(load_pipeline_config(f), echo=_stop_after_first_unit)
    assert cut.status == "interrupted"
    assert cut.state["units"]["unit-1-foundations"]["done"]
    lines: list[str] = []
    res = run_pipeline(load_pipeline_config(f), resume=True, echo=lines.append)
    assert res.status == "finished", lines
    return res, lines


def test_svd_run_stops_after_a_unit_resumes_and_ships_a_small_adapter(tiny_demo_model, tmp_path, clear_stop):
    data = _two_units(tmp_path / "data")
    run_dir = tmp_path / "svd"
    res, lines = _run_cut_and_resume(_config(tiny_demo_model, data, run_dir, "svd"), tmp_path, "svd")
    st = res.state
    for unit in TOPICS:
        svd = st["units"][unit]["svd"]
        assert svd["rank_before"] == 5 and svd["rank"] == 5      # one topic: nothing to compress
    fin = st["final_merge"]
    assert fin["mode"] == "svd" and fin["rank"] == 5 and fin["svd"]["rank_before"] == 10
    assert 0 < fin["svd"]["max_error"] < 1 and len(fin["svd"]["errors"]) > 0
    cfg = json.loads((run_dir / "final_adapter" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 5
    meta = json.loads((run_dir / "final_adapter" / "mindprint.json").read_text())
    assert meta["merge"]["mode"] == "svd"
    assert set(st["final_eval"]) == {f"{u}/{c}/{t}" for u, c, t in _keys(st)}
    report = (run_dir / "report.md").read_text()
    assert "svd" in report and "relative error" in report


def _keys(st):
    return [tuple(k.split("/")) for k in st["topics"]]


def test_fold_run_resumes_on_the_folded_base_to_the_same_bits(tiny_demo_model, tmp_path, clear_stop):
    import yaml
    from mlx_lm import load as mlx_load

    data = _two_units(tmp_path / "data")
    whole_cfg = _config(tiny_demo_model, data, tmp_path / "whole", "fold_into_base")
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(whole_cfg))
    whole = run_pipeline(load_pipeline_config(tmp_path / "whole.yaml"), echo=lambda s: None)
    assert whole.status == "finished"
    run_dir = tmp_path / "fold"
    res, lines = _run_cut_and_resume(_config(tiny_demo_model, data, run_dir, "fold_into_base"),
                                     tmp_path, "fold")
    st = res.state
    folded = st["units"]["unit-1-foundations"]["folded_base"]
    assert folded == "folded_base/unit-0" and "folded_base" not in st["units"]["unit-2-practice"]
    assert (run_dir / folded / "model.safetensors").is_file()
    # the final adapter is the last unit's only, and names the folded base it sits on
    meta = json.loads((run_dir / "final_adapter" / "mindprint.json").read_text())
    assert meta["merge"] == {"mode": "fold_into_base", "folded_base": folded,
                             "original_base": str(tiny_demo_model)}
    assert meta["base_model"] == str((run_dir / folded).resolve())
    cfg = json.loads((run_dir / "final_adapter" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 5 and cfg["model"] == meta["base_model"]
    # resumed on the folded base: the same bits as the uninterrupted run
    a = mx.load(str(run_dir / "final_adapter" / "adapters.safetensors"))
    b = mx.load(str(whole.run_dir / "final_adapter" / "adapters.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert {k: v["score"] for k, v in st["final_eval"].items()} == \
        {k: v["score"] for k, v in whole.state["final_eval"].items()}
    # mlx-lm loads the folded base with the final adapter, as the metadata says
    model, tok = mlx_load(meta["base_model"], adapter_path=str(run_dir / "final_adapter"))
    assert np.isfinite(forward_logits(model, mx.array([tok.encode("a cycle")]))).all()


def test_svd_repair_lowers_the_sft_loss_of_the_compressed_adapter(tiny_llama, tmp_path):
    from types import SimpleNamespace

    from mindprint_mlx.pipeline.config import MergeSettings
    from mindprint_mlx.pipeline.merge import Merger
    from mindprint_mlx.train.sft import SFTConfig, train_sft

    model, tok = load(tiny_llama)
    records = [(f"what does phase {i} of the cycle bring?", f"phase {i} brings {w} and then {v}")
               for i, (w, v) in enumerate([("growth", "doubt"), ("fear", "calm"), ("rates", "loans"),
                                           ("cash", "debt"), ("hope", "risk"), ("gold", "bonds")])]
    scfg = SFTConfig(lora_rank=8, lora_alpha=16.0, learning_rate=5e-3, batch_size=3, epochs=8,
                     max_seq_length=64, compile=False, lora_targets=["q_proj", "v_proj", "down_proj"])
    train_sft(model, tok, records, scfg, tmp_path / "sft", adapter_name="unit", progress=False)
    lora.apply_lora(model, "other", targets=["q_proj"], r=2, alpha=4.0, trainable=False)
    randomize(model, "other", seed=5)
    other = {k: np.array(v) for k, v in lora.adapter_state(model, "other").items()}
    compress_adapter(model, "unit", 1)
    cfg = SimpleNamespace(merge=MergeSettings(mode="svd", rank=1, repair_epochs=4),
                          sft=scfg, run_ppo=False, model=tiny_llama)
    run = SimpleNamespace(cfg=cfg, model=model, tok=tok, run_dir=tmp_path / "run", echo=print,
                          trained=[SimpleNamespace(key="t", sft=records)])
    rep = Merger(run)._repair("unit", ["other", "unit"], "unit-0")
    assert rep["epochs"] == 4 and rep["steps"] == 8 and rep["records"] == 6
    assert rep["loss_after"] < rep["loss_before"] - 0.05
    for _, m in lora.lora_layers(model):          # still rank 1, frozen; the neighbour untouched
        if "unit" in m.adapters:
            assert m.adapters["unit"].r == 1 and not m.adapters["unit"].trainable
    assert all(np.array_equal(np.array(v), other[k])
               for k, v in lora.adapter_state(model, "other").items())
    assert not (tmp_path / "run" / "work" / "svd_repair" / "unit-0").exists()
    cfg.merge.repair_epochs = 0
    assert Merger(run)._repair("unit", ["unit"], "unit-0") == {}


def _stop_at(prefix: str, lines: list[str]):
    """An echo that keeps the lines and requests a stop at the first that starts with `prefix`."""
    from mindprint_mlx.stop import request_stop

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith(prefix) and sum(x.startswith(prefix) for x in lines) == 1:
            request_stop()
    return echo


def test_svd_repair_stopped_mid_pass_resumes_to_the_same_bits(tiny_demo_model, tmp_path, clear_stop):
    """merge.repair_epochs > 0, stopped inside the repair SFT (the stop API, as Ctrl-C does):
    first inside unit 1's repair, then, resumed, inside the final adapter's repair (both
    units repaired and saved by then); resumed again, the run ends with the bits of an
    uninterrupted run (the repair is seeded and checkpoint-free: a resumed merge compresses
    and repairs again from the saved topics; a done unit's repaired adapter is loaded)."""
    import yaml
    from mindprint_mlx.stop import clear_stop as clear

    data = _two_units(tmp_path / "data")
    cfgs = {}
    for name in ("whole", "cut"):
        cfg = _config(tiny_demo_model, data, tmp_path / name, "svd", rank=2)
        cfg["run_ppo"] = False
        cfg["merge"]["repair_epochs"] = 2
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        cfgs[name] = load_pipeline_config(tmp_path / f"{name}.yaml")
    whole = run_pipeline(cfgs["whole"], echo=lambda s: None)
    assert whole.status == "finished"
    first = next(iter(TOPICS))
    sessions = []
    cuts = [(f"[unit {first}] svd: rank", f"unit-{first}", f"[unit {first}] svd repair"),
            ("final adapter: svd rank", "final", "final adapter: svd repair"), (None, None, None)]
    for prefix, label, repaired in cuts:
        lines: list[str] = []
        res = run_pipeline(cfgs["cut"], resume=bool(sessions),
                           echo=_stop_at(prefix, lines) if prefix else lines.append)
        clear()
        sessions.append((res, lines))
        if label:   # stopped inside the repair: its SFT checkpointed the step it stopped after
            assert res.status == "interrupted"
            assert (res.run_dir / "work" / "svd_repair" / label / "checkpoint").is_dir()
            assert not any(x.startswith(repaired) for x in lines)
    (cut1, _), (cut2, _), (res, _) = sessions
    assert res.status == "finished"
    assert not cut1.state["units"][first].get("done") and not cut2.state.get("final_adapter")
    st = res.state
    # more than one step each, so a stop after the first was mid-pass
    assert st["units"][first]["svd"]["repair"]["steps"] > 1 and st["final_merge"]["svd"]["repair"]["steps"] > 1
    assert not (res.run_dir / "work").exists()
    for unit in TOPICS:
        assert st["units"][unit]["svd"]["repair"] == whole.state["units"][unit]["svd"]["repair"]
    assert st["final_merge"]["svd"]["repair"] == whole.state["final_merge"]["svd"]["repair"]
    for rel in ["final_adapter"] + [st["units"][u]["merged"] for u in TOPICS]:
        a = mx.load(str(res.run_dir / rel / "adapters.safetensors"))
        b = mx.load(str(whole.run_dir / rel / "adapters.safetensors"))
        assert sorted(a) == sorted(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a), rel
    assert {k: v["score"] for k, v in st["final_eval"].items()} == \
        {k: v["score"] for k, v in whole.state["final_eval"].items()}


@pytest.mark.parametrize("merge, message", [
    ({"mode": "svd", "repair_epochs": -1}, r"key 'merge\.repair_epochs': must be an integer >= 0"),
    ({"mode": "svd", "repair_epochs": 1.5}, r"key 'merge\.repair_epochs': expected an integer"),
    ({"mode": "concat", "repair_epochs": 2}, r"key 'merge\.repair_epochs': only merge\.mode svd"),
])
def test_bad_repair_epochs_are_one_line_errors(tmp_path, merge, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline_config(None, {"model": "m", "data_dir": str(tmp_path), "merge": merge})
