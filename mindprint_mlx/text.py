"""Words and voice markers: the one rule every count of words or markers uses (data quality,
quiz scores, the demo's real-words measure and gold judge).

- A word is a run of letters and digits, case-folded; an apostrophe (' or U+2019) between
  two such runs stays inside the word, so "don't", "y'know" and "Tove's" are one word each.
  Underscores and other punctuation separate words.
- A voice marker is found where the case-folded marker phrase occurs in the case-folded text
  and, at each end of the marker that is a letter or digit, the text does not continue the
  word there (by the rule above): "patience" does not count inside "impatience" or
  "patiences", "don" does not count inside "don't". A marker end that is punctuation ("...")
  needs no boundary, so "well..." counts "...".
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

_W = r"[^\W_]"                         # a letter or digit
_WORD = re.compile(rf"{_W}+(?:['\u2019]{_W}+)*")
# The text continues a word before / after a position: a letter or digit there, or an
# apostrophe with a letter or digit beyond it.
_NOT_AFTER_WORD = rf"(?<!{_W})(?<!{_W}['\u2019])"
_NOT_BEFORE_WORD = rf"(?!{_W})(?!['\u2019]{_W})"


def words(text: str) -> list[str]:
    """The case-folded words of `text` (see the module docstring)."""
    return _WORD.findall(text.casefold())


@lru_cache(maxsize=4096)
def marker_pattern(marker: str) -> re.Pattern | None:
    """The compiled pattern of one voice marker (None for a blank one); matches case-folded
    text."""
    m = marker.strip().casefold()
    if not m:
        return None
    left = _NOT_AFTER_WORD if m[0].isalnum() else ""
    right = _NOT_BEFORE_WORD if m[-1].isalnum() else ""
    return re.compile(left + re.escape(m) + right)


def marker_count(text: str, markers: Iterable[str]) -> int:
    """Occurrences of the voice `markers` in `text` (each marker counted on its own)."""
    t = text.casefold()
    pats = [p for p in (marker_pattern(m) for m in markers if m) if p is not None]
    return sum(len(p.findall(t)) for p in pats)


def marker_density(text: str, markers: Iterable[str]) -> float:
    """Voice-marker occurrences per 100 words of `text`; 0.0 for a text with no words."""
    n = len(words(text))
    return 100.0 * marker_count(text, markers) / n if n else 0.0


__all__ = ["marker_count", "marker_density", "marker_pattern", "words"]
