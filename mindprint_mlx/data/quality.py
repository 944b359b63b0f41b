"""Data quality per topic: counts, answer lengths, voice-marker density, preference quality.

Definitions (also in the README):

- words and voice markers are counted by `mindprint_mlx.text` (one rule for the whole
  package): a word is a case-folded run of letters/digits with inner apostrophes kept
  ("don't" is one word); a marker counts where it does not continue a word at either end.
- `marker_coverage` (%): the share of SFT completions that contain at least one marker.
- `markers_per_100_words`: all marker occurrences in SFT completions / all their words * 100.
- `preference_score` in [0, 1], the mean over a topic's preference pairs of
      0.5 * (1 - Jaccard(words(chosen), words(rejected)))       how different the answers are
    + 0.5 * marker_gap                                          which one carries the voice
  where marker_gap is 1 when chosen has more markers per 100 words than rejected, 0.5 when
  equal, 0 when fewer. Without voice markers the score is the Jaccard distance alone. Near 1:
  chosen and rejected clearly differ and chosen carries the voice; near 0: near-identical
  answers, or the rejected one sounds more like the persona.
- `quality_score` in [0, 1]: the mean of the available signals among preference_score and
  marker_coverage / 100 (0.5 when neither is available). The adaptive config scales the
  learning rate with it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ..text import marker_count, marker_density, words
from .curriculum import Curriculum, Topic
from .records import Persona


def jaccard_distance(a: str, b: str) -> float:
    wa, wb = set(words(a)), set(words(b))
    if not wa and not wb:
        return 0.0
    return 1.0 - len(wa & wb) / len(wa | wb)


def pair_score(chosen: str, rejected: str, markers: Sequence[str]) -> float:
    d = jaccard_distance(chosen, rejected)
    markers = [m for m in markers if m.strip()]
    if not markers:
        return d
    mc, mr = marker_density(chosen, markers), marker_density(rejected, markers)
    gap = 1.0 if mc > mr else (0.5 if mc == mr else 0.0)
    return 0.5 * d + 0.5 * gap


@dataclass
class QualityThresholds:
    """Below these a topic is flagged weak (flags do not stop training; adaptive.py decides)."""
    min_sft: int = 8
    min_preference: int = 4
    min_quiz: int = 3
    min_marker_coverage: float = 50.0      # % of completions with a marker
    min_preference_score: float = 0.5
    min_completion_words: float = 8.0      # mean words per completion


@dataclass
class LengthStats:
    mean: float = 0.0
    median: float = 0.0
    min: int = 0
    max: int = 0

    @classmethod
    def of(cls, values: list[int]) -> "LengthStats":
        if not values:
            return cls()
        return cls(float(statistics.fmean(values)), float(statistics.median(values)), min(values),
                   max(values))


@dataclass
class TopicQuality:
    key: str
    rel_dir: str
    n_sft: int
    n_preference: int
    n_quiz: int
    n_distinctions: int
    completion_words: LengthStats
    n_markers: int                          # voice markers defined for the persona
    marker_coverage: float | None           # % of SFT completions with >= 1 marker
    markers_per_100_words: float | None
    preference_score: float | None          # [0, 1]; None without preference pairs
    quality_score: float                    # [0, 1]
    n_duplicates: int = 0
    n_prompts: int = 0                      # practice prompts (prompt_data.jsonl)
    flags: list[str] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)

    @property
    def weak(self) -> bool:
        return bool(self.flags)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weak"] = self.weak
        return d


def topic_quality(topic: Topic, persona: Persona | None = None,
                  thresholds: QualityThresholds | None = None) -> TopicQuality:
    th = thresholds or QualityThresholds()
    markers = [m for m in (persona.voice_markers if persona is not None else []) if m.strip()]
    completions = [r.completion for r in topic.sft]
    lengths = [len(words(c)) for c in completions]
    coverage = per100 = None
    if markers and completions:
        hits = [marker_count(c, markers) for c in completions]
        coverage = 100.0 * sum(1 for h in hits if h > 0) / len(completions)
        total_words = sum(lengths)
        per100 = 100.0 * sum(hits) / total_words if total_words else 0.0
    pref = None
    if topic.preference:
        pref = statistics.fmean(pair_score(p.chosen, p.rejected, markers) for p in topic.preference)
    signals = [s for s in (pref, None if coverage is None else coverage / 100.0) if s is not None]
    quality = statistics.fmean(signals) if signals else 0.5
    seen, dups = set(), 0
    for r in topic.sft:
        k = repr((r.prompt, r.completion))
        dups += k in seen
        seen.add(k)

    q = TopicQuality(topic.key, topic.rel_dir, len(topic.sft), len(topic.preference),
                     len(topic.quiz), len(topic.distinctions), LengthStats.of(lengths), len(markers),
                     coverage, per100, pref, quality, dups, n_prompts=len(topic.prompts))
    _flag(q, th)
    return q


def _flag(q: TopicQuality, th: QualityThresholds) -> None:
    f, r = q.flags, q.recommendations
    if q.n_sft < th.min_sft:
        f.append(f"few SFT examples ({q.n_sft} < {th.min_sft})")
        r.append(f"add at least {th.min_sft - q.n_sft} more SFT examples in the persona's voice")
    if q.n_quiz == 0:
        f.append("no quiz questions")
        r.append(f"add {th.min_quiz} or more quiz questions with reference answers; without a quiz "
                 f"the topic cannot be evaluated")
    elif q.n_quiz < th.min_quiz:
        f.append(f"few quiz questions ({q.n_quiz} < {th.min_quiz})")
        r.append(f"add {th.min_quiz - q.n_quiz} more quiz questions so the pass/fail score is stable")
    if q.n_preference == 0:
        f.append("no preference pairs")
        r.append("add preference pairs: chosen in the voice, rejected generic or wrong")
    elif q.n_preference < th.min_preference:
        f.append(f"few preference pairs ({q.n_preference} < {th.min_preference})")
        r.append(f"add {th.min_preference - q.n_preference} more preference pairs")
    if q.preference_score is not None and q.preference_score < th.min_preference_score:
        f.append(f"weak preference pairs (score {q.preference_score:.2f} < "
                 f"{th.min_preference_score:.2f})")
        r.append("make pairs differ clearly: chosen answers in the persona's voice (use its "
                 "markers), rejected answers generic or wrong")
    if q.n_markers == 0:
        f.append("no voice markers defined")
        r.append("list the persona's typical phrases as voice_markers in persona.json so voice "
                 "density can be measured")
    elif q.marker_coverage is not None and q.marker_coverage < th.min_marker_coverage:
        f.append(f"low voice-marker coverage ({q.marker_coverage:.0f}% < "
                 f"{th.min_marker_coverage:.0f}%)")
        r.append("rewrite completions so more of them use the persona's voice markers")
    if q.n_sft and q.completion_words.mean < th.min_completion_words:
        f.append(f"short completions (mean {q.completion_words.mean:.1f} words < "
                 f"{th.min_completion_words:.0f})")
        r.append("write longer answers: a few sentences carry more of the voice than a phrase")
    if q.n_duplicates:
        f.append(f"{q.n_duplicates} duplicate SFT record{'s' if q.n_duplicates > 1 else ''}")
        r.append("remove duplicate SFT records (they overweight one example)")


@dataclass
class QualityReport:
    topics: list[TopicQuality]
    plans: list  # list[adaptive.TopicPlan], same order as topics
    persona: Persona
    summary: dict
    warnings: list[str] = field(default_factory=list)


def quality_report(curriculum: Curriculum, bounds=None,
                   thresholds: QualityThresholds | None = None) -> QualityReport:
    """Quality and adaptive plan for every topic of a curriculum."""
    from .adaptive import AdaptiveBounds, decide

    bounds = bounds or AdaptiveBounds()
    persona = curriculum.dataset.persona
    tq = [topic_quality(t, persona, thresholds) for t in curriculum.topics]
    plans = [decide(q, bounds) for q in tq]
    ds = curriculum.dataset
    summary = {"units": len(curriculum.units),
               "chapters": sum(len(u.chapters) for u in curriculum.units),
               "topics": len(tq), **ds.summary(),
               "weak_topics": sum(q.weak for q in tq),
               "untrainable_topics": sum(not p.trainable for p in plans),
               "voice_markers": len(persona.voice_markers)}
    return QualityReport(tq, plans, persona, summary, [str(w) for w in ds.warnings])


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: QualityReport, title: str = "Data quality report") -> str:
    s = report.summary
    p = report.persona
    out = [f"# {title}", ""]
    out.append(f"Persona: **{_cell(p.name)}**" + (f" — {_cell(p.description)}" if p.description else ""))
    out.append("")
    out.append(f"{s['units']} units, {s['chapters']} chapters, {s['topics']} topics; "
               f"{s['sft']} SFT examples, {s['preference']} preference pairs, {s['quiz']} quiz "
               f"questions, {s['distinctions']} critical distinctions, {s.get('prompts', 0)} practice "
               f"prompts; {s['voice_markers']} voice "
               f"markers. Weak topics: {s['weak_topics']}; untrainable: {s['untrainable_topics']}.")
    out += ["", "## Topics", "",
            "| topic | SFT | pref | quiz | dist | prompts | words mean (min-max) | marker coverage | "
            "markers/100 words | pref score | quality | weak |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for q in report.topics:
        w = q.completion_words
        out.append(f"| {_cell(q.key)} | {q.n_sft} | {q.n_preference} | {q.n_quiz} | "
                   f"{q.n_distinctions} | {q.n_prompts} | {w.mean:.1f} ({w.min}-{w.max}) | "
                   f"{_fmt(q.marker_coverage, '.0f', '%')} | {_fmt(q.markers_per_100_words)} | "
                   f"{_fmt(q.preference_score)} | {q.quality_score:.2f} | "
                   f"{'yes' if q.weak else 'no'} |")
    out += ["", "## Adaptive training plan", "",
            "| topic | trainable | SFT epochs | batch size | lr multiplier | pass threshold |",
            "|---|---|---:|---:|---:|---:|"]
    for q, pl in zip(report.topics, report.plans):
        out.append(f"| {_cell(q.key)} | {'yes' if pl.trainable else 'no'} | {pl.sft_epochs} | "
                   f"{pl.batch_size} | {pl.lr_multiplier:.2f} | {pl.pass_threshold:.2f} |")
    out += ["", "## Flags, recommendations and reasons", ""]
    for q, pl in zip(report.topics, report.plans):
        out.append(f"### {_cell(q.key)}")
        out.append("")
        if q.flags:
            out.append("Flags: " + "; ".join(q.flags) + ".")
            out.append("")
            out += [f"- recommend: {r}" for r in q.recommendations]
        else:
            out += ["No flags.", ""]
        out += [f"- decision: {r}" for r in pl.reasons]
        out.append("")
    if report.warnings:
        out += ["## Warnings", ""] + [f"- {_cell(w)}" for w in report.warnings] + [""]
    out += ["## What the numbers mean", "",
            "- marker coverage: share of SFT completions containing at least one voice marker.",
            "- markers/100 words: voice-marker occurrences per 100 words of SFT completions.",
            "- pref score (0-1): mean over pairs of 0.5 x word-set Jaccard distance between chosen "
            "and rejected + 0.5 x (1 if chosen has more markers per 100 words than rejected, 0.5 "
            "if equal, 0 if fewer); Jaccard distance alone without voice markers.",
            "- quality (0-1): mean of pref score and marker coverage (as a fraction), where "
            "available; it scales the learning rate.", ""]
    return "\n".join(out)
