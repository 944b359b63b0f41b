"""Demo curriculum shipped as package data.

An original, fictional persona written for this project: Tove Marsh, a retired
timber trader who teaches market cycles in short, plain sentences about seasons,
tides, tree rings, patience and putting risk first. The data in ``curriculum/``
(SFT, preference, quiz and critical-distinction JSONL files plus ``persona.json``)
is small enough for a tiny model to train on in CI. Educational only; not
investment advice.
"""

from pathlib import Path

DEMO_CURRICULUM_DIR = Path(__file__).parent / "curriculum"
DEMO_PERSONA = "Tove Marsh"

__all__ = ["DEMO_CURRICULUM_DIR", "DEMO_PERSONA"]
