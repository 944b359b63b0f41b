"""The whole pipeline under mlx.launch; launched by tests/test_pipeline_dist.py.

    mlx.launch --backend ring -n 2 -- python tests/_dist_pipeline.py CONFIG OUT_DIR RUNS_JSON

RUNS_JSON: a JSON list of config overrides, one pipeline run each (its run_dir, ...). The
other ranks are given run_dir + ".rank{r}", a directory that does not exist (as on a second
Mac that holds no copy of the run): they must never read or write it. Each run is
stopped by rank 0 alone
at the first line that holds the run's "_stop_on" (default: "] final ", after the first
topic's final quiz; what Ctrl-C on the launching Mac does: the stop request exists on rank
0 only, the ranks agree on it), then resumed to the end. Every rank
writes OUT_DIR/rank{r}-{i}.json: the statuses and the state it ended with (the other
ranks' copy of state.json, never written to disk). Last, the last run is started again
without --resume, which rank 0 refuses: OUT_DIR/rank{r}-refused.json holds each rank's error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mindprint_mlx import distributed as dist
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.pipeline import load_pipeline_config, run_pipeline
from mindprint_mlx.stop import clear_stop, request_stop


def main(config: str, out_dir: str, runs: list[dict]) -> None:
    rank = dist.rank()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, overrides in enumerate(runs):
        lines: list[str] = []
        overrides = dict(overrides)
        stop_on = overrides.pop("_stop_on", "] final ")

        def stop_after_the_first_topic(line: str) -> None:
            lines.append(line)
            if stop_on in line and not any(stop_on in x for x in lines[:-1]):
                request_stop()           # rank 0 alone: the others only echo nothing

        if rank:
            overrides = {**overrides, "run_dir": f"{overrides['run_dir']}.rank{rank}"}
        cfg = load_pipeline_config(config, overrides)
        cut = run_pipeline(cfg, echo=stop_after_the_first_topic)
        clear_stop()
        res = run_pipeline(cfg, resume=True, echo=lines.append)
        (out / f"rank{rank}-{i}.json").write_text(json.dumps({
            "size": dist.size(), "statuses": [cut.status, res.status], "state": res.state,
            "lines": lines}, default=str))
    # rank 0 refuses to start over a finished run: every rank stops with its one line
    try:
        run_pipeline(cfg)
        refused = None
    except MindprintError as e:
        refused = str(e)
    (out / f"rank{rank}-refused.json").write_text(json.dumps(refused))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
