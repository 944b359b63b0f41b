"""Model cards (README.md) for exported adapters and fused checkpoints.

Written from what mindprint knows: the adapter's mindprint.json (base model, rank,
targets, training settings, data summary) and, when given or found above the adapter,
the run's report.md (scores per topic). Nothing secret goes in: no paths to tokens, no
environment.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import MindprintError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_REPORT_LINES = 200
KINDS = ("peft", "reward", "fused")


def find_report(start: str | Path, levels: int = 6) -> Path | None:
    """The run's report.md in `start` or one of its parents (an adapter lives inside its
    run directory: run/adapters/unit/chapter/topic/sft_adapter)."""
    p = Path(start).resolve()
    for _ in range(levels):
        if (p / "report.md").is_file():
            return p / "report.md"
        if p.parent == p:
            break
        p = p.parent
    return None


def _report_section(report: Path) -> str:
    if report.suffix == ".json":
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MindprintError(f"{report}: cannot read report ({e})") from None
        rows = [(k, v) for k, v in _flatten(data)
                if isinstance(v, (int, float)) and not isinstance(v, bool)
                and re.search(r"score|acc|loss|reward|pass", k, re.I)]
        if not rows:
            return "_The report holds no scores._\n"
        return "| metric | value |\n|---|---|\n" + "".join(
            f"| {k} | {v:.4g} |\n" for k, v in rows[:100])
    try:
        lines = report.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MindprintError(f"{report}: cannot read report ({e})") from None
    # demote the report's headings below the card's own
    lines = [("##" + ln) if ln.startswith("#") else ln for ln in lines]
    if len(lines) > _MAX_REPORT_LINES:
        lines = lines[:_MAX_REPORT_LINES] + [f"... ({len(lines) - _MAX_REPORT_LINES} more lines "
                                             "in the run's report.md)"]
    return "\n".join(lines) + "\n"


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}{k}/" if isinstance(v, (dict, list)) else f"{prefix}{k}")
        return out
    if isinstance(obj, list):
        out = []
        for i, v in enumerate(obj):
            out += _flatten(v, f"{prefix}{i}/" if isinstance(v, (dict, list)) else f"{prefix}{i}")
        return out
    return [(prefix.rstrip("/"), obj)]


def _yaml_list(items: list[str]) -> str:
    return "".join(f"- {json.dumps(i)}\n" for i in items)


def _settings_lines(obj: Any, indent: str = "") -> str:
    if not isinstance(obj, dict):
        return f"{indent}- {obj}\n"
    out = ""
    for k, v in obj.items():
        if isinstance(v, dict):
            out += f"{indent}- **{k}**:\n" + _settings_lines(v, indent + "  ")
        else:
            out += f"{indent}- {k}: `{json.dumps(v, default=str)}`\n"
    return out


def model_card(kind: str, meta: dict, *, base_model: str | None, repo_id: str | None = None,
               report: str | Path | None = None, details: dict | None = None) -> str:
    """README.md text. kind: "peft" (causal-LM LoRA), "reward" (SEQ_CLS) or "fused".
    meta: the adapter's mindprint.json; details: extra facts (rank, SVD error, ...)."""
    if kind not in KINDS:
        raise MindprintError(f"model card kind must be one of {', '.join(KINDS)}, got {kind!r}")
    hub_base = base_model if base_model and _HUB_ID.match(base_model) else None
    front = "---\n"
    if hub_base:
        front += f"base_model: {hub_base}\n"
    front += ("library_name: peft\n" if kind in ("peft", "reward") else "library_name: transformers\n")
    front += "pipeline_tag: " + ("text-classification" if kind == "reward" else "text-generation") + "\n"
    tags = ["mindprint", "mlx", "lora"] + (["reward-model", "seq-cls"] if kind == "reward" else []) \
        + (["peft"] if kind != "fused" else [])
    front += "tags:\n" + _yaml_list(tags) + "---\n\n"

    title = repo_id or meta.get("adapter_name") or "mindprint model"
    what = {"peft": "a LoRA adapter (PEFT format)",
            "reward": "a reward model: LoRA adapter + scalar `score` head (PEFT `SEQ_CLS`)",
            "fused": "a full checkpoint: the base model with a LoRA adapter folded in"}[kind]
    body = f"# {title}\n\n{what}, trained with mindprint-mlx on Apple " \
           f"silicon (MLX) and exported to the Hugging Face format.\n\n"
    body += f"- base model: `{base_model or 'unknown'}`\n"
    for key, label in (("r", "LoRA rank"), ("lora_alpha", "LoRA alpha"), ("targets", "target modules"),
                       ("layers", "layers"), ("adapter_name", "adapter"), ("created", "trained")):
        if meta.get(key) is not None:
            body += f"- {label}: `{json.dumps(meta[key], default=str)}`\n"
    for key in ("role", "phase", "unit", "chapter", "topic", "topics", "units", "composition",
                "stack", "epoch", "steps", "train_loss", "eval_loss", "val_loss", "val_accuracy"):
        if meta.get(key) not in (None, [], ""):
            body += f"- {key.replace('_', ' ')}: `{json.dumps(meta[key], default=str)}`\n"
    for k, v in (details or {}).items():
        body += f"- {k}: {v}\n"

    body += "\n## Usage\n\n```python\n"
    ref = repo_id or "PATH_TO_THIS_DIRECTORY"
    b = base_model or "BASE_MODEL"
    if kind == "peft":
        body += ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 "from peft import PeftModel\n\n"
                 f"base = AutoModelForCausalLM.from_pretrained({b!r})\n"
                 f"model = PeftModel.from_pretrained(base, {ref!r})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({b!r})\n")
    elif kind == "reward":
        body += ("import torch\n"
                 "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
                 "from peft import PeftModel\n\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({b!r})\n"
                 f"base = AutoModelForSequenceClassification.from_pretrained({b!r}, num_labels=1)\n"
                 "# the score is read at the last token that is not pad_token_id: never pad with EOS\n"
                 "pad = tokenizer.pad_token_id\n"
                 "if pad is None or pad == tokenizer.eos_token_id:\n"
                 "    pad = 0 if tokenizer.eos_token_id != 0 else 1\n"
                 "base.config.pad_token_id = pad\n"
                 f"model = PeftModel.from_pretrained(base, {ref!r}).eval()\n\n"
                 "messages = [{\"role\": \"user\", \"content\": \"How was your weekend?\"}]\n"
                 "answer = \"Quiet, and good: a long walk and a book.\"\n"
                 "# mindprint's layout: chat prompt + answer tokens + EOS\n"
                 "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,\n"
                 "                                    return_dict=True)[\"input_ids\"]\n"
                 "ids = list(ids) + tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]\n"
                 "with torch.no_grad():\n"
                 "    score = model(torch.tensor([ids])).logits[0, 0].item()\n")
    else:
        body += ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                 f"model = AutoModelForCausalLM.from_pretrained({ref!r})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({ref!r})\n")
    body += "```\n"

    training = {k: meta[k] for k in ("training_config", "training", "config", "train_config",
                                     "settings")
                if meta.get(k)}
    if training:
        body += "\n## Training settings\n\n" + "".join(_settings_lines(v) for v in training.values())
    data = {k: meta[k] for k in ("data", "data_summary", "data_hash", "data_hashes", "curriculum")
            if meta.get(k)}
    if data:
        body += "\n## Data\n\n" + _settings_lines(data)
    if report is not None:
        body += "\n## Evaluation (from the run's report)\n\n" + _report_section(Path(report))
    return front + body
