"""A stand-in for the demo's person at the labelling prompt (`reward.labels.judge`).

On your own data you label pairs of your tuned model's answers yourself (`mindprint label`):
which of the two sounds more like you. The demo has no person to ask, so this function
answers for Tove Marsh, from her persona's description alone (persona.json: short, plain
sentences about seasons, tides and tree rings, risk before reward, patience). It is not
the held-out voice measure the demo reports (`gold.voice_in_real_words`, built on the
persona's voice-marker phrases), so what PPO gains on it is measured by something it was
not trained on.
"""

from __future__ import annotations

import re

# Her images and her counsel, as single words (the description's, not the marker phrases).
IMAGES = frozenset({
    "season", "seasons", "spring", "summer", "autumn", "winter", "harvest", "frost", "thaw",
    "tide", "tides", "flood", "ebb", "ring", "rings", "tree", "trees", "trunk", "roots",
    "timber", "wood", "woodpile", "grain", "patience", "patient", "wait"})
RISK = frozenset({"risk", "stop", "loss", "losses", "protect", "size", "small"})
_SENTENCE = re.compile(r"[.!?]+")
_WORD = re.compile(r"[a-z']+")


def tove_marsh(prompt: str, response: str) -> float:
    """How much Tove would like this answer, in [0, 1]: the share of its sentences that
    hold one of her images (half of them earn full marks) weighted 0.6, short sentences
    (at most 12 words on average) 0.2, a word of risk 0.2; times the square of the share of
    its words she can read (the demo's lexicon: fragments lose fast) and the share of its
    sentences that are not repeats.
    Fewer than 4 words: 0."""
    from ..evaluate import demo_lexicon

    text = response.lower()
    tokens = _WORD.findall(text)
    sentences = [s.strip() for s in _SENTENCE.split(text) if _WORD.search(s)]
    if len(tokens) < 4 or not sentences:
        return 0.0
    lexicon = demo_lexicon()
    readable = sum(t in lexicon for t in tokens) / len(tokens)
    distinct = len(set(sentences)) / len(sentences)
    imagery = sum(any(w in IMAGES for w in _WORD.findall(s)) for s in sentences) / len(sentences)
    mean_len = len(tokens) / len(sentences)
    short = 1.0 if mean_len <= 12 else max(0.0, 1.0 - (mean_len - 12) / 12)
    risk = 1.0 if any(t in RISK for t in tokens) else 0.0
    return float(readable * readable * distinct * (0.6 * min(1.0, 2 * imagery) + 0.2 * short + 0.2 * risk))
