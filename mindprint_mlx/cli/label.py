"""`mindprint label`: rank pairs of a run's own answers, for the next run's reward model."""

from __future__ import annotations

from pathlib import Path

import click

CHOICES = {"1": 0, "2": 1, "t": None, "s": None}


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Labels file to append to (default: RUN_DIR/labels/my_labels.jsonl); "
                   "prompts already in it are skipped, so a stopped session goes on.")
@click.option("--judge", default=None,
              help="FILE.py:FUNC or package.module:FUNC, FUNC(prompt, answer) -> score: label "
                   "without asking (every pair of --samples answers whose scores differ).")
@click.option("--samples", default=2, show_default=True, type=click.IntRange(2),
              help="With --judge: answers a prompt (without, you are shown two).")
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0.0, min_open=True),
              help="Sampling temperature of the answers.")
@click.option("--max-tokens", default=None, type=click.IntRange(1),
              help="Answer length (default: the run's ppo.max_new_tokens).")
@click.option("--min-gap", default=0.05, show_default=True, type=click.FloatRange(0.0),
              help="With --judge: scores closer than this are a tie.")
@click.option("--limit", default=None, type=click.IntRange(1), help="Label at most this many prompts.")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
def label(run_dir, out, judge, samples, temperature, max_tokens, min_gap, limit, seed):
    """Show pairs of the run's final adapter's answers to its practice prompts and record
    which one sounds more like you (or let --judge decide). The labels file holds
    preference records in preference_data.jsonl's format: give it to the next run as
    reward.labels.file and its reward model learns to rank the policy's own answers."""
    from ..errors import MindprintError
    from ..io import append_jsonl, read_json_object, read_jsonl
    from ..labels import label_records, load_judge, practice_prompts, sample_answers, score_all, user_text
    from ..pipeline.config import load_pipeline_config
    from ..pipeline.merge import load_final
    from ..pipeline.plan import load_curriculum

    if not (run_dir / "run.json").is_file():
        raise MindprintError(f"{run_dir}: not a pipeline run directory (no run.json)")
    cfg = load_pipeline_config(None, base=read_json_object(run_dir / "run.json")["config"])
    _, curriculum = load_curriculum(cfg)
    prompts, groups = practice_prompts(curriculum.topics)
    out = out or run_dir / "labels" / "my_labels.jsonl"
    done = {(r.get("topic"), user_text(r["prompt"]) if isinstance(r.get("prompt"), list) else r.get("prompt"))
            for r in (read_jsonl(out) if out.is_file() else [])}
    todo = [i for i, (p, g) in enumerate(zip(prompts, groups)) if (g["topic"], user_text(p)) not in done]
    if limit:
        todo = todo[:limit]
    if not todo:
        click.echo(f"nothing to label: every practice prompt of {run_dir} is in {out}")
        return
    fn = load_judge(judge) if judge else None
    model, tok, _ = load_final(run_dir, {})
    max_tokens = max_tokens or cfg.ppo.max_new_tokens
    click.echo(f"{len(todo)} prompts to label -> {out}")
    n_pairs = 0
    for j, i in enumerate(todo):
        answers = sample_answers(model, tok, [prompts[i]], samples if fn else 2, max_tokens,
                                 temperature, cfg.ppo.top_p, seed * 100003 + i)
        if fn is not None:
            scores = score_all(fn, [prompts[i]], answers, f"judge {judge}")
        else:
            choice = _ask(j + 1, len(todo), groups[i], user_text(prompts[i]), answers[0])
            if choice is None:
                break
            scores = [choice]
        recs = label_records([prompts[i]], [groups[i]], answers, scores, min_gap)
        for r in recs:
            append_jsonl(out, r)
        n_pairs += len(recs)
    click.echo(("" if fn else "\n") + f"{n_pairs} pair{'' if n_pairs == 1 else 's'} written to {out}; "
               f"train on them with -s reward.labels.file={out}")


def _ask(k: int, n: int, group: dict, prompt: str, pair: list[str]) -> list[float] | None:
    """Show one prompt and two answers; the person's choice as scores for label_records:
    [1, 0] or [0, 1], [0, 0] for a tie or a skip (no pair), None to stop."""
    click.secho(f"\n[{k}/{n}] {group['topic']}: {prompt}", bold=True)
    for m, a in enumerate(pair, 1):
        click.echo(f"  {m}) {a.strip() or '(empty)'}")
    while True:
        c = click.prompt("which sounds more like you? 1, 2, t (tie), s (skip), q (quit)",
                         default="s", show_default=False).strip().lower()
        if c == "q":
            return None
        if c in CHOICES:
            pick = CHOICES[c]
            return [0.0, 0.0] if pick is None else [1.0 if m == pick else 0.0 for m in range(2)]
