"""The run's record: run.json (what it is) and state.json (how far it got).

state.json is rewritten atomically after every finished phase and lists, per topic, the
phases that are done with their scores and artefacts (paths relative to the run
directory). A phase counts as done only after its artefacts are complete on disk, so a
run killed at any moment resumes from the last finished phase. run.json holds the
resolved config, versions, seed and data hashes; resuming with a different config or
data is refused, naming what changed.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import MindprintError
from ..io import atomic_write_json, sha256_file

STATE = "state.json"
RUN = "run.json"
STATE_VERSION = 1

# Keys whose change does not alter what a run computes (may differ on resume), with what
# is under them.
RESUME_FREE_KEYS = ("run_dir", "estimate", "reward.continue_at_chance",
                    # run I/O of the standalone trainers, in the sections of earlier versions
                    # (now SFTRun, RewardRun); the pipeline never read them
                    "sft.model", "sft.data_dir", "sft.out_dir", "sft.eval_fraction",
                    "reward.train.model", "reward.train.data_dir", "reward.train.out_dir")


def _resume_free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESUME_FREE_KEYS)


class ResumeError(MindprintError):
    pass


# state.json keys and the JSON type the code reads them as
_STATE_TYPES = {"topics": dict, "units": dict, "reward_model": (dict, type(None))}


def read_state_file(f: Path) -> dict:
    """state.json as a dict, checked: invalid JSON, a non-object, or a top-level key of the
    wrong type (`topics` a list, ...) is a ResumeError naming the file and key."""
    try:
        data = json.loads(Path(f).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ResumeError(f"{f}: not valid JSON ({e}); it is written atomically, so this "
                          "file was edited by hand") from None
    except OSError as e:
        raise ResumeError(f"{f}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ResumeError(f"{f}: expected a JSON object, got {type(data).__name__}")
    for key, typ in _STATE_TYPES.items():
        if key in data and not isinstance(data[key], typ):
            raise ResumeError(f"{f}: '{key}' has the wrong type ({type(data[key]).__name__})")
    for name, rec in (data.get("topics") or {}).items():
        if not isinstance(rec, dict) or not isinstance(rec.get("phases", {}), dict):
            raise ResumeError(f"{f}: topics['{name}'] has the wrong type (expected an object "
                              "with 'phases')")
        for ph, r in rec.get("phases", {}).items():
            if not isinstance(r, dict) or not isinstance(r.get("artefacts", []), list):
                raise ResumeError(f"{f}: topics['{name}'].phases['{ph}'] has the wrong type")
    return data


def data_hashes(data_dir: str | Path) -> dict[str, str]:
    """sha256 of every file under the data directory, by relative path."""
    d = Path(data_dir)
    if d.is_file():
        return {d.name: sha256_file(d)}
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(d).parts)}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("mindprint-mlx", "mlx", "mlx-lm", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


# Keys added after runs were made, with the value an older run.json means by leaving them out.
ADDED_KEYS = {"merge.mode": "concat", "merge.rank": 0}


def config_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every differing leaf (order-stable)."""
    a = {k: v for k, v in {**ADDED_KEYS, **_flatten(old)}.items() if not _resume_free(k)}
    b = {k: v for k, v in _flatten(new).items() if not _resume_free(k)}
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    return out


def data_changes(old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if k not in new:
            out.append(f"{k} removed")
        elif k not in old:
            out.append(f"{k} added")
        elif old[k] != new[k]:
            out.append(f"{k} changed")
    return out


class RunState:
    """state.json in memory; `save()` writes it atomically.

    writer=False (the other ranks of a distributed run): a copy that is never written and
    trusts its records (rank 0 checked their artefacts, `without_missing`, and sent it)."""

    def __init__(self, run_dir: Path, data: dict | None = None, writer: bool = True):
        self.run_dir = Path(run_dir)
        self.writer = writer
        self.data = data or {"version": STATE_VERSION, "reward_model": None, "topics": {},
                             "units": {}, "finished": False, "started": time.time()}

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        f = Path(run_dir) / STATE
        if not f.is_file():
            return cls(run_dir)
        data = read_state_file(f)
        if data.get("version") != STATE_VERSION:
            raise ResumeError(f"{f}: state version {data.get('version')!r}, this mindprint "
                              f"writes {STATE_VERSION}")
        return cls(run_dir, data)

    def save(self) -> None:
        if not self.writer:
            return
        self.data["updated"] = time.time()
        atomic_write_json(self.run_dir / STATE, self.data)

    def exists(self, rel: str | Path) -> bool:
        """Whether artefact `rel` (relative to run_dir, or absolute) is on disk; a copy that
        does not write trusts its records."""
        return not self.writer or (self.run_dir / rel).exists()

    def without_missing(self) -> dict:
        """The data with every record whose artefacts are gone dropped (a unit: marked not
        done), i.e. what `phase`, `unit_done` and the scorers' check already treat as not
        done: what the other ranks of a distributed run receive, trusting it."""
        import copy

        data = copy.deepcopy(self.data)
        for key, t in (data.get("topics") or {}).items():
            t["phases"] = {ph: r for ph, r in (t.get("phases") or {}).items()
                           if self.phase(key, ph) is not None}
        for name, u in (data.get("units") or {}).items():
            if u.get("done") and not self.unit_done(name):
                u["done"] = False
        for key in ("reward_model", "judge_model"):
            rec = data.get(key)
            if rec and not rec.get("reused") and not self.exists(rec.get("adapter_dir", "")):
                data[key] = None
        return data

    # -- topics
    def topic(self, key: str) -> dict:
        return self.data["topics"].setdefault(key, {"phases": {}})

    def phase(self, key: str, phase: str) -> dict | None:
        """The record of a finished phase whose artefacts still exist, else None."""
        rec = self.data["topics"].get(key, {}).get("phases", {}).get(phase)
        if not rec or not rec.get("done"):
            return None
        for rel in rec.get("artefacts", []):
            if not self.exists(rel):
                return None
        return rec

    def finish_phase(self, key: str, phase: str, record: dict) -> None:
        rec = dict(record, done=True, finished=time.time())
        self.topic(key)["phases"][phase] = rec
        self.save()

    # -- units
    def unit(self, name: str) -> dict:
        return self.data["units"].setdefault(name, {})

    def unit_done(self, name: str) -> bool:
        u = self.data["units"].get(name) or {}
        return bool(u.get("done")) and all(self.exists(a) for a in u.get("artefacts", []))

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.run_dir.resolve()))


def has_progress(run_dir: Path) -> bool:
    """Whether state.json records finished work (a run that failed before its first phase,
    e.g. on a model that would not load, holds nothing worth protecting)."""
    try:
        data = json.loads((Path(run_dir) / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return True           # unreadable: not ours to overwrite
    if not isinstance(data, dict):
        return True
    return bool(data.get("reward_model") or data.get("units") or data.get("final_adapter")
                or any((t or {}).get("phases") for t in (data.get("topics") or {}).values()))


def write_run_json(run_dir: Path, resolved: dict, seed: int, hashes: dict, plan: list[dict]) -> None:
    atomic_write_json(Path(run_dir) / RUN, {
        "config": resolved, "seed": seed, "data_hashes": hashes, "versions": versions(),
        "plan": plan, "created": time.time()})


def check_resume(run_dir: Path, resolved: dict, hashes: dict) -> None:
    """Refuse to resume when the config or the data differ from run.json's."""
    f = Path(run_dir) / RUN
    if not f.is_file():
        return
    try:
        old = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResumeError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(old, dict) or not isinstance(old.get("config", {}), dict) \
            or not isinstance(old.get("data_hashes", {}), dict):
        raise ResumeError(f"{f}: expected a JSON object with 'config' and 'data_hashes' objects")
    changes = config_changes(old.get("config", {}), resolved)
    dchanges = data_changes(old.get("data_hashes", {}), hashes)
    if changes or dchanges:
        lines = [f"config {c}" for c in changes] + [f"data {c}" for c in dchanges]
        shown = "; ".join(lines[:8]) + (f"; and {len(lines) - 8} more" if len(lines) > 8 else "")
        raise ResumeError(f"cannot resume {run_dir}: {shown} (start a new run_dir, or restore "
                          "the old config/data)")
