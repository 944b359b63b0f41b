"""The voice of the adapters runs ship, on the demo's held-out prompts (in no data file).

For each run's final adapter (loaded as a user would: the run's config names the base, and
an adapter of a merge.mode fold_into_base run is loaded on the folded base its
mindprint.json names): greedy answers to the 28 held-out prompts of
mindprint_mlx/demo/heldout_prompts.jsonl, their share in real words, their voice score
(mindprint_mlx/demo/gold.py) and how many use voice markers; and the voice score's mean over
--samples answers a prompt sampled at --temperature (the same keys for every run). With
--against, the same for a second set of runs and the difference of the two sets' means:
e.g. the demo config's runs (seeds 0-2) against SFT-only runs (`-s run_ppo=false`).

    python scripts/heldout_voice.py RUN [RUN ...] [--against RUN ...] [--samples 8] [--json OUT]

The greedy score of a tiny model on new prompts is chaotic: any change of the weights flips
whole answers, and it moves by 0.05-0.1 a run; the sampled mean moves far less, so compare
both (docs/demo.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load_final(run_dir: Path, cache: dict):
    """The run's final adapter on its base (`pipeline.merge.load_final`); a bad run
    directory ends the script with its one-line reason."""
    from mindprint_mlx.errors import MindprintError
    from mindprint_mlx.pipeline.merge import load_final as load

    try:
        return load(run_dir, cache)
    except MindprintError as e:
        raise SystemExit(str(e)) from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="pipeline run directories")
    ap.add_argument("--against", nargs="*", type=Path, default=[],
                    help="run directories to compare with (e.g. SFT-only runs)")
    ap.add_argument("--samples", type=int, default=8, help="sampled answers a prompt (0: greedy only)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.samples < 0 or not a.temperature > 0 or a.max_tokens < 1:
        ap.error("--samples >= 0, --temperature > 0 and --max-tokens >= 1")

    from mindprint_mlx.models import lora
    from mindprint_mlx.pipeline.demo import heldout_scores

    cache: dict = {}
    rows: dict[str, list[dict]] = {"runs": [], "against": []}
    print(f"{'run':40} {'real words':>10} {'voice':>7} {'markers':>8}"
          + (f" {'sampled voice':>13}" if a.samples else ""))
    for group, dirs in (("runs", a.runs), ("against", a.against)):
        for d in dirs:
            model, tok, name = load_final(d, cache)
            r = heldout_scores(model, tok, [name], a.max_tokens, a.samples, a.temperature)
            lora.remove_adapter(model, name)
            n = len(r["answers"])
            rows[group].append({"run": str(d), **r})
            print(f"{str(d)[-40:]:40} {r['real_words']:10.2f} {r['voice']:7.3f} {r['with_markers']:>4}/{n}"
                  + (f" {r['voice_sampled']:13.3f}" if a.samples else "")
                  + ("   (against)" if group == "against" else ""))

    def mean(group: str, key: str) -> float | None:
        xs = [r[key] for r in rows[group] if r.get(key) is not None]
        return sum(xs) / len(xs) if xs else None

    out = {"runs": rows["runs"], "against": rows["against"],
           "voice": mean("runs", "voice"), "voice_sampled": mean("runs", "voice_sampled")}
    print(f"mean of {len(a.runs)} run(s): voice {out['voice']:.3f}"
          + (f", sampled voice {out['voice_sampled']:.3f}" if a.samples else ""))
    if a.against:
        out.update(against_voice=mean("against", "voice"),
                   against_voice_sampled=mean("against", "voice_sampled"))
        out["minus_against"] = out["voice"] - out["against_voice"]
        line = (f"mean of {len(a.against)} run(s) against: voice {out['against_voice']:.3f}"
                + (f", sampled voice {out['against_voice_sampled']:.3f}" if a.samples else "")
                + f"\nruns - against: voice {out['minus_against']:+.3f}")
        if a.samples:
            out["sampled_minus_against"] = out["voice_sampled"] - out["against_voice_sampled"]
            line += f", sampled voice {out['sampled_minus_against']:+.3f}"
        print(line)
    if a.json:
        from mindprint_mlx.io import atomic_write_json

        atomic_write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
