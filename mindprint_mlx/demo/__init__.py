"""Demo curriculum shipped as package data.

An original, fictional persona written for this project: Tove Marsh, a retired
timber trader who teaches market cycles in short, plain sentences about seasons,
tides, tree rings, patience and putting risk first. The data in ``curriculum/``
(SFT, preference, quiz and critical-distinction JSONL files plus ``persona.json``)
is small enough for a tiny model to train on in CI. Educational only; not
investment advice.

``heldout_prompts.jsonl`` holds prompts in the persona's domain that appear in no data
file (neither the curriculum nor the neutral corpus the demo base model is pretrained on,
``neutral_corpus.py``): what a model answers there it was never shown.
"""

from pathlib import Path

DEMO_CURRICULUM_DIR = Path(__file__).parent / "curriculum"
DEMO_PERSONA = "Tove Marsh"
DEMO_HELDOUT_PROMPTS = Path(__file__).parent / "heldout_prompts.jsonl"


def heldout_prompts() -> list[str]:
    """The held-out prompts, in file order."""
    import json

    with open(DEMO_HELDOUT_PROMPTS, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def demo_voice_markers() -> list[str]:
    """The demo persona's voice markers (its persona.json)."""
    from ..io import read_json_object

    return list(read_json_object(DEMO_CURRICULUM_DIR / "persona.json")["voice_markers"])


__all__ = ["DEMO_CURRICULUM_DIR", "DEMO_HELDOUT_PROMPTS", "DEMO_PERSONA", "demo_voice_markers",
           "heldout_prompts"]
