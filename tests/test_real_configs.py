"""configs/real/*.yaml (Qwen 2.5 7B, Llama 3.1 8B, Gemma 3 12B, all mlx-community 4-bit) load
as pipeline configs, and `mindprint plan` on each, from the architecture-only config.json in
tests/fixtures/real_shapes/, prints exactly the figures docs/real-models.md shows. Offline:
no weights, no hub."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mindprint_mlx import memory
from mindprint_mlx.pipeline.config import load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "real-models.md"
# config name -> (hub id, model_type, decoder layers, parameters in millions as plan prints them)
REAL = {
    "qwen2.5-7b": ("mlx-community/Qwen2.5-7B-Instruct-4bit", "qwen2", 28, "7615.6"),
    "llama3.1-8b": ("mlx-community/Meta-Llama-3.1-8B-Instruct-4bit", "llama", 32, "8030.3"),
    "gemma3-12b": ("mlx-community/gemma-3-12b-it-4bit", "gemma3", 48, "11766.0"),
}


def _plan_cmd(name: str) -> list[str]:
    return ["plan", "--model", f"tests/fixtures/real_shapes/{name}",
            "--config", f"configs/real/{name}.yaml", "--memory-gb", "64"]


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_loads(name):
    hub_id, *_ = REAL[name]
    cfg = load_pipeline_config(ROOT / "configs" / "real" / f"{name}.yaml")
    assert cfg.model == hub_id and cfg.quantize is None
    assert cfg.sft.max_seq_length == cfg.reward.train.max_seq_length == 1024
    assert 8 <= cfg.sft.lora_rank <= 16
    # the planner plans sft.batch_size; the adaptive plan never picks a larger one
    assert cfg.adaptive.max_batch_size == cfg.sft.batch_size
    assert cfg.reward.train.grad_checkpoint        # 2x rows: needed on all three


@pytest.mark.parametrize("name", sorted(REAL))
def test_shape_fixture_is_the_real_architecture(name):
    hub_id, model_type, layers, params = REAL[name]
    shape = memory.model_shape(ROOT / "tests" / "fixtures" / "real_shapes" / name)
    assert (shape.model_type, shape.num_layers, shape.quantized_bits) == (model_type, layers, 4)
    assert f"{shape.n_params / 1e6:.1f}" == params


@pytest.mark.parametrize("name", sorted(REAL))
def test_doc_shows_the_planners_figures(name, monkeypatch):
    """The output block under the command in docs/real-models.md is what the command prints
    (less its last line, the final adapter's size, which needs the data)."""
    from mindprint_mlx.cli import cli

    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(cli, _plan_cmd(name))
    assert res.exit_code == 0, res.output
    out = res.output.split("\nfinal adapter:")[0].rstrip("\n")
    assert "a 64 GiB machine: 48.00 GiB usable" in out
    verdicts = re.findall(r"^(sft|reward|ppo): [\d.]+ GiB (fits|does NOT fit)", out, flags=re.M)
    assert verdicts == [("sft", "fits"), ("reward", "fits"), ("ppo", "fits")]
    doc = DOC.read_text(encoding="utf-8")
    block = re.search(r"```\n\$ mindprint " + re.escape(" ".join(_plan_cmd(name))) + r"\n(.*?)```",
                      doc, flags=re.S)
    assert block, f"docs/real-models.md has no output block for {name}"
    shown = block.group(1).rstrip("\n")
    assert shown == out, "docs/real-models.md is stale: paste the command's output again"


def test_gemma3_vision_language_layout_loads_as_text(tmp_path):
    """mlx-community/gemma-3-*-it checkpoints are Gemma3ForConditionalGeneration: model_type
    gemma3, the text model under text_config and language_model.* weights. mlx-lm loads the
    text part; LoRA goes on its decoder layers and the planner counts what load() keeps."""
    from mindprint_mlx.models import load, lora
    from mindprint_mlx.models.tiny import build_tiny_model

    src = build_tiny_model(tmp_path / "text", arch="gemma3_text", chat_template="gemma3")
    dst = tmp_path / "wrapped"
    shutil.copytree(src, dst)
    text = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text, "vocab_size": text["vocab_size"], "eos_token_id": text["eos_token_id"]}))
    for f in dst.glob("model*.safetensors"):
        weights = mx.load(str(f))
        f.unlink()
        mx.save_safetensors(str(dst / f.name), {f"language_model.{k}": v for k, v in weights.items()})
    model, _ = load(dst)
    assert type(model).__module__.endswith(".gemma3")
    assert memory.model_shape(dst).weight_bytes == sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    lora.apply_lora(model, "sft", r=4)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.startswith("language_model.model.layers.") for k in names)
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, text["vocab_size"])
