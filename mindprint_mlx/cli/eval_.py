"""`mindprint eval generations` (BEST / MEDIUM / WORST by the reward model) and `eval quiz`."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _load(model, adapters, reward, quantize):
    from ..models import load, lora
    from ..models.adapters import load_adapter

    mdl, tok = load(model, quantize=int(quantize) if quantize else None)
    names = [load_adapter(mdl, a, name=f"adapter{i}") for i, a in enumerate(adapters)]
    rm = None
    if reward:
        from ..train.reward import RewardModel

        rm = RewardModel.load(mdl, tok, reward)
    lora.set_active(mdl, names)
    return mdl, tok, rm


def _read_prompts(path: str) -> list:
    from ..errors import MindprintError

    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise MindprintError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            p = rec.get("messages") or rec.get("prompt") if isinstance(rec, dict) else rec
            if isinstance(p, list) and p and p[-1].get("role") == "assistant":
                p = p[:-1]
            if not p:
                raise MindprintError(f"{path}:{i}: needs a 'prompt' or 'messages' field")
            out.append(p)
        else:
            out.append(line.strip())
    return out


def _write(obj, out):
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    if out:
        from ..io import atomic_write_text

        atomic_write_text(out, text + "\n")
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text)


_model_opts = [
    click.option("--model", "-m", required=True, help="Base model: local directory or hub id."),
    click.option("--adapter", "-a", "adapters", multiple=True, type=click.Path(exists=True, file_okay=False),
                 help="Adapter directory to stack (repeatable, in order)."),
    click.option("--quantize", type=click.Choice(["4", "8"]), default=None),
    click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1)),
    click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), help="Write JSON here."),
]


def _with(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


@click.group("eval")
def eval_() -> None:
    """Evaluate a model with adapters: ranked generations or the curriculum quiz."""


@eval_.command("generations")
@_with(_model_opts)
@click.option("--reward", "-r", required=True, type=click.Path(exists=True, file_okay=False),
              help="Reward model directory (run_dir/reward_model).")
@click.option("--prompt", "-p", "prompts", multiple=True, help="A user prompt (repeatable).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False),
              help="Prompts: .jsonl with prompt/messages, or one prompt per line.")
@click.option("-k", default=4, show_default=True, type=click.IntRange(1), help="Completions per prompt.")
@click.option("--temp", default=0.8, show_default=True, type=click.FloatRange(0.0))
@click.option("--seed", default=0, show_default=True, type=int)
def generations(model, adapters, quantize, max_tokens, out, reward, prompts, prompts_file, k, temp, seed):
    """N prompts x K sampled completions, scored by the reward model, ranked BEST/MEDIUM/WORST."""
    from ..errors import MindprintError
    from ..evaluate import evaluate_generations

    items = list(prompts) + (_read_prompts(prompts_file) if prompts_file else [])
    if not items:
        raise MindprintError("give --prompt or --prompts-file")
    mdl, tok, rm = _load(model, adapters, reward, quantize)
    res = evaluate_generations(mdl, tok, rm, items, k=k, max_tokens=max_tokens, temp=temp, seed=seed)
    _write(res, out)
    for p in res["prompts"]:
        q = p["prompt"][-1]["content"]
        click.echo(f"\n> {q[:70]}", err=True)
        for tag in ("BEST", "MEDIUM", "WORST"):
            c = p[tag]
            click.echo(f"  {tag:<6} {c['score']:+.3f}  {c['text'][:70]!r}", err=True)


@eval_.command("quiz")
@_with(_model_opts)
@click.option("--data", "-d", "data_dir", required=True,
              help="Curriculum data directory ('demo': the packaged demo curriculum).")
@click.option("--reward", "-r", default=None, type=click.Path(exists=True, file_okay=False),
              help="Reward model directory (without it the preference part is left out).")
@click.option("--units", multiple=True, help="Only these units.")
@click.option("--topics", multiple=True, help="Only these topics.")
@click.option("--max-questions", default=16, show_default=True, type=click.IntRange(1))
def quiz(model, adapters, quantize, max_tokens, out, data_dir, reward, units, topics, max_questions):
    """Quiz score per topic (preference, markers, overlap parts; see README)."""
    from ..data import load_data_dir
    from ..data.curriculum import build_curriculum
    from ..pipeline.phases import topic_quiz_items, topic_target_density
    from ..evaluate import evaluate_quiz

    if data_dir == "demo":
        from ..demo import DEMO_CURRICULUM_DIR

        data_dir = DEMO_CURRICULUM_DIR
    ds = load_data_dir(data_dir)
    cur = build_curriculum(ds, units=list(units) or None, topics=list(topics) or None)
    mdl, tok, rm = _load(model, adapters, reward, quantize)
    markers = list(getattr(ds.persona, "voice_markers", []) or [])
    res = {}
    for t in cur.topics:
        items = topic_quiz_items(t, max_questions)
        if not items:
            continue
        q = evaluate_quiz(mdl, tok, items, markers=markers, target_density=topic_target_density(t, markers),
                          reward=rm, max_tokens=max_tokens)
        res[t.key] = {**q.summary(), "items": q.items}
        click.echo(f"{t.key:<40} {q.score:.3f}  " + ", ".join(f"{k} {v:.3f}" for k, v in q.parts.items()),
                   err=True)
    _write(res, out)
