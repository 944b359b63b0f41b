"""Reading what the trainers take from files: prompts, and the base with its frozen adapters.

One JSONL reader (`jsonl_records`) and one prompt rule (`prompt_of`) for every command and
for the library's standalone runs (`ppo.run`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import MindprintError


def load_base(model_ref: str, quantize: int | None, sft_adapter: str | None, adapters: list[str]):
    """The base in memory plus the frozen adapters, active: the reference policy."""
    from ..models import load, lora
    from ..models.adapters import load_adapter

    model, tok = load(model_ref, quantize=quantize)
    frozen = []
    for i, d in enumerate(([sft_adapter] if sft_adapter else []) + list(adapters)):
        frozen.append(load_adapter(model, d, name="sft" if i == 0 and sft_adapter else f"frozen{i}",
                                   trainable=False))
    lora.set_active(model, frozen)
    return model, tok, frozen


def jsonl_records(path: Path, parse: Callable[[dict, str], object]) -> list:
    """`parse(record, "FILE:LINE")` of each non-blank line of the JSONL file `path`; a line
    that is not one JSON object, or a file with none, is a one-line error naming the file
    (and the line)."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MindprintError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise MindprintError(f"{path}:{n}: expected a JSON object")
        out.append(parse(rec, f"{path}:{n}"))
    if not out:
        raise MindprintError(f"{path}: no records")
    return out


def prompt_of(rec: dict, where: str):
    """A JSONL record's prompt: its 'prompt' (a non-empty string or a list of {role, content}
    messages), or else its 'messages' without the trailing assistant turn (the answer)."""
    if "prompt" in rec:
        p = rec["prompt"]
    elif "messages" in rec:
        p = rec["messages"]
        while isinstance(p, list) and p and isinstance(p[-1], dict) and p[-1].get("role") == "assistant":
            p = p[:-1]
    else:
        raise MindprintError(f"{where}: needs a 'prompt' or 'messages' key "
                             f"(has: {', '.join(sorted(rec)) or 'none'})")
    ok = isinstance(p, str) and p.strip() or isinstance(p, list) and p and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in p)
    if not ok:
        raise MindprintError(f"{where}: the prompt must be a non-empty string or a list of "
                             "{role, content} messages")
    return p


def load_prompts(path: str | Path, text_lines: bool = False) -> list:
    """Prompts from a data directory (its SFT records' prompts), a JSONL file ({"prompt": ...}
    or {"messages": [...]} a line), or, with `text_lines`, a file not named *.jsonl holding
    one prompt per line."""
    p = Path(path)
    if p.is_dir():
        from ..data import load_data_dir

        prompts = [list(r.prompt) for r in load_data_dir(p, require=("sft",)).sft]
        if not prompts:
            raise MindprintError(f"{p}: no SFT records to take prompts from")
        return prompts
    if not p.is_file():
        raise MindprintError(f"prompts file not found: {p}")
    if text_lines and p.suffix != ".jsonl":
        prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not prompts:
            raise MindprintError(f"{p}: no prompts")
        return prompts
    return jsonl_records(p, prompt_of)
