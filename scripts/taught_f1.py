"""Does the adapter a run ships still answer what every topic taught?

Greedy answers of an adapter (default: the run's final_adapter) to every SFT training prompt,
token F1 against the taught completion, per topic. An outside check of retention: it reads
only the run's config and the adapter directory, as a user would (an adapter of a
merge.mode fold_into_base run is loaded on the folded base its mindprint.json names).

    python scripts/taught_f1.py RUN_DIR [--adapter DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--adapter", type=Path, default=None, help="adapter dir (default RUN_DIR/final_adapter)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    from mindprint_mlx import evaluate as ev
    from mindprint_mlx.data import build_curriculum, load_data_dir
    from mindprint_mlx.models import load, lora
    from mindprint_mlx.models.adapters import load_adapter

    from mindprint_mlx.pipeline.merge import shipped_base

    cfg = json.loads((a.run_dir / "run.json").read_text())["config"]
    adapter = a.adapter or a.run_dir / "final_adapter"
    model, tok = load(shipped_base(a.run_dir, adapter))
    load_adapter(model, adapter, name="shipped")
    cur = build_curriculum(load_data_dir(cfg["data_dir"]), units=cfg.get("units") or None,
                           topics=cfg.get("topics") or None)
    out = {}
    with lora.active_adapters(model, ["shipped"]):
        for t in cur.topics:
            out[t.key] = ev.taught_f1(model, tok, t.sft, a.max_tokens)
            print(f"{out[t.key]:.3f}  {t.key}")
    mean = sum(out.values()) / len(out)
    print(f"mean {mean:.3f}, worst {min(out.values()):.3f} over {len(out)} topics")
    if a.json:
        from mindprint_mlx.io import atomic_write_json

        atomic_write_json(a.json, {"topics": out, "mean": mean, "worst": min(out.values())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
