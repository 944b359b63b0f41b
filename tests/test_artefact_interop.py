"""Readable outputs (0644/0755), small holes (slug collisions, duplicate keys, fuse's
card), and interop with checkpoints that transformers 5 writes (rope_parameters only)."""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mindprint_mlx.cli import cli
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import load_heads, save_adapter
from mindprint_mlx.models.heads import ScalarHead

from _helpers import random_factors

TEXT = "the teacher reads the book near the river, because it matters"


def _random_adapter(base, out, seed=0, targets=("q_proj", "v_proj", "o_proj", "down_proj"),
                    heads=None, metadata=None, r=2):
    model, tok = load(base)
    lora.apply_lora(model, "sft", targets=targets, r=r, alpha=2.0 * r)
    random_factors(model, "sft", seed)
    ids = tok.encode(TEXT)
    logits = np.array(model(mx.array([ids])))
    save_adapter(model, "sft", out, metadata=metadata, heads=heads(model) if heads else None)
    return model, tok, ids, logits


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


# ---------------------------------------------------------------- 7. readable outputs

@pytest.mark.parametrize("umask,fmode,dmode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                               (0o002, 0o664, 0o775)])
def test_every_written_file_and_directory_has_the_umasks_normal_mode(tmp_path, tiny_llama,
                                                                      umask, fmode, dmode):
    from mindprint_mlx.export import export_peft, export_reward, fuse
    from mindprint_mlx.io import (append_jsonl, atomic_save_safetensors, atomic_write_json,
                                  atomic_write_text)

    old = os.umask(umask)
    try:
        _random_adapter(tiny_llama, tmp_path / "adapter",
                        heads=lambda m: {"reward": ScalarHead(m.args.hidden_size, bias=False)})
        export_peft(tmp_path / "adapter", tmp_path / "peft", card="# card\n")
        export_reward(tmp_path / "adapter", tmp_path / "seqcls")
        fuse(tiny_llama, tmp_path / "adapter", tmp_path / "fused", card=lambda res: "# fused\n")
        atomic_write_json(tmp_path / "run" / "state.json", {"a": 1})
        atomic_write_text(tmp_path / "run" / "metrics" / "x.jsonl", "{}\n")
        append_jsonl(tmp_path / "run" / "metrics" / "pipeline.jsonl", {"step": 1})
        atomic_save_safetensors(tmp_path / "run" / "w.safetensors", {"a": mx.zeros((2,))})
    finally:
        os.umask(old)
    for d in ("adapter", "peft", "seqcls", "fused", "run"):
        for rel, mode in _modes(tmp_path / d).items():
            want = dmode if (tmp_path / d / rel).is_dir() else fmode
            assert mode == want, f"{d}/{rel}: {oct(mode)}, expected {oct(want)}"


def test_umask_is_read_without_changing_it():
    from mindprint_mlx.io import current_umask, dir_mode, file_mode

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert file_mode() == 0o640 and dir_mode() == 0o750
        assert os.umask(0o027) == 0o027     # unchanged by the reads
    finally:
        os.umask(old)
    assert file_mode(0o022) == 0o644 and dir_mode(0o022) == 0o755


# ---------------------------------------------------------------- 6. small holes

def test_topic_slugs_of_colliding_names_differ_and_are_stable():
    from mindprint_mlx.io import topic_slug

    a = topic_slug("a/b__c/t", "a/b__c/t")
    b = topic_slug("a__b/c/t", "a__b/c/t")
    assert a != b
    assert a.startswith("a__b__c__t-") and b.startswith("a__b__c__t-")
    assert a == topic_slug("a/b__c/t", "a/b__c/t")               # same key, same name
    assert re.fullmatch(r"[A-Za-z0-9._-]+", a)                   # one safe path component


def test_duplicate_yaml_keys_name_line_and_key(tmp_path):
    from mindprint_mlx.config import ConfigError, read_yaml
    from mindprint_mlx.pipeline import load_pipeline_config

    f = tmp_path / "pipeline.yaml"
    f.write_text("model: m\nppo:\n  steps: 3\n  batch_size: 4\n  steps: 30\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:5: duplicate key 'steps'"):
        read_yaml(f)
    with pytest.raises(ConfigError, match=r"pipeline.yaml:5: duplicate key 'steps'"):
        load_pipeline_config(f)
    r = CliRunner().invoke(cli, ["pipeline", "run", str(f), "--dry-run"])
    assert r.exit_code == 1 and "duplicate key 'steps'" in r.output and "Traceback" not in r.output
    # YAML merge keys may be overridden: not a duplicate
    f.write_text("base: &b {steps: 1}\nppo:\n  <<: *b\n  steps: 2\n")
    assert read_yaml(f)["ppo"] == {"steps": 2}


def test_duplicate_persona_json_key_names_line_and_key(tmp_path):
    from mindprint_mlx.data.records import DataError, load_persona

    f = tmp_path / "persona.json"
    f.write_text('{\n  "name": "A",\n  "description": "d",\n  "name": "B"\n}\n')
    with pytest.raises(DataError, match=r"persona.json:4: .*duplicate key 'name'"):
        load_persona(f)


def test_a_card_that_cannot_be_built_leaves_no_fused_checkpoint(tmp_path, tiny_llama):
    from mindprint_mlx.export import fuse

    _random_adapter(tiny_llama, tmp_path / "adapter", targets=("o_proj",))

    def broken(res):
        raise MindprintError("card failed")
    with pytest.raises(MindprintError, match="card failed"):
        fuse(tiny_llama, tmp_path / "adapter", tmp_path / "fused", card=broken)
    assert not (tmp_path / "fused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]   # no temp left
    # the CLI: a report that cannot be read fails before anything is written
    bad = tmp_path / "report.md"
    bad.write_bytes(b"\xff\xfe not utf-8")
    r = CliRunner().invoke(cli, ["fuse", "-m", str(tiny_llama), "-a", str(tmp_path / "adapter"),
                                 "-o", str(tmp_path / "fused"), "--report", str(bad)])
    assert r.exit_code == 1 and "report.md" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "fused").exists()


# ---------------------------------------------------------------- 8. transformers 5 interop

@pytest.fixture(scope="module")
def t5_llama(tmp_path_factory):
    """A llama as transformers 5.24 saves it: rope only under rope_parameters, with a
    theta (500000) that is not mlx-lm's llama default (10000)."""
    import torch
    import transformers

    from mindprint_mlx.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("t5")
    src = build_tiny_model(root / "src", arch="llama", seed=3)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_theta"] = 500000.0
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (src / "config.json").write_text(json.dumps(cfg))
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(root / "saved")
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(root / "saved")
    saved = json.loads((root / "saved" / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == 500000.0
    return root / "saved"


def _hf_logits(path, ids):
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits.numpy()


def test_fused_transformers5_llama_loads_in_plain_mlx_lm_with_transformers_logits(
        tmp_path, t5_llama, caplog):
    import mlx_lm

    from mindprint_mlx.export import fuse
    from mindprint_mlx.models import load as mp_load

    with caplog.at_level(logging.WARNING, logger="mindprint_mlx.models.load"):
        _, _, ids, ours = _random_adapter(t5_llama, tmp_path / "adapter")
        mp_load(t5_llama)   # a second load of the same base: no second note
    notes = [r.getMessage() for r in caplog.records if "model_config=" in r.getMessage()]
    assert len(notes) == 1 and "{'rope_theta': 500000.0}" in notes[0], notes

    res = fuse(t5_llama, tmp_path / "adapter", tmp_path / "fused")
    assert res.config_added == {"rope_theta": 500000.0}
    cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_parameters"]["rope_theta"] == 500000.0

    theirs = _hf_logits(tmp_path / "fused", ids)
    plain, _ = mlx_lm.load(str(tmp_path / "fused"))
    plain_logits = np.array(plain(mx.array([ids])))
    assert np.abs(plain_logits - theirs).max() < 1e-4
    assert np.abs(ours - theirs).max() < 1e-4
    # the base itself, in plain mlx-lm: wrong without the note's model_config, right with it
    base_ref = _hf_logits(t5_llama, ids)
    wrong, _ = mlx_lm.load(str(t5_llama))
    assert np.abs(np.array(wrong(mx.array([ids]))) - base_ref).max() > 1e-2
    right, _ = mlx_lm.load(str(t5_llama), model_config={"rope_theta": 500000.0})
    assert np.abs(np.array(right(mx.array([ids]))) - base_ref).max() < 1e-4
    # and the adapter through plain mlx-lm with that model_config matches mindprint
    adapted, _ = mlx_lm.load(str(t5_llama), adapter_path=str(tmp_path / "adapter"),
                             model_config={"rope_theta": 500000.0})
    assert np.abs(np.array(adapted(mx.array([ids]))) - ours).max() < 1e-4


def _python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_reward_head_trains_without_bias_and_exports_by_default_with_a_working_card(
        tmp_path, tiny_llama):
    """Trained by train_reward_model (weight decay on), exported from the training output
    directory (as the pipeline's reward_model/), with the card's snippet run as written."""
    from mindprint_mlx.data.records import PreferenceRecord
    from mindprint_mlx.train.reward import RewardConfig, RewardModel, train_reward_model

    model, tok = load(tiny_llama)
    words = ["the book", "a map", "the river", "a song", "the story", "a coat"]
    pairs = [PreferenceRecord(prompt=({"role": "user", "content": f"tell me about {w}"},),
                              chosen=f"{w} is good, as always.", rejected=f"{w} bad")
             for w in words]
    train_reward_model(model, tok, pairs, RewardConfig(epochs=2, lora_rank=2, batch_size=2, learning_rate=1e-2,
                                                       weight_decay=0.1),
                       tmp_path / "reward_model", progress=False)
    head = load_heads(tmp_path / "reward_model" / "adapter")["reward"]
    assert "bias" not in head.summary and head.bias_value == 0.0
    from safetensors.numpy import load_file
    assert sorted(load_file(str(tmp_path / "reward_model" / "adapter" / "heads.safetensors"))) \
        == ["reward.summary.weight"]

    out = tmp_path / "seqcls"
    r = CliRunner().invoke(cli, ["export", "reward", str(tmp_path / "reward_model"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "mindprint_reward.json").read_text())
    assert info["head_bias"] == 0.0 and info["bias_dropped"] is False

    code = _python_block((out / "README.md").read_text()).replace("PATH_TO_THIS_DIRECTORY", str(out))
    scope: dict = {}
    exec(compile(code, "card-snippet", "exec"), scope)   # the snippet, as a user runs it
    rm = RewardModel.load(model, tok, tmp_path / "reward_model")
    ours = float(np.array(rm.score_batch([scope["messages"]], [scope["answer"]]))[0])
    assert abs(scope["score"] - ours) < 1e-4, (scope["score"], ours)


def test_rank_export_card_states_the_exported_rank_and_alpha(tmp_path, tiny_llama):
    _random_adapter(tiny_llama, tmp_path / "adapter", targets=("o_proj",), r=4)
    r = CliRunner().invoke(cli, ["export", "peft", str(tmp_path / "adapter"), "-o",
                                 str(tmp_path / "peft"), "--rank", "2"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    card = (tmp_path / "peft" / "README.md").read_text()
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2
    assert "- LoRA rank: `2`" in card and "- LoRA alpha: `2.0`" in card
    assert "SVD compression: rank 2" in card
    assert "`4`" not in card.split("## Usage")[0]        # not the trained rank


def test_adapter_on_an_mlx_quantized_directory_warns_about_base_model_name(tmp_path, tiny_llama):
    from mlx_lm import convert

    from mindprint_mlx.export import export_peft

    q = tmp_path / "q4"
    convert(str(tiny_llama), str(q), quantize=True, q_group_size=64, q_bits=4)
    _random_adapter(q, tmp_path / "adapter", targets=("o_proj",))
    res = export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert any("MLX-quantized" in n and "--base-model" in n for n in res.notes), res.notes
    r = CliRunner().invoke(cli, ["export", "peft", str(tmp_path / "adapter"), "-o",
                                 str(tmp_path / "peft2"), "--base-model", "org/full-precision"])
    assert r.exit_code == 0 and "MLX-quantized" not in r.output


def test_importing_the_parent_of_a_named_peft_adapter_names_its_subfolder(tmp_path, tiny_llama):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from mindprint_mlx.export import import_peft

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
                        adapter_name="voice")
    pm.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "voice" / "adapter_config.json").is_file()
    with pytest.raises(MindprintError, match=r"subfolder\(s\) 'voice'.*saved/voice"):
        import_peft(tmp_path / "saved", tmp_path / "out", model=str(tiny_llama))
    r = CliRunner().invoke(cli, ["import", "peft", str(tmp_path / "saved"), "-o",
                                 str(tmp_path / "out"), "--model", str(tiny_llama)])
    assert r.exit_code == 1 and "'voice'" in r.output and "Traceback" not in r.output
    import_peft(tmp_path / "saved" / "voice", tmp_path / "out", model=str(tiny_llama))
    assert (tmp_path / "out" / "adapters.safetensors").is_file()
