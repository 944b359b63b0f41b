"""What the training and evaluation commands share: loading the base once with its frozen
adapters, and reading prompts, pairs or demonstrations from JSONL or a data dir (one JSONL
reader, one prompt rule)."""

from __future__ import annotations

from pathlib import Path

from ..data.prompts import jsonl_records, load_base, load_prompts, prompt_of  # noqa: F401 (the CLI's names)
from ..errors import MindprintError


def _text(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise MindprintError(f"{where}: '{key}' must be a non-empty string "
                             f"(the record has: {', '.join(sorted(rec)) or 'nothing'})")
    return v


def load_pairs(path: str | Path) -> list:
    """Preference pairs: a data dir's preference records, or JSONL {prompt, chosen, rejected}."""
    p = Path(path)
    if p.is_dir():
        from ..data import load_data_dir

        return list(load_data_dir(p, require=("preference",)).preference)
    if not p.is_file():
        raise MindprintError(f"pairs file not found: {p}")
    return jsonl_records(p, lambda r, w: (prompt_of(r, w), _text(r, "chosen", w),
                                          _text(r, "rejected", w)))


def load_demos(path: str | Path) -> list:
    """Demonstrations: a data dir's SFT records, or JSONL {prompt, completion} or
    {messages: [..., assistant]}."""
    p = Path(path)
    if p.is_dir():
        from ..data import load_data_dir

        return list(load_data_dir(p, require=("sft",)).sft)
    if not p.is_file():
        raise MindprintError(f"demonstrations file not found: {p}")

    def parse(r: dict, w: str):
        if "messages" in r and isinstance(r["messages"], list) and r["messages"]:
            msgs = r["messages"]
            last = msgs[-1]
            if not (isinstance(last, dict) and last.get("role") == "assistant"):
                raise MindprintError(f"{w}: the last message must be the assistant's answer")
            return prompt_of({"prompt": msgs[:-1]}, w), _text(last, "content", w)
        return prompt_of(r, w), _text(r, "completion", w)
    return jsonl_records(p, parse)


def summary(what: str, result, base_bytes: int, peak_key: str, first: float, last: float,
            name: str) -> list[str]:
    h = result.history[-1] if result.history else {}
    return [f"{what}: {result.steps} steps; {name} {first:.4g} -> {last:.4g}; peak memory "
            f"{h.get(peak_key, 0) / 2**20:.1f} MiB (base weights {base_bytes / 2**20:.1f} MiB)",
            f"adapter: {result.adapter_dir}"]
