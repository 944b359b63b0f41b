"""Records grouped into unit -> chapter -> topic, in natural order, with filters.

Order: units, then chapters within a unit, then topics within a chapter, each by natural
sort ("unit-2" before "unit-10", case-insensitive). A topic exists when it has SFT or quiz
records; preference pairs, critical distinctions and prompt-only records attach to the
topic with the same (unit, chapter, topic). `Topic.rel_dir` is "unit/chapter/topic" with each part passed
through `mindprint_mlx.io.safe_name`, so it never holds "..", extra slashes or an
absolute path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import MindprintError
from ..io import safe_name
from .records import (DataError, DataFiles, Dataset, DistinctionRecord, PreferenceRecord, Problem,
                      PromptRecord, QuizRecord, SFTRecord, load_data_dir)

_CHUNKS = re.compile(r"(\d+)")


def natural_key(s: str) -> tuple:
    """Sort key: digit runs compare as numbers, the rest case-insensitively."""
    parts = _CHUNKS.split(s)
    key = []
    for i, p in enumerate(parts):
        if i % 2:
            key.append((0, int(p), ""))
        elif p:
            key.append((1, 0, p.casefold()))
    return tuple(key)


def natural_sorted(items: Iterable[str]) -> list[str]:
    return sorted(items, key=lambda s: (natural_key(s), s))


@dataclass
class Topic:
    unit: str
    chapter: str
    name: str
    key: str       # "unit/chapter/topic" (the raw names)
    rel_dir: str   # sanitised "unit/chapter/topic", safe as a relative path
    sft: list[SFTRecord] = field(default_factory=list)
    preference: list[PreferenceRecord] = field(default_factory=list)
    quiz: list[QuizRecord] = field(default_factory=list)
    distinctions: list[DistinctionRecord] = field(default_factory=list)
    prompts: list[PromptRecord] = field(default_factory=list)   # practice prompts (no answer)

    def preference_pairs(self) -> list[PreferenceRecord]:
        """The topic's preference pairs plus its critical distinctions as pairs."""
        return list(self.preference) + [d.as_preference() for d in self.distinctions]


@dataclass
class Chapter:
    unit: str
    name: str
    topics: list[Topic] = field(default_factory=list)


@dataclass
class Unit:
    name: str
    rel_dir: str
    chapters: list[Chapter] = field(default_factory=list)

    @property
    def topics(self) -> list[Topic]:
        return [t for c in self.chapters for t in c.topics]


@dataclass
class Curriculum:
    topics: list[Topic]
    units: list[Unit]
    dataset: Dataset

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if name in (u.name, u.rel_dir):
                return u
        raise MindprintError(f"unknown unit {name!r}; units: {', '.join(u.name for u in self.units)}")

    def topic(self, key: str) -> Topic:
        for t in self.topics:
            if key in (t.key, t.rel_dir, t.name):
                return t
        raise MindprintError(f"unknown topic {key!r}; topics: {', '.join(t.key for t in self.topics)}")

    def preference_pairs(self) -> list[PreferenceRecord]:
        """All preference pairs and distinctions of the dataset (the reward model's data)."""
        return self.dataset.all_preference_pairs()

    def __len__(self) -> int:
        return len(self.topics)

    def __iter__(self):
        return iter(self.topics)


def _rel_dir(unit: str, chapter: str, topic: str) -> str:
    return "/".join(safe_name(x, what) for x, what in ((unit, "unit"), (chapter, "chapter"),
                                                       (topic, "topic")))


def _select(names: list[str], wanted: Iterable[str] | None, what: str,
            aliases: dict[str, set[str]]) -> set[str] | None:
    if wanted is None:
        return None
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    chosen, unknown = set(), []
    for w in wanted:
        hits = {n for n in names if w == n or w in aliases.get(n, set())}
        if not hits:
            unknown.append(w)
        chosen |= hits
    if unknown:
        raise MindprintError(f"unknown {what}{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(repr(u) for u in unknown)}; {what}s in the data: "
                             f"{', '.join(names) or 'none'}")
    return chosen


def build_curriculum(dataset: Dataset, units: Iterable[str] | None = None,
                     topics: Iterable[str] | None = None) -> Curriculum:
    """Group a dataset into topics. `units`: unit names to keep; `topics`: topic names,
    keys ("unit/chapter/topic") or rel_dirs to keep. An unknown name is an error that
    lists what exists."""
    groups: dict[tuple[str, str, str], Topic] = {}

    def topic_for(r, create: bool) -> Topic | None:
        k = (r.unit, r.chapter, r.topic)
        if k not in groups:
            if not create:
                return None
            groups[k] = Topic(r.unit, r.chapter, r.topic, "/".join(k), _rel_dir(*k))
        return groups[k]

    for r in dataset.sft:
        topic_for(r, True).sft.append(r)
    for r in dataset.quiz:
        topic_for(r, True).quiz.append(r)
    for r in dataset.preference:
        t = topic_for(r, False)
        if t is not None:
            t.preference.append(r)
    for r in dataset.distinctions:
        t = topic_for(r, False)
        if t is not None:
            t.distinctions.append(r)
    for r in dataset.prompts:
        t = topic_for(r, False)
        if t is not None:
            t.prompts.append(r)

    # Two different topics must not share a directory (or a key).
    seen: dict[str, Topic] = {}
    problems = []
    for t in groups.values():
        for ident in (t.rel_dir.casefold(), "key:" + t.key):
            other = seen.get(ident)
            if other is not None and other is not t:
                src = (t.sft or t.quiz)[0].source
                f, _, ln = src.rpartition(":")
                problems.append(Problem(f or src, int(ln) if ln.isdigit() else None,
                                        f"topic '{t.key}' and topic '{other.key}' map to the same "
                                        f"directory '{t.rel_dir}'; rename one"))
            seen[ident] = t
    unit_dirs: dict[str, dict[str, Topic]] = {}
    for t in groups.values():
        unit_dirs.setdefault(safe_name(t.unit, "unit").casefold(), {}).setdefault(t.unit, t)
    for names in unit_dirs.values():
        if len(names) > 1:
            (first, _), (second, t) = list(names.items())[:2]
            src = (t.sft or t.quiz)[0].source
            f, _, ln = src.rpartition(":")
            problems.append(Problem(f or src, int(ln) if ln.isdigit() else None,
                                    f"unit '{second}' and unit '{first}' map to the same directory "
                                    f"'{safe_name(second)}' (on a case-insensitive disk); rename one"))
    if problems:
        raise DataError(problems, "curriculum")

    ordered = sorted(groups.values(), key=lambda t: (natural_key(t.unit), t.unit,
                                                     natural_key(t.chapter), t.chapter,
                                                     natural_key(t.name), t.name))
    unit_names = list(dict.fromkeys(t.unit for t in ordered))
    unit_alias = {u: {safe_name(u, "unit")} for u in unit_names}
    keep_units = _select(unit_names, units, "unit", unit_alias)
    if keep_units is not None:
        ordered = [t for t in ordered if t.unit in keep_units]
    if topics is not None:
        keys = [t.key for t in ordered]
        alias = {t.key: {t.name, t.rel_dir} for t in ordered}
        keep = _select(keys, topics, "topic", alias)
        ordered = [t for t in ordered if t.key in keep]

    unit_objs: list[Unit] = []
    for t in ordered:
        if not unit_objs or unit_objs[-1].name != t.unit:
            unit_objs.append(Unit(t.unit, safe_name(t.unit, "unit")))
        u = unit_objs[-1]
        if not u.chapters or u.chapters[-1].name != t.chapter:
            u.chapters.append(Chapter(t.unit, t.chapter))
        u.chapters[-1].topics.append(t)
    return Curriculum(ordered, unit_objs, dataset)


def load_curriculum(path: str | os.PathLike, files: DataFiles | None = None,
                    units: Iterable[str] | None = None,
                    topics: Iterable[str] | None = None) -> Curriculum:
    """`load_data_dir` + `build_curriculum`."""
    return build_curriculum(load_data_dir(Path(path), files), units=units, topics=topics)
