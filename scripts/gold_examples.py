"""Two gold functions for `scripts/bench_alignment.py --gold scripts/gold_examples.py:FUNC`,
other than the default (mindprint_mlx/demo/gold.py:voice_in_real_words): examples of
bringing your own, and the ones docs/benchmarks.md measures the benchmark with.

A gold function takes (prompt, response) and returns a score in [0, 1].
"""

from __future__ import annotations

import re

# Words of the persona's images (seasons, tides, timber) and her counsel of patience: a
# list of its own, not the persona file's voice markers.
NATURE = frozenset({"season", "seasons", "tide", "tides", "winter", "spring", "summer", "autumn",
                    "harvest", "frost", "thaw", "roots", "root", "rings", "ring", "trunk",
                    "woodpile", "patience", "patient"})


def nature_sentences(prompt: str, response: str) -> float:
    """The share of the answer's sentences that hold one of the NATURE words (half of them
    earn full marks), times the share of its words that are real words (the demo lexicon),
    times the share of its sentences that are not repeats. Answers of fewer than 4 words
    score 0. Sparse on purpose: most SFT-policy answers score 0, so few pairs of them differ."""
    from mindprint_mlx.evaluate import demo_lexicon

    sentences = [s.strip().lower() for s in re.split(r"[.!?]+", response) if s.strip()]
    tokens = re.findall(r"[a-z']+", response.lower())
    if not sentences or len(tokens) < 4:
        return 0.0
    lexicon = demo_lexicon()
    real = sum(t in lexicon for t in tokens) / len(tokens)
    hit = sum(any(w in NATURE for w in re.findall(r"[a-z']+", s)) for s in sentences) / len(sentences)
    distinct = len(set(sentences)) / len(sentences)
    return float(min(1.0, 2 * hit) * real * distinct)


def concise_and_warm(prompt: str, response: str) -> float:
    """Up to 20 words earn length; "patience" anywhere doubles the score (docs/benchmarks.md's
    bring-your-own example)."""
    words = response.split()
    return min(1.0, len(words) / 20) * (1.0 if "patience" in response.lower() else 0.5)
