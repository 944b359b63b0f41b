"""Fused checkpoints load in transformers with mindprint's logits; hub dry runs stay offline."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mindprint_mlx.cli import cli
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.export import export_peft, fuse
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter

from _helpers import random_factors

TEXT = "my friend writes a letter after dinner, with great care"


def _adapter(base, out, seed, targets=("q_proj", "v_proj", "o_proj", "down_proj"), quantize=None):
    """A saved adapter with random non-zero factors; returns mindprint's logits with it."""
    model, tok = load(base, quantize=quantize)
    lora.apply_lora(model, "sft", targets=targets, r=2, alpha=4.0)
    random_factors(model, "sft", seed)
    ids = tok.encode(TEXT)
    logits = np.array(model(mx.array([ids])))
    save_adapter(model, "sft", out, metadata={
        "training": {"phase": "sft", "epochs": 2, "learning_rate": 1e-4},
        "data": {"sft_examples": 12, "data_hash": "abc123"}})
    return ids, logits


def _hf_logits(path, ids):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, arch, request):
    import transformers

    base = request.getfixturevalue(f"tiny_{arch}")
    ids, ours = _adapter(base, tmp_path / "sft", seed=1)
    res = fuse(base, tmp_path / "sft", tmp_path / "fused")
    assert len(res.fused_weights) == 4 * 2
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (tmp_path / "fused" / f).is_file(), f
    theirs = _hf_logits(tmp_path / "fused", ids)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(theirs - _hf_logits(base, ids)).max() > 0.05   # the adapter is in there
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "fused")
    assert tok.encode(TEXT, add_special_tokens=False) == ids


def test_quantized_base_fuses_only_with_dequantize(tmp_path, tiny_llama):
    from mlx_lm import convert

    qbase = tmp_path / "q4"
    convert(str(tiny_llama), str(qbase), quantize=True, q_group_size=64, q_bits=4)
    ids, ours = _adapter(qbase, tmp_path / "sft", seed=2)
    with pytest.raises(MindprintError, match="--dequantize"):
        fuse(qbase, tmp_path / "sft", tmp_path / "fused")
    res = fuse(qbase, tmp_path / "sft", tmp_path / "fused", dequantize=True,
               max_shard_bytes=100_000)
    assert res.dequantized
    index = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1          # sharded, with an index
    cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert np.abs(ours - _hf_logits(tmp_path / "fused", ids)).max() < 1e-4


def test_fuse_cli_dry_run_lists_files_and_card_without_network(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_NEVERPRINTME0123456789")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    (run / "adapters" / "u1" / "c1" / "t1").mkdir(parents=True)
    (run / "report.md").write_text("# Report\n\n| topic | before | after |\n|---|---|---|\n"
                                   "| t1 | 0.41 | 0.83 |\n")
    adapter = run / "adapters" / "u1" / "c1" / "t1" / "sft_adapter"
    _adapter(tiny_llama, adapter, seed=3)
    r = CliRunner().invoke(cli, ["fuse", "--model", str(tiny_llama), "--adapter", str(adapter),
                                 "-o", str(tmp_path / "out"), "--push-to-hub", "me/voice-model",
                                 "--private", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "dry run: would create private model repo me/voice-model" in r.output
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert f"  {f}  (" in r.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert card in r.output
    assert "library_name: transformers" in card and str(tiny_llama) in card
    assert "| t1 | 0.41 | 0.83 |" in card                     # scores from the run's report
    assert "learning_rate" in card and "sft_examples" in card  # training settings, data
    assert "hf_NEVERPRINTME" not in r.output


def test_export_peft_cli_compresses_and_dry_runs(tmp_path, tiny_llama):
    _adapter(tiny_llama, tmp_path / "sft", seed=4, targets=("o_proj",))
    r = CliRunner().invoke(cli, ["export", "peft", str(tmp_path / "sft"), "-o", str(tmp_path / "peft"),
                                 "--rank", "1", "--base-model", "org/base-model",
                                 "--push-to-hub", "me/voice-lora", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "SVD to rank 1: relative error max" in r.output
    assert "adapter_model.safetensors" in r.output and "adapter_config.json" in r.output
    assert "base_model: org/base-model" in r.output and "library_name: peft" in r.output
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and cfg["base_model_name_or_path"] == "org/base-model"


def test_cli_reports_unsupported_peft_feature_as_one_line_error(tmp_path, tiny_llama):
    _adapter(tiny_llama, tmp_path / "sft", seed=5, targets=("o_proj",))
    runner = CliRunner()
    assert runner.invoke(cli, ["export", "peft", str(tmp_path / "sft"), "-o",
                               str(tmp_path / "peft")]).exit_code == 0
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dora": True}))
    r = runner.invoke(cli, ["import", "peft", str(tmp_path / "peft"), "-o", str(tmp_path / "back")])
    assert r.exit_code == 1
    assert "error:" in r.output and "DoRA" in r.output and "Traceback" not in r.output


def test_outputs_never_replace_their_inputs_or_unrelated_directories(tmp_path, tiny_llama):
    _adapter(tiny_llama, tmp_path / "sft", seed=6, targets=("o_proj",))
    with pytest.raises(MindprintError, match="is \\(or contains\\) the input"):
        fuse(tiny_llama, tmp_path / "sft", tiny_llama)
    with pytest.raises(MindprintError, match="is \\(or contains\\) the input"):
        export_peft(tmp_path / "sft", tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "diary.txt").write_text("precious")
    with pytest.raises(MindprintError, match="refusing to replace"):
        export_peft(tmp_path / "sft", tmp_path / "notes")
    assert (tmp_path / "notes" / "diary.txt").read_text() == "precious"
    assert (tiny_llama / "config.json").is_file()


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    from mindprint_mlx.export import push_to_hub

    calls = []

    class FakeApi:       # stands in for the network only
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "README.md").write_text("card")
    (tmp_path / "adapter_config.json").write_text("{}")
    url = push_to_hub(tmp_path, "me/voice", private=True, echo=lambda s: None)
    assert url == "https://huggingface.co/me/voice"
    assert calls[0] == ("create_repo", "me/voice", {"private": True, "exist_ok": True,
                                                    "repo_type": "model"})
    assert calls[1][0] == "upload_folder" and calls[1][2]["folder_path"] == str(tmp_path)
    with pytest.raises(MindprintError, match="user/name"):
        push_to_hub(tmp_path, "not a repo", dry_run=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MindprintError, match="HF_HUB_OFFLINE"):
        push_to_hub(tmp_path, "me/voice")
