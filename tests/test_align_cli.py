"""`mindprint dpo`, `mindprint ditto` and `mindprint grpo [--method rloo]` on a tiny model:
they train, resume, and turn bad input into one-line errors."""

import json

import mlx.core as mx
import yaml
from click.testing import CliRunner

from mindprint_mlx.cli import cli
from mindprint_mlx.io import read_jsonl
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter
from mindprint_mlx.models.heads import ScalarHead, hidden_size


def artefacts(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    mx.random.seed(0)
    lora.apply_lora(model, "sft", r=2, alpha=4.0, trainable=False)
    for _, m in lora.lora_layers(model):
        m.adapters["sft"].lora_b = 0.2 * mx.random.normal(m.adapters["sft"].lora_b.shape)
    save_adapter(model, "sft", tmp_path / "sft_adapter")
    lora.apply_lora(model, "reward", r=1, alpha=1.0)
    save_adapter(model, "reward", tmp_path / "rm",
                 heads={"reward": ScalarHead(hidden_size(model), zero_init=False)})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "hi there", "chosen": "well hello friend", "rejected": "no"},
        {"prompt": [{"role": "user", "content": "a boat"}], "chosen": "it floats", "rejected": "what"}]))
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "hi there", "completion": "well hello friend"},
        {"messages": [{"role": "user", "content": "a boat"}, {"role": "assistant", "content": "it floats"}]}]))
    return pairs, demos


def write(tmp_path, name, body):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(body))
    return str(p)


def test_dpo_and_ditto_commands_train_resume_and_report_bad_input(tiny_llama, tmp_path):
    pairs, demos = artefacts(tiny_llama, tmp_path)
    common = {"model": str(tiny_llama), "sft_adapter": str(tmp_path / "sft_adapter")}
    cfg = write(tmp_path, "dpo", {**common, "pairs": str(pairs), "out_dir": str(tmp_path / "dpo"),
                                  "dpo": {"steps": 2, "batch_size": 2, "progress": False}})
    r = CliRunner().invoke(cli, ["dpo", "-c", cfg])
    assert r.exit_code == 0, r.output
    assert "DPO: 2 steps" in r.output and "peak memory" in r.output
    assert (tmp_path / "dpo" / "dpo_adapter" / "adapters.safetensors").is_file()
    r = CliRunner().invoke(cli, ["dpo", "-c", cfg, "--resume", "dpo.steps=3"])
    assert r.exit_code == 0, r.output
    assert [x["step"] for x in read_jsonl(tmp_path / "dpo" / "metrics.jsonl")] == [1, 2, 3]
    r = CliRunner().invoke(cli, ["dpo", "-c", cfg, "dpo.beta=nan"])
    assert r.exit_code == 1 and "beta" in r.output and len(r.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    r = CliRunner().invoke(cli, ["dpo", "-c", cfg, f"pairs={bad}"])
    assert r.exit_code == 1 and "bad.jsonl:1" in r.output and "'rejected'" in r.output

    cfg = write(tmp_path, "ditto", {**common, "demos": str(demos), "out_dir": str(tmp_path / "ditto"),
                                    "ditto": {"rounds": 2, "steps": 1, "batch_size": 2,
                                              "max_new_tokens": 4, "progress": False}})
    r = CliRunner().invoke(cli, ["ditto", "-c", cfg])
    assert r.exit_code == 0, r.output
    assert "DITTO (2 rounds): 2 steps" in r.output
    r = CliRunner().invoke(cli, ["ditto", "-c", cfg, "ditto.samples_per_prompt=0"])
    assert r.exit_code == 1 and "samples_per_prompt" in r.output


def test_grpo_command_runs_grpo_and_rloo(tiny_llama, tmp_path):
    pairs, demos = artefacts(tiny_llama, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi there"}) + "\n" + json.dumps({"prompt": "a boat"}) + "\n")
    cfg = write(tmp_path, "grpo", {"model": str(tiny_llama), "sft_adapter": str(tmp_path / "sft_adapter"),
                                   "prompts": str(prompts), "reward_model": str(tmp_path / "rm"),
                                   "out_dir": str(tmp_path / "g"),
                                   "grpo": {"steps": 2, "batch_size": 2, "group_size": 2,
                                            "max_new_tokens": 3, "progress": False}})
    r = CliRunner().invoke(cli, ["grpo", "-c", cfg])
    assert r.exit_code == 0, r.output
    assert "GRPO: 2 steps" in r.output and (tmp_path / "g" / "grpo_adapter").is_dir()
    r = CliRunner().invoke(cli, ["grpo", "-c", cfg, "--method", "rloo", f"out_dir={tmp_path / 'r'}"])
    assert r.exit_code == 0, r.output
    assert "RLOO: 2 steps" in r.output and (tmp_path / "r" / "rloo_adapter").is_dir()
    r = CliRunner().invoke(cli, ["grpo", "-c", cfg, "grpo.group_size=1"])
    assert r.exit_code == 1 and "group_size" in r.output
    r = CliRunner().invoke(cli, ["grpo", "-c", cfg, f"reward_model={tmp_path / 'nope'}"])
    assert r.exit_code == 1 and "nope" in r.output and len(r.output.strip().splitlines()) == 1
