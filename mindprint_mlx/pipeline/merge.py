"""How a unit's adapters become what later units train on and what the run ships (`merge.mode`).

- `concat` (default): ranks concatenate (`lora.combine_adapters`, exact). The final adapter's
  rank is the sum of every topic's ranks: it grows with the curriculum.
- `svd`: each unit's concatenated adapter is replaced by its best rank-`merge.rank`
  approximation (per projection, truncated SVD of the update sum_i s_i B_i A_i, computed from
  the factors), and so is the final adapter (all units). The relative Frobenius error of each
  projection goes into state.json and the report; the unit's verify and the retention row of
  its last topic are graded on the compressed adapter.
- `fold_into_base`: each unit but the last is written into a base checkpoint
  (run_dir/folded_base/unit-N = the previous base + the unit's update, `export.fuse`), whose
  weights then replace the base's in memory, so later units train on it; the final adapter
  is the last unit's, on the last folded base (its mindprint.json and adapter_config.json
  name it). The reward model and judge were trained on the original base: while they score,
  an inactive-otherwise adapter `unfold` (minus every folded unit's update) undoes the fold,
  so PPO and the quiz see the same scores as with concat. Under mlx.launch rank 0 alone
  writes (and reads back) the checkpoint; the other ranks take its weights from rank 0 over
  the collective (`share_base_weights`), so they need no copy of it.

Pure functions (`svd_lora`, `final_size`) plus `Merger`, the one object the runner calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import MindprintError
from ..models import lora

MODES = ("concat", "svd", "fold_into_base")
UNFOLD = "unfold"
FOLDED_DIR = "folded_base"


def shipped_base(run_dir: str | Path, adapter_dir: str | Path) -> str:
    """The base an adapter a run wrote sits on, as a user loads it: the folded base its
    mindprint.json names (merge.mode fold_into_base), else the model of the run's config."""
    import json

    run_dir, adapter_dir = Path(run_dir), Path(adapter_dir)
    meta_file = adapter_dir / "mindprint.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    folded = (meta.get("merge") or {}).get("folded_base")
    if folded:
        return str(run_dir / folded)
    return json.loads((run_dir / "run.json").read_text())["config"]["model"]


def load_final(run_dir: str | Path, cache: dict):
    """(model, tokenizer, adapter name) with a finished run's final adapter loaded on its
    base, as a user loads it (`shipped_base`); bases are loaded once into `cache` and shared
    between runs (remove the adapter, `lora.remove_adapter`, before loading another)."""
    from ..errors import MindprintError
    from ..models import load
    from ..models.adapters import load_adapter

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise MindprintError(f"{run_dir}: not a pipeline run directory (no run.json)")
    adapter = run_dir / "final_adapter"
    if not adapter.is_dir():
        raise MindprintError(f"{run_dir}: no final_adapter/ (has the run finished?)")
    base = shipped_base(run_dir, adapter)
    if base not in cache:
        cache[base] = load(base)
    model, tok = cache[base]
    name = "shipped"
    load_adapter(model, adapter, name=name)
    return model, tok, name


# ---------------------------------------------------------------- the math (pure)

def svd_lora(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Best rank-`rank` factors of the update `a @ b` (a: (in, R), b: (R, out), scale folded in).

    Never forms the (in, out) matrix: with the eigendecompositions of the two (R, R) Gram
    matrices, a = Ua Sa Va^T and b^T = Ub Sb Vb^T (thin SVDs, directions of zero weight
    dropped), so a @ b = Ua (Sa Va^T Vb Sb) Ub^T and the SVD of that small core gives the
    update's singular values and vectors. Matrix products only (a QR of the factors is ~25x
    slower for a 7B model's projections on CPU). Returns (a_k (in, k), b_k (k, out), relative
    Frobenius error, singular values), with k = min(rank, R), the singular values split evenly
    between the two factors."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    R = a.shape[1]

    def half(f: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lam, v = np.linalg.eigh(g)
        keep = lam > max(lam.max(initial=0.0), 0.0) * 1e-13
        return v[:, keep], np.sqrt(lam[keep])

    va, sa = half(a, a.T @ a)
    vb, sb = half(b.T, b @ b.T)
    k = min(int(rank), R)
    if len(sa) == 0 or len(sb) == 0:            # a zero update
        return np.zeros((a.shape[0], k)), np.zeros((k, b.shape[1])), 0.0, np.zeros(0)
    core = (sa[:, None] * (va.T @ vb)) * sb[None, :]
    u, s, vt = np.linalg.svd(core, full_matrices=False)
    total = float(np.sum(s ** 2))
    err = float(np.sqrt(max(0.0, np.sum(s[k:] ** 2)) / total)) if total > 0 else 0.0
    n = min(k, len(s))
    root = np.sqrt(s[:n])
    a_k = (a @ (va / sa)) @ (u[:, :n] * root)
    b_k = ((root[:, None] * vt[:n]) @ (vb / sb).T) @ b
    if n < k:                                   # the update has rank < k: pad with zeros
        a_k = np.pad(a_k, ((0, 0), (0, k - n)))
        b_k = np.pad(b_k, ((0, k - n), (0, 0)))
    return a_k, b_k, err, s


def compress_adapter(model, name: str, rank: int) -> dict:
    """Replace adapter `name` in every layer by its rank-`rank` SVD truncation (in place).

    Returns {"rank_before", "rank", "errors": {module path: relative Frobenius error},
    "max_error", "mean_error"}; an adapter of rank <= `rank` is left as it is (error 0)."""
    errors, before, after = {}, 0, 0
    for path, m in lora.lora_layers(model):
        ad = m.adapters.get(name)
        if ad is None:
            continue
        before = max(before, ad.r)
        if ad.r <= rank:
            errors[path], after = 0.0, max(after, ad.r)
            continue
        a = np.array(ad.lora_a.astype(mx.float32))
        b = np.array(ad.lora_b.astype(mx.float32)) * ad.scale
        a_k, b_k, err, _ = svd_lora(a, b, rank)
        in_dims, out_dims = m.dims
        new = lora.LoRAAdapter(in_dims, out_dims, r=a_k.shape[1], alpha=float(a_k.shape[1]),
                               trainable=False)
        new.train(ad.training)
        new.lora_a = mx.array(a_k.astype(np.float32))
        new.lora_b = mx.array(b_k.astype(np.float32))
        m.adapters[name] = new
        errors[path] = err
        after = max(after, new.r)
    lora._refreeze(model)
    vals = list(errors.values())
    return {"rank_before": before, "rank": after, "errors": errors,
            "max_error": max(vals) if vals else 0.0,
            "mean_error": sum(vals) / len(vals) if vals else 0.0}


def negate_into(model, name: str, target: str = UNFOLD) -> None:
    """Move adapter `name` into `target` with its sign flipped (exact; ranks concatenate);
    `target` stays disabled: only the reward model and the judge turn it on."""
    for _, m in lora.lora_layers(model):
        if name in m.adapters:
            m.adapters[name].lora_b = -m.adapters[name].lora_b
    names = ([target] if target in lora.adapter_names(model) else []) + [name]
    lora.combine_adapters(model, names, target, enabled=False)


def set_base_weights(model, checkpoint: Path) -> int:
    """The LoRA'd layers' base weights from a (folded) checkpoint; returns how many were set."""
    from ..export.fuse import _weight_files
    from ..io import load_safetensors

    layers = dict(lora.lora_layers(model))
    n = 0
    for f in _weight_files(Path(checkpoint)):
        tensors = load_safetensors(f)
        for path, m in layers.items():
            w = tensors.get(f"{path}.weight")
            if w is None:
                continue
            if "weight" not in m.linear or tuple(w.shape) != tuple(m.linear.weight.shape):
                raise MindprintError(f"{f}: '{path}.weight' does not fit this model's layer")
            m.linear.weight = w.astype(m.linear.weight.dtype)
            n += 1
    if n != len(layers):
        raise MindprintError(f"{checkpoint}: has {n} of the {len(layers)} LoRA'd weights")
    mx.eval(model.parameters())
    return n


def share_base_weights(model) -> None:
    """Rank 0's base weights of the LoRA'd layers on every rank (a folded base that only
    rank 0's disk holds): the same bits everywhere, sent one weight at a time, so no rank
    holds a second copy of them all. Nothing to do on one process."""
    from .. import distributed as dist

    if dist.size() == 1:
        return
    for _, m in lora.lora_layers(model):
        m.linear.weight = dist.broadcast(m.linear.weight)


# ---------------------------------------------------------------- the plan (pure)

def default_rank(sft_rank: int, ppo_rank: int | None) -> int:
    """`merge.rank: 0`: the most one topic can add, its SFT rank plus its PPO rank."""
    return int(sft_rank) + int(ppo_rank or 0)


def final_size(mode: str, rank: int, units: list[list[tuple[int, int]]], per_rank_params: int,
               base_bytes: int = 0) -> dict:
    """Rank, parameters and bytes (float32) of the final adapter.

    units: per unit, per trainable topic, (rank without PPO, rank with PPO); per_rank_params:
    LoRA parameters per unit of rank (sum of in + out over the adapted projections and layers).
    Returns {"mode", "rank_min", "rank_max", "params_max", "bytes_max", "extra_bytes", "note"}."""
    lo = [sum(t[0] for t in u) for u in units]
    hi = [sum(t[1] for t in u) for u in units]
    extra, note = 0, ""
    if mode == "svd":
        rmin, rmax = min(rank, sum(lo)), min(rank, sum(hi))
        note = f"each unit and the whole curriculum compressed to rank {rank} (SVD)"
    elif mode == "fold_into_base":
        rmin, rmax = (lo[-1], hi[-1]) if units else (0, 0)
        extra = base_bytes * max(0, len(units) - 1)
        note = (f"the last unit's adapter, on a folded base checkpoint "
                f"({max(0, len(units) - 1)} written, one per earlier unit)")
    else:
        rmin, rmax = sum(lo), sum(hi)
        note = "every topic's ranks concatenated"
    return {"mode": mode, "rank_min": rmin, "rank_max": rmax,
            "params_max": rmax * per_rank_params, "bytes_max": 4 * rmax * per_rank_params,
            "extra_bytes": extra, "note": note}


def plan_final_sizes(cfg, plan: list[dict], shape) -> list[dict]:
    """`final_size` of every mode for a pipeline config, its topic plan and a ModelShape."""
    from ..memory import _lora_params
    sft, ppo = cfg.sft, cfg.ppo
    r_sft = sft.lora_rank
    r_ppo = ppo.lora_rank if cfg.run_ppo else 0
    targets = sft.lora_targets
    layers = sft.num_layers or None
    per_rank = _lora_params(shape, targets, 1, layers)
    units: dict[str, list] = {}
    for p in plan:
        if p["plan"]["trainable"]:
            units.setdefault(p["unit"], []).append((r_sft, r_sft + r_ppo))
    k = cfg.merge.rank or default_rank(r_sft, r_ppo)
    return [dict(final_size(m, k, list(units.values()), per_rank, shape.weight_bytes),
                 chosen=m == cfg.merge.mode) for m in MODES]


def format_final_sizes(rows: list[dict]) -> str:
    from ..memory import fmt_bytes

    out = ["final adapter by merge.mode (rank: without PPO - with PPO on every topic):"]
    for r in rows:
        rank = f"{r['rank_min']}" + (f"-{r['rank_max']}" if r["rank_max"] != r["rank_min"] else "")
        extra = f" + {fmt_bytes(r['extra_bytes'])} of folded base checkpoints" if r["extra_bytes"] else ""
        out.append(f"  {'*' if r['chosen'] else ' '} {r['mode']:<15} rank {rank:<8} "
                   f"{r['params_max'] / 1e6:.2f}M params, {fmt_bytes(r['bytes_max'])}{extra}"
                   f"  ({r['note']})")
    return "\n".join(out)


def repair_line(rep: dict) -> str:
    return (f"repaired ({rep['epochs']} epochs of SFT, {rep['steps']} steps on {rep['records']} "
            f"records): loss {rep['loss_before']:.4f} -> {rep['loss_after']:.4f}")


def _svd_lines(label: str, v: dict) -> list[str]:
    """The report's lines for one svd compression (and its repair pass, if any)."""
    lines = [f"- {label}: svd rank {v['rank_before']} -> {v['rank']}, relative error (Frobenius, "
             f"per projection) max {v['max_error']:.4f}, mean {v['mean_error']:.4f}"]
    if v.get("repair"):
        lines.append(f"  - {repair_line(v['repair'])}")
    return lines


def report_lines(state: dict) -> list[str]:
    """The report's merge section: each unit's SVD error or folded base, and the final adapter."""
    fin = state.get("final_merge") or {}
    units = {u: r for u, r in (state.get("units") or {}).items() if r.get("svd") or r.get("folded_base")}
    if not units and not fin.get("svd") and not fin.get("folded_base"):
        return []
    out = [f"## Merge ({fin.get('mode', 'svd' if any(r.get('svd') for r in units.values()) else 'fold_into_base')})", ""]
    for u, r in units.items():
        if r.get("svd"):
            out += _svd_lines(u, r["svd"])
        if r.get("folded_base"):
            out.append(f"- {u}: folded into the base checkpoint `{r['folded_base']}`; later units train on it")
    if fin.get("svd"):
        out += _svd_lines("final adapter", fin["svd"])
    if fin.get("folded_base"):
        out.append(f"- final adapter: sits on the folded base `{fin['folded_base']}` (not on "
                   f"`{fin.get('original_base')}`): load it with that checkpoint")
    return out + [""]


# ---------------------------------------------------------------- what the runner calls

class Merger:
    """The runner's hooks for `merge.mode`; concat makes every one a no-op."""

    def __init__(self, run: Any):
        self.run = run
        self.mode = run.cfg.merge.mode
        self.base = str(run.cfg.model)      # the base the current unit trains on
        self.folded: str | None = None      # run_dir-relative folded checkpoint, when any

    def rank(self) -> int:
        cfg = self.run.cfg
        r_ppo = cfg.ppo.lora_rank if cfg.run_ppo else 0
        return cfg.merge.rank or default_rank(cfg.sft.lora_rank, r_ppo)

    def check(self) -> None:
        """Before anything trains: fold_into_base needs a full-precision checkpoint."""
        if self.mode != "fold_into_base":
            return
        from ..models.load import read_model_config, resolve_model_path

        c = read_model_config(resolve_model_path(self.run.cfg.model))
        if c.get("quantization") or c.get("quantization_config"):
            raise MindprintError(f"merge.mode fold_into_base: {self.run.cfg.model} is a quantized "
                                 "checkpoint; folding needs a full-precision base")

    def unit_merged(self, unit: str, uname: str, prior: list[str], topics: list) -> dict:
        """svd: compress the unit's adapter (before it is saved); its record for state.json."""
        if self.mode != "svd":
            return {}
        info = self._compress(uname)
        self.run.echo(f"[unit {unit}] svd: rank {info['rank_before']} -> {info['rank']}, "
                      f"relative error max {info['max_error']:.4f}, mean {info['mean_error']:.4f}")
        rep = self._repair(uname, prior + [uname], f"unit-{unit}")
        if rep:
            info["repair"] = rep
            self.run.echo(f"[unit {unit}] svd repair: {rep['steps']} steps on {rep['records']} "
                          f"records, loss {rep['loss_before']:.4f} -> {rep['loss_after']:.4f}")
        self._requiz_retention(topics, prior + [uname])
        return {"svd": info}

    def _compress(self, name: str) -> dict:
        """`compress_adapter`; under mlx.launch the ranks then take rank 0's factors (an
        eigendecomposition on another Mac's CPU may differ in the last bits, and the ranks
        must keep training identical weights)."""
        from .. import distributed as dist
        from ..models.adapters import set_adapter_weights

        info = compress_adapter(self.run.model, name, self.rank())
        if dist.size() > 1:
            set_adapter_weights(self.run.model, name,
                                dist.broadcast(lora.adapter_state(self.run.model, name)))
        return info

    def _repair(self, name: str, active: list[str], label: str) -> dict:
        """`merge.repair_epochs` > 0: SFT of the compressed adapter `name` (trainable, the
        others frozen, `active` on) on the SFT records of every topic trained so far, with
        `cfg.sft`'s settings (seeded, so a rerun after a kill gives the same factors).
        Returns {"epochs", "steps", "records", "loss_before", "loss_after"} (the completion
        loss on those records), or {} when off."""
        import dataclasses
        import shutil

        from ..train.sft import train_sft

        run = self.run
        epochs = run.cfg.merge.repair_epochs
        records = [r for t in run.trained for r in t.sft]
        if not epochs or not records:
            return {}
        scfg = dataclasses.replace(run.cfg.sft, epochs=epochs, max_steps=0, eval_every=0,
                                   replay_fraction=0.0, save_every=10 ** 9)
        work = run.run_dir / "work" / "svd_repair" / label
        shutil.rmtree(work, ignore_errors=True)       # checkpoint-free: a rerun starts afresh
        with lora.active_adapters(run.model, active):
            res = train_sft(run.model, run.tok, records, scfg, work, adapter_name=name,
                            eval_records=records, resume=False, progress=False, existing=True)
        lora.set_trainable(run.model, name, False)
        shutil.rmtree(work, ignore_errors=True)
        return {"epochs": epochs, "steps": res.steps, "records": len(records),
                "loss_before": res.eval_loss_start, "loss_after": res.eval_loss}

    def _requiz_retention(self, topics: list, active: list[str]) -> None:
        """The retention row of the unit's last topic, graded again on the compressed adapter
        (the uncompressed row is kept under retention.before_svd)."""
        from .. import distributed as dist
        from .phases import quiz_many
        from .retention import continual_metrics

        run = self.run
        ret = run.state.data.get("retention")
        done = [t for t in topics if run.state.phase(t.key, "final") is not None]
        if not run.cfg.eval.retention or not ret or not done or done[-1].key not in ret["rows"]:
            return
        last = done[-1].key
        row = dist.on_main(lambda: {k: q.score for k, q in quiz_many(run, list(run.trained),
                                                                     active).items()})
        ret.setdefault("before_svd", {}).setdefault(last, ret["rows"][last])
        ret["rows"][last] = row
        ret["metrics"] = continual_metrics(ret["rows"], ret["order"])
        run.state.save()

    def after_unit(self, ui: int, unit: str, uname: str, merged_dir: Path, prior: list[str],
                   rec: dict, last: bool) -> list[str]:
        """fold_into_base (every unit but the last): write the folded checkpoint (rank 0),
        train on it (every rank)."""
        if self.mode != "fold_into_base" or last or uname not in prior:
            return prior
        from .. import distributed as dist
        from ..export.fuse import fuse

        run = self.run
        out = run.run_dir / FOLDED_DIR / f"unit-{ui}"
        base = run.run_dir / self.folded if self.folded else self.base
        dist.on_main(lambda: fuse(base, merged_dir, out) and None)
        rec["folded_base"] = run.state.rel(out)
        run.echo(f"[unit {unit}] folded into the base: {rec['folded_base']}")
        return self._fold(uname, prior, rec["folded_base"])

    def resumed_unit(self, uname: str, prior: list[str], rec: dict) -> list[str]:
        """A unit done in an earlier session: load its folded base again, if it was folded."""
        if self.mode != "fold_into_base" or not rec.get("folded_base") or uname not in prior:
            return prior
        return self._fold(uname, prior, rec["folded_base"])

    def _fold(self, uname: str, prior: list[str], folded_rel: str) -> list[str]:
        """The folded checkpoint's weights in memory (rank 0 reads them, every rank takes
        rank 0's), the unit adapter moved into `unfold`; the adapters left below."""
        from .. import distributed as dist

        run = self.run
        dist.on_main(lambda: set_base_weights(run.model, run.run_dir / folded_rel))
        share_base_weights(run.model)
        negate_into(run.model, uname)
        self.folded = folded_rel
        for scorer in {id(s): s for s in (run.rm, getattr(run, "judge", None)) if s is not None}.values():
            scorer.under = [UNFOLD]
        return [p for p in prior if p != uname]

    def final(self, name: str) -> dict:
        """The final adapter: svd compresses it; its metadata says how it was merged and on
        which base it sits. Returns the metadata (also stored in state.json)."""
        run = self.run
        meta: dict = {"merge": {"mode": self.mode}}
        if self.mode == "svd":
            info = self._compress(name)
            run.echo(f"final adapter: svd rank {info['rank_before']} -> {info['rank']}, relative "
                     f"error max {info['max_error']:.4f}, mean {info['mean_error']:.4f}")
            if not run.state.data.get("final_adapter"):    # else the saved one is what ships
                rep = self._repair(name, [name], "final")
                if rep:
                    info["repair"] = rep
                    run.echo(f"final adapter: svd repair: {rep['steps']} steps on "
                             f"{rep['records']} records, loss {rep['loss_before']:.4f} -> "
                             f"{rep['loss_after']:.4f}")
            meta["merge"].update(rank=info["rank"], svd=info)
        if self.mode == "fold_into_base" and self.folded:
            path = str((run.run_dir / self.folded).resolve())
            meta["merge"].update(folded_base=self.folded, original_base=self.base)
            meta.update(base_model=path, base_model_path=path, base_fingerprint=None)
        return meta

