"""report.md and metrics CSV from state.json and metrics/*.jsonl."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import atomic_write_text, read_jsonl


def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def topic_rows(state: dict) -> list[dict]:
    """One summary row per planned topic, in plan order: its quiz after SFT, after its
    refine method (PPO, GRPO, RLOO, DPO or DITTO; `method`), after its unit's merge and in the final adapter. Once the final adapter is graded,
    pass/fail is its verdict (what the user takes home), not the topic's own."""
    merged = {v["key"]: v.get("merged") for u in state.get("units", {}).values()
              for v in u.get("verify", [])}
    shipped = state.get("final_eval") or {}
    rows = []
    for p in state.get("plan", []):
        rec = state.get("topics", {}).get(p["key"], {})
        ph = rec.get("phases", {})
        quiz, ppo, final = ph.get("quiz") or {}, ph.get("ppo") or {}, ph.get("final") or {}
        fin = shipped.get(p["key"])
        if not p["plan"]["trainable"]:
            status = "skipped"
        elif fin is not None:
            status = "pass" if fin.get("passed") else "fail"
        elif final.get("done"):
            status = "pass" if final.get("passed") else "fail"
        else:
            status = "not run"
        ppo_ran = bool(ppo.get("done")) and not ppo.get("skipped")
        rows.append({
            "key": p["key"], "unit": p["unit"], "status": status,
            "threshold": p["plan"]["pass_threshold"],
            "before": quiz.get("score"), "after": final.get("score") if ppo_ran else None,
            "final": final.get("score"), "merged": merged.get(p["key"]),
            "shipped": fin.get("score") if fin else None, "graded": "final adapter" if fin else "topic",
            "ppo": ("ran" if ppo_ran else ("skipped" if ppo.get("skipped") else "-")),
            "method": ppo.get("method") or p.get("refine_method") or "ppo",
            "reward_first": ppo.get("mean_score_first"), "reward_last": ppo.get("mean_score_last"),
            "reward_before": ppo.get("reward_before"), "reward_after": ppo.get("reward_after"),
        })
    return rows


def summary_table(state: dict) -> str:
    """The markdown summary table (also printed at the end of a run and the demo)."""
    rows = topic_rows(state)
    out = ["| topic | quiz after SFT | refine | after refine | after unit merge | final adapter "
           "| threshold | mean reward before -> after refine | result |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rw = (f"{_f(r['reward_before'])} -> {_f(r['reward_after'])}" if r["ppo"] == "ran"
              else r["ppo"])
        out.append(f"| {r['key']} | {_f(r['before'])} | {r['method']} | {_f(r['after'])} "
                   f"| {_f(r['merged'])} | {_f(r['shipped'])} | {_f(r['threshold'], '.2f')} | {rw} "
                   f"| {r['status']} |")
    done = [r for r in rows if r["status"] in ("pass", "fail")]
    passed = sum(r["status"] == "pass" for r in done)
    rate = f"{passed}/{len(done)} = {100 * passed / len(done):.0f}%" if done else "n/a"
    shipped = bool(state.get("final_eval"))
    out.append("")
    out.append(f"{'Pass rate of the final adapter' if shipped else 'Pass rate so far (each topic right after its own training; the final adapter is not graded yet)'}: "
               f"{rate} of trained topics ({sum(r['status'] == 'skipped' for r in rows)} skipped, "
               f"{sum(r['status'] == 'not run' for r in rows)} not run yet).")
    m = (state.get("retention") or {}).get("metrics")
    if m and m.get("average") is not None:
        bwt = m.get("backward_transfer")
        out.append(f"Retention: average quiz score {m['average']:.3f}"
                   + (f", backward transfer {bwt:+.3f}, forgetting {m['forgetting']:.3f}" if bwt is not None else "")
                   + (" (final adapter)" if shipped else " (latest row)") + ".")
    return "\n".join(out)


def retention_table(state: dict) -> list[str]:
    """The retention matrix: a row per point in training, a column per topic (numbered)."""
    ret = state.get("retention") or {}
    order, rows = ret.get("order") or [], ret.get("rows") or {}
    if not order:
        return []
    idx = {k: i + 1 for i, k in enumerate(order)}
    lines = ["## Retention (quiz score of each topic as training goes on)", "",
             "Row: the adapters after training that topic (and, last, the final adapter as "
             "saved); column: the topic graded. Topics: "
             + "; ".join(f"T{i} = {k}" for k, i in idx.items()) + ".", "",
             "| after | " + " | ".join(f"T{i}" for i in idx.values()) + " |",
             "|---|" + "---|" * len(idx)]
    for k in order:
        if k in rows:
            lines.append(f"| T{idx[k]} | " + " | ".join(_f(rows[k].get(c)) for c in order) + " |")
    if ret.get("final"):
        lines.append("| final adapter | " + " | ".join(_f(ret["final"].get(c)) for c in order) + " |")
    m = ret.get("metrics") or {}
    if m.get("average") is not None:
        lines += ["", f"Average score {m['average']:.3f}; backward transfer "
                  f"{_f(m.get('backward_transfer'), '+.3f')} (mean change of each topic's score from "
                  f"right after its training to the end); forgetting {_f(m.get('forgetting'))}."]
    return lines + [""]


def render_report(state: dict, config: dict | None = None) -> str:
    lines = ["# mindprint run report", ""]
    if config:
        lines += [f"- model: `{config.get('model')}`", f"- data: `{config.get('data_dir')}`",
                  f"- seed: {config.get('seed')}"]
    rm = state.get("reward_model") or {}
    if rm:
        acc = rm.get("best_val_accuracy")
        lines.append(f"- reward model: `{rm.get('adapter_dir')}`"
                     + (f" (validation accuracy {acc:.2f})" if isinstance(acc, (int, float)) else ""))
    status = "finished" if state.get("finished") else (state.get("stopped") or "in progress")
    judge = state.get("judge_model") or {}
    if judge:
        acc = judge.get("best_val_accuracy")
        lines.append(f"- judge (the quiz's preference part, trained on the other half of the pairs): "
                     f"`{judge.get('adapter_dir')}`"
                     + (f" (validation accuracy {acc:.2f})" if isinstance(acc, (int, float)) else ""))
    dropped = state.get("quiz_repeats_dropped") or {}
    if any(dropped.values()):
        lines.append("- held-out quiz: dropped from training the records that repeat a quiz question: "
                     + ", ".join(f"{n} {k}" for k, n in dropped.items() if n))
    lines += [f"- status: {status}", "", "## Summary", "", summary_table(state), ""]
    lines += retention_table(state)
    units = state.get("units", {})
    if units:
        lines += ["## Units (merge and verify)", "",
                  "| unit | merged adapter | topic | final | after merge | drop | regression |",
                  "|---|---|---|---|---|---|---|"]
        for u, rec in units.items():
            for v in rec.get("verify", []):
                lines.append(f"| {u} | `{rec.get('merged') or '-'}` | {v['key']} | {_f(v.get('final'))} "
                             f"| {_f(v.get('merged'))} | {_f(v.get('drop'))} | "
                             f"{'YES' if v.get('regression') else 'no'} |")
        lines.append("")
    from .merge import report_lines

    lines += report_lines(state)
    lines += ["## Topics", ""]
    for p in state.get("plan", []):
        rec = state.get("topics", {}).get(p["key"], {})
        ph = rec.get("phases", {})
        pl = p["plan"]
        lines.append(f"### {p['key']}")
        lines.append("")
        c = p["counts"]
        lines.append(f"Data: {c['sft']} SFT, {c['preference']} preference, {c['quiz']} quiz, "
                     f"{c['distinctions']} distinctions, {c.get('prompts', 0)} practice prompts.")
        if pl["trainable"]:
            lines.append(f"Adaptive plan: SFT {pl['sft_epochs']} epochs, batch {pl['batch_size']}, "
                         f"lr x{pl['lr_multiplier']:.3g}, pass threshold {pl['pass_threshold']:.2f}.")
        else:
            lines.append("Skipped (not trainable).")
        for r in p["reasons"]:
            lines.append(f"- {r}")
        title_of = (ph.get("ppo") or {}).get("method") or p.get("refine_method") or "ppo"
        title_of = title_of.upper()
        for name, title in (("quiz", "Quiz after SFT"), ("final", f"Quiz after {title_of}" if
                            (ph.get("ppo") or {}).get("adapter") else f"Quiz (no {title_of})"),
                            ("shipped", "Quiz of the final adapter")):
            q = ph.get(name) if name != "shipped" else \
                ({**state["final_eval"][p["key"]], "done": True} if p["key"] in (state.get("final_eval") or {}) else None)
            if q and q.get("done"):
                parts = ", ".join(f"{k} {v:.3f}" for k, v in q.get("parts", {}).items())
                lines.append(f"- {title}: **{q['score']:.3f}** ({parts})")
        ppo = ph.get("ppo")
        if ppo and ppo.get("done"):
            if ppo.get("skipped"):
                lines.append(f"- {title_of} skipped: {ppo.get('reason')}")
            else:
                key = ppo.get("score_key", "objective/scores")
                lines.append(f"- {title_of}: {ppo.get('steps')} steps; mean reward of sampled answers to the "
                             f"topic's prompts {_f(ppo.get('reward_before'))} -> {_f(ppo.get('reward_after'))} "
                             f"(training batches' {key}: first {_f(ppo.get('mean_score_first'))}, last "
                             f"{_f(ppo.get('mean_score_last'))})")
        for name in ("sft", "ppo"):
            a = (ph.get(name) or {}).get("adapter")
            if a:
                label = name if name == "sft" else (ph[name].get("method") or "ppo")
                lines.append(f"- {label} adapter: `{a}`")
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: Path, state: dict, config: dict | None = None) -> Path:
    path = Path(run_dir) / "report.md"
    atomic_write_text(path, render_report(state, config))
    return path


def jsonl_to_csv(jsonl: Path, csv_path: Path) -> Path:
    rows = read_jsonl(jsonl)
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    if "step" in cols:
        cols.remove("step")
        cols.insert(0, "step")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in cols})
    atomic_write_text(csv_path, buf.getvalue())
    return csv_path


def write_metrics_csv(run_dir: Path) -> list[Path]:
    """metrics/X.jsonl -> metrics/X.csv for every metrics file."""
    out = []
    for f in sorted((Path(run_dir) / "metrics").glob("*.jsonl")):
        out.append(jsonl_to_csv(f, f.with_suffix(".csv")))
    return out
