"""Keeping what earlier topics taught: replay selection and the continual-learning figures.

Each topic trains a new LoRA adapter on top of the earlier topics' adapters (frozen). On its
own data alone, 20 epochs at lr 1e-3 overwrite what the frozen adapters did: the unit's
merged adapter then answered only its last topic. Replay mixes a share of earlier topics'
examples into each topic's SFT rows (drawn afresh every epoch, see `train.sft.epoch_order`),
so the new adapter learns its topic without moving the answers the frozen ones give. The retention matrix measures it: row "after topic j",
column "topic i", the quiz score of topic i with every adapter trained up to topic j.
"""

from __future__ import annotations

from typing import Sequence


def replay_count(n_topic: int, fraction: float, n_available: int) -> int:
    """Replayed rows so that they make up `fraction` of the topic's SFT rows (at most what
    earlier topics have): n_topic * f / (1 - f), rounded."""
    if fraction <= 0 or n_topic <= 0 or n_available <= 0:
        return 0
    want = round(n_topic * fraction / (1.0 - fraction))
    return max(0, min(n_available, want))


def continual_metrics(rows: dict[str, dict[str, float]], order: Sequence[str],
                      final: dict[str, float] | None = None) -> dict:
    """The usual continual-learning figures from a retention matrix.

    `rows[after][topic]` is the score of `topic` with everything trained up to `after`;
    `order` lists the topics in training order; `final` (optional) the scores of the final
    adapter as shipped, which then stands for the last row. Returns
    - `average`: mean score of every topic in the last row (what the result knows);
    - `backward_transfer`: mean over the earlier topics of (last row - own row), the score
      change that later training caused (negative: forgetting); "earlier" is every topic
      but the last, or every topic when `final` is given;
    - `forgetting`: mean over the same topics of (best score before the end - last row).
    """
    done = [k for k in order if k in rows]
    if not done:
        avg = sum(final.values()) / len(final) if final else None   # no matrix: the final row only
        return {"average": avg, "backward_transfer": None, "forgetting": None, "topics": len(final or {})}
    last = final if final is not None else rows[done[-1]]
    scored = [k for k in done if k in last]
    avg = sum(last[k] for k in scored) / len(scored) if scored else None
    earlier = [k for k in (done if final is not None else done[:-1]) if k in last and k in rows[k]]
    if not earlier:
        return {"average": avg, "backward_transfer": None, "forgetting": None, "topics": len(done)}
    bwt = sum(last[k] - rows[k][k] for k in earlier) / len(earlier)
    forget = []
    for k in earlier:
        after = done[done.index(k):] if final is not None else done[done.index(k):-1]
        seen = [rows[a][k] for a in after if k in rows[a]]
        forget.append(max(seen) - last[k])
    return {"average": avg, "backward_transfer": bwt, "forgetting": sum(forget) / len(forget),
            "topics": len(done)}
