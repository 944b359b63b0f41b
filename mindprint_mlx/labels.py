"""Preference labels on the policy's own answers: pairs of its samples, ranked by a judge.

The person's hand-written pairs teach a reward model what separates their voice from a
neutral one; they do not teach it to rank two answers of the tuned policy, which are both
already half in the voice, and that ranking is all PPO asks of it. Labels on the policy's
own samples do (the on-policy preference data of InstructGPT and its successors). A judge
is any function `judge(prompt: str, response: str) -> float` (higher is better): a person
at a prompt (`mindprint label`), a script that stands in for one (the demo's), or a gold
function in a benchmark. Two answers to the same prompt whose scores differ by at least
`min_gap` become one preference pair; closer ones are a tie and label nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Callable, Sequence

from .errors import MindprintError

Judge = Callable[[str, str], float]
_DOTTED = re.compile(r"^[A-Za-z_][\w.]*$")


def load_judge(spec: str, root: str | Path | None = None) -> Judge:
    """`FILE.py:FUNC` (a file imported by path: absolute, relative to the working directory,
    else to `root`) or `package.module:FUNC` (an importable module) -> the function. Loading
    a file runs its code: a judge is only ever loaded from a spec the user wrote."""
    where, _, name = str(spec).rpartition(":")
    if not where or not name:
        raise MindprintError(f"judge {spec!r}: expected FILE.py:FUNC or package.module:FUNC")
    if where.endswith(".py") or "/" in where or "\\" in where:
        file = Path(where)
        if not file.is_absolute() and not file.exists() and root is not None:
            file = Path(root) / where
        if not file.is_file():
            raise MindprintError(f"judge {spec!r}: {file} not found")
        pkg = Path(__file__).resolve().parent
        if file.resolve().is_relative_to(pkg):      # a module of this package: import it as one
            where = ".".join(("mindprint_mlx",) + file.resolve().relative_to(pkg).with_suffix("").parts)
            return load_judge(f"{where}:{name}")
        mod_spec = importlib.util.spec_from_file_location(f"_mindprint_judge_{file.stem}", file)
        mod = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - the user's file: say which and why
            raise MindprintError(f"judge {spec!r}: importing {file} failed: "
                                 f"{type(e).__name__}: {e}") from None
    elif _DOTTED.match(where):
        try:
            mod = importlib.import_module(where)
        except ImportError as e:
            raise MindprintError(f"judge {spec!r}: cannot import {where}: {e}") from None
    else:
        raise MindprintError(f"judge {spec!r}: {where!r} is neither a .py file nor a module name")
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise MindprintError(f"judge {spec!r}: {where} has no function {name!r}")
    return fn


def user_text(messages: Sequence[dict]) -> str:
    """The last user message of a chat prompt (what a judge is shown as the prompt)."""
    return next(m["content"] for m in reversed(list(messages)) if m["role"] == "user")


def judged_pairs(prompts: Sequence, answers: Sequence[Sequence[str]],
                 scores: Sequence[Sequence[float]], min_gap: float) -> list[tuple]:
    """Every pair of a prompt's answers whose scores differ by at least `min_gap`, the
    higher-scored one chosen: (prompt, chosen, rejected, score chosen, score rejected).
    `answers[j]` / `scores[j]`: prompt j's answers and their scores. Identical answers
    are no pair."""
    out = []
    for p, xs, g in zip(prompts, answers, scores):
        for u in range(len(xs)):
            for v in range(u + 1, len(xs)):
                if abs(g[u] - g[v]) >= min_gap and xs[u].strip() != xs[v].strip():
                    hi, lo = (u, v) if g[u] > g[v] else (v, u)
                    out.append((p, xs[hi], xs[lo], g[hi], g[lo]))
    return out


def score_all(judge: Judge, prompts: Sequence, answers: Sequence[Sequence[str]],
              what: str = "judge") -> list[list[float]]:
    """`judge(user text, answer)` for every answer of every chat prompt; a score that is
    not a finite number is an error naming the judge and the answer."""
    import math

    out = []
    for p, xs in zip(prompts, answers):
        row = []
        for x in xs:
            s = judge(user_text(p), x)
            try:
                s = float(s)
            except (TypeError, ValueError):
                raise MindprintError(f"{what} returned {s!r} (not a number) for {x[:60]!r}") from None
            if not math.isfinite(s):
                raise MindprintError(f"{what} returned {s} for {x[:60]!r}")
            row.append(s)
        out.append(row)
    return out


def label_records(prompts: Sequence, groups: Sequence[dict], answers: Sequence[Sequence[str]],
                  scores: Sequence[Sequence[float]], min_gap: float) -> list[dict]:
    """The judged pairs as preference records in the data directory's JSONL format
    (unit, chapter, topic from `groups[j]`, prompt as messages, chosen, rejected): a labels
    file is read like preference_data.jsonl, and a person can read and edit it."""
    out = []
    for p, g, xs, s in zip(prompts, groups, answers, scores):
        for _, chosen, rejected, _, _ in judged_pairs([p], [xs], [s], min_gap):
            out.append({**{k: g[k] for k in ("unit", "chapter", "topic") if k in g},
                        "prompt": [dict(m) for m in p], "chosen": chosen, "rejected": rejected})
    return out


def sample_answers(model, tokenizer, prompts: Sequence, n: int, max_tokens: int,
                   temperature: float, top_p: float = 1.0, seed: int = 0,
                   salt: int = 6151) -> list[list[str]]:
    """`n` answers to every chat prompt, sampled with the model's active adapters; answer k
    of the batch that starts at prompt i draws from key (seed, salt, k, i): the same on a
    rerun and on every rank, and different uses (labels, contrast pairs) pass different
    salts. Returns answers[prompt][k]."""
    import mlx.core as mx

    from .evaluate import sampled_answers

    draws = [sampled_answers(model, tokenizer, prompts, max_tokens, temperature, top_p,
                             key_of=lambda i, k=k: mx.random.key(seed * 1000 + salt + k * 7919 + i))
             for k in range(n)]
    return [list(xs) for xs in zip(*draws)]


def practice_prompts(topics) -> tuple[list, list[dict]]:
    """The topics' practice prompts (the prompts PPO samples on, never the quiz's) and
    each one's unit, chapter and topic, in the topics' order."""
    from .pipeline.phases import ppo_prompts

    prompts, groups = [], []
    for t in topics:
        for p in ppo_prompts(t):
            prompts.append(p)
            groups.append({"unit": t.unit, "chapter": t.chapter, "topic": t.name})
    return prompts, groups
