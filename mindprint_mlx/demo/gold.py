"""The default gold judge of `scripts/bench_alignment.py`: the persona's voice, in real words.

A gold function knows the true preference, so a benchmark can check whether a reward model
learned it and whether PPO's gains on the learned reward are real. It takes
`(prompt: str, response: str)` and returns a score in [0, 1]. Bring your own with
`--gold path/to/file.py:function`.
"""

from __future__ import annotations

import re

from ..evaluate import words

_SENTENCE = re.compile(r"[^.!?]+")


def _lexicon() -> frozenset[str]:
    from ..evaluate import demo_lexicon

    global _LEXICON
    if _LEXICON is None:
        _LEXICON = frozenset(demo_lexicon())
    return _LEXICON


def _markers() -> list[str]:
    import json

    from . import DEMO_CURRICULUM_DIR

    global _MARKERS
    if _MARKERS is None:
        _MARKERS = list(json.loads((DEMO_CURRICULUM_DIR / "persona.json").read_text())["voice_markers"])
    return _MARKERS


_LEXICON: frozenset[str] | None = None
_MARKERS: list[str] | None = None


def voice_in_real_words(prompt: str, response: str) -> float:
    """Tove Marsh's voice: her images (seasons, tides, tree rings: two distinct voice markers
    earn the full part) and her short sentences (at most 14 words on average), counted only
    as far as the answer is made of real words (the square of the fraction of its words that
    are in the demo's lexicon). Answers of fewer than 4 words score 0."""
    from ..evaluate import marker_count, real_word_fraction

    w = words(response)
    if len(w) < 4:
        return 0.0
    real = real_word_fraction(response, _lexicon())
    distinct = sum(1 for m in _markers() if marker_count(response, [m]) > 0)
    sentences = [s for s in _SENTENCE.findall(response) if words(s)]
    mean_len = sum(len(words(s)) for s in sentences) / max(1, len(sentences))
    short = 1.0 if mean_len <= 14 else max(0.0, 1.0 - (mean_len - 14) / 14)
    return float(real * real * (0.7 * min(1.0, distinct / 2) + 0.3 * short))
