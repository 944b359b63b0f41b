"""The curriculum runner: reward model once, then per topic SFT -> quiz -> PPO -> quiz,
and after each unit merge -> verify -> continue on the merged (frozen) weights.

Composition (one base in memory, adapters stacked by name):
- prior units: one frozen adapter each, `u0`, `u1`, ... (loaded from
  merged_adapters/{unit}_merged on resume), always active;
- the current unit: a running frozen adapter `u{i}` into which each finished topic's
  `sft` (and `ppo`) adapters are folded with `models.lora.combine_adapters` (exact: ranks
  concatenate), so the next topic of the unit trains on top of everything before it;
- the topic being trained: `sft` (trainable during SFT, then frozen), then `ppo`
  (trainable, with `sft` and everything below frozen: the reference policy is the model
  without `ppo`).
After the unit's last topic, `u{i}` *is* the unit's merged adapter: it is saved to
merged_adapters/{unit}_merged (an mlx-lm adapter directory, loadable on its own on the
base after the prior units' merged adapters), verified, and kept frozen for later units.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from .. import evaluate as ev
from ..config import to_dict
from ..errors import Interrupted, MindprintError
from ..io import append_jsonl, atomic_write_text, safe_name, topic_slug
from ..models import lora
from ..stop import graceful_sigint, stop_requested
from .config import PipelineConfig, resolve_section, resolved_dict
from .plan import estimate, format_estimate, format_plan, load_curriculum, plan_topics
from .report import summary_table, write_metrics_csv, write_report
from .retention import continual_metrics, replay_count
from .state import RunState, check_resume, data_hashes, has_progress, write_run_json

log = logging.getLogger(__name__)

PIPELINE_METRICS = "pipeline.jsonl"


@dataclasses.dataclass
class PipelineResult:
    run_dir: Path
    state: dict
    status: str                     # "finished" | "interrupted" | "stopped: ..." | "dry run"
    plan: list[dict]
    estimate: dict | None = None
    report: Path | None = None


# ---------------------------------------------------------------- helpers

def _set_fields(cfg: Any, values: dict[tuple[str, ...], Any]) -> Any:
    """dataclasses.replace with the first existing field name of each key tuple."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    names = {f.name for f in dataclasses.fields(cfg)}
    kw = {}
    for keys, v in values.items():
        for k in keys:
            if k in names:
                kw[k] = v(getattr(cfg, k)) if callable(v) else v
                break
    return dataclasses.replace(cfg, **kw)


def _topic_sft_config(cfg: PipelineConfig, plan: dict) -> Any:
    sft = resolve_section(cfg, "sft")
    p = plan["plan"]
    return _set_fields(sft, {("epochs", "num_epochs", "sft_epochs"): p["sft_epochs"],
                             ("batch_size",): p["batch_size"],
                             ("learning_rate", "lr"): (lambda lr: lr * p["lr_multiplier"])})


def _quiz_items(topic, persona, max_questions: int) -> list[ev.QuizItem]:
    """The topic's quiz questions as single user turns (the layout the SFT prompts have: the
    data loader adds no persona system prompt); without any, its SFT examples serve."""
    if topic.quiz:
        return ev.quiz_items([(q.question, q.reference_answer) for q in topic.quiz[:max_questions]])
    return [ev.QuizItem(tuple(r.prompt), r.completion) for r in topic.sft[:max_questions]]


def _ppo_prompts(topic, persona) -> list[list[dict]]:
    """PPO's prompts: the topic's SFT and preference prompts (unique). Never its quiz
    questions: the quiz grades PPO's result, so it must stay held out."""
    out, seen = [], set()
    prompts = [list(r.prompt) for r in topic.sft] + [list(r.prompt) for r in topic.preference]
    for p in prompts:
        key = repr(p)
        if key not in seen:
            seen.add(key)
            out.append([dict(m) for m in p])
    return out


def drop_quiz_repeats(dataset, curriculum) -> dict[str, int]:
    """Remove training records whose prompt repeats a quiz question (any topic's), from the
    dataset (reward model) and every topic (SFT, PPO prompts); returns the counts dropped."""
    from ..data.records import quiz_repeats

    counts = {}
    for kind in ("sft", "preference", "distinctions"):
        bad = {id(r) for r, _ in quiz_repeats(getattr(dataset, kind), dataset.quiz)}
        counts[kind] = len(bad)
        setattr(dataset, kind, [r for r in getattr(dataset, kind) if id(r) not in bad])
        for t in curriculum.topics:
            setattr(t, kind, [r for r in getattr(t, kind) if id(r) not in bad])
    return counts


def split_pairs(pairs: list, seed: int) -> tuple[list, list]:
    """Two disjoint halves of the preference pairs, each covering every topic (alternating
    within a topic after a seeded shuffle): one trains the reward model PPO climbs, the
    other the judge that grades the quiz."""
    import random

    by_topic: dict[tuple, list] = {}
    for p in pairs:
        by_topic.setdefault((p.unit, p.chapter, p.topic), []).append(p)
    rng = random.Random(seed)
    a, b = [], []
    flip = 0
    for k in by_topic:
        group = list(by_topic[k])
        rng.shuffle(group)
        for i, p in enumerate(group):
            (a if (i + flip) % 2 == 0 else b).append(p)
        flip += len(group) % 2     # odd groups alternate which half gets the extra pair
    return a, b


def score_trend(history: list[dict], n: int = 3, key: str = "objective/scores") -> dict:
    """Mean training-batch score of the first `n` and the last `n` PPO steps."""
    xs = [float(h[key]) for h in history if key in h]
    if not xs:
        return {"first": None, "last": None, "rises": None}
    first, last = sum(xs[:n]) / len(xs[:n]), sum(xs[-n:]) / len(xs[-n:])
    return {"first": first, "last": last, "rises": last > first}


def _target_density(topic, markers) -> float:
    texts = [r.completion for r in topic.sft] + [q.reference_answer for q in topic.quiz]
    return ev.target_marker_density(texts, markers)


def _copy_metrics(work: Path, metrics_dir: Path, prefix: str) -> list[str]:
    """A trainer's *.jsonl files from its work dir into metrics/, atomically."""
    out = []
    for f in sorted(work.rglob("*.jsonl")) if work.exists() else []:
        stem = f.stem if f.stem not in ("metrics", "log") else ""
        name = safe_name(f"{prefix}{'-' + stem if stem else ''}") + ".jsonl"
        dst = metrics_dir / name
        atomic_write_text(dst, f.read_text(encoding="utf-8", errors="replace"))
        out.append(name)
    return out


def _is_adapter_dir(d: Any) -> bool:
    return d is not None and (Path(d) / "adapter_config.json").is_file()


def _adopt_adapter(model, before: set[str], name: str, result_dir: Any) -> None:
    """After a trainer ran: make sure its adapter is in the model as frozen `name`.

    Trainers may name their adapter differently, or leave it out of the model (then it is
    loaded from the directory they return). Renaming goes through combine_adapters, exact."""
    from ..models.adapters import load_adapter

    new = [n for n in lora.adapter_names(model) if n not in before]
    new = [n for n in new if n == name] or [n for n in new if "value" not in n and "critic" not in n]
    if name in lora.adapter_names(model):
        pass
    elif len(new) == 1:
        lora.combine_adapters(model, new, name)
    elif _is_adapter_dir(result_dir):
        for n in new:
            lora.remove_adapter(model, n)
        load_adapter(model, result_dir, name=name)
    else:
        raise MindprintError(f"the trainer left no adapter '{name}' in the model "
                             f"(new adapters: {new}) and no adapter directory ({result_dir})")
    for extra in [n for n in lora.adapter_names(model) if n not in before and n != name]:
        lora.remove_adapter(model, extra)  # e.g. a separate critic: not part of the policy
    lora.set_trainable(model, name, False)


def _check_composable(cfg: PipelineConfig) -> None:
    """Topic adapters are folded into one unit adapter per layer (ranks concatenate), and an
    mlx-lm adapter file has one rank for every layer: SFT and PPO must cover the same layers."""
    from ..config import ConfigError

    sft, ppo = resolve_section(cfg, "sft", strict=False), resolve_section(cfg, "ppo", strict=False)
    t_sft = sorted(_get(sft, "lora_targets") or [])
    t_ppo = sorted(_get(ppo, "lora_targets") or [])
    if t_sft and t_ppo and t_sft != t_ppo:
        raise ConfigError(f"sft.lora_targets {t_sft} and ppo.lora_targets {t_ppo} must be equal: each "
                          "unit's adapters are combined into one adapter, which needs the same layers")
    n_sft, n_ppo = _get(sft, "num_layers") or 0, _get(ppo, "num_layers") or 0
    if n_sft != n_ppo:
        raise ConfigError(f"sft.num_layers ({n_sft}) and ppo's LoRA layers ({n_ppo or 'all'}) must match: "
                          "each unit's adapters are combined into one adapter, which needs the same layers")


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


# ---------------------------------------------------------------- the run

class _Run:
    def __init__(self, cfg: PipelineConfig, resume: bool, echo: Callable[[str], None]):
        self.cfg, self.resume, self.echo = cfg, resume, echo
        self.run_dir = Path(cfg.run_dir)
        self.metrics = self.run_dir / "metrics"
        self.work = self.run_dir / "work"
        self.resolved = resolved_dict(cfg)

    # -- setup
    def prepare(self, dry_run: bool) -> PipelineResult | None:
        cfg = self.cfg
        _check_composable(cfg)
        self.dataset, self.curriculum = load_curriculum(cfg)
        self.dropped = drop_quiz_repeats(self.dataset, self.curriculum)
        if any(self.dropped.values()):
            self.echo("held-out quiz: dropped training records that repeat a quiz question: "
                      + ", ".join(f"{n} {k}" for k, n in self.dropped.items() if n))
        self.plan = plan_topics(cfg, self.dataset, self.curriculum)
        self.hashes = data_hashes(cfg.data_dir)
        if dry_run:
            import yaml

            est = estimate(cfg, self.plan, self.dataset)
            self.echo("# resolved config\n" + yaml.safe_dump(self.resolved, sort_keys=False))
            self.echo(f"# topic plan ({len(self.plan)} topics, curriculum order)\n" + format_plan(self.plan))
            self.echo("\n# estimate\n" + format_estimate(est))
            self.echo("\ndry run: nothing trained, nothing written.")
            return PipelineResult(self.run_dir, {}, "dry run", self.plan, est)
        state_file = self.run_dir / "state.json"
        if state_file.exists() and not self.resume and has_progress(self.run_dir):
            raise MindprintError(f"{self.run_dir} already holds a run (state.json); pass --resume to "
                                 "continue it, or choose another run_dir")
        if self.resume and state_file.exists():
            check_resume(self.run_dir, self.resolved, self.hashes)
            if not (self.run_dir / "run.json").exists():
                write_run_json(self.run_dir, self.resolved, cfg.seed, self.hashes, self.plan)
        else:
            self.resume = False
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_json(self.run_dir, self.resolved, cfg.seed, self.hashes, self.plan)
        self.state = RunState.load(self.run_dir)
        self.state.data["plan"] = self.plan
        self.state.data["quiz_repeats_dropped"] = self.dropped
        self.state.data.pop("stopped", None)
        self.state.save()
        return None

    def load_model(self) -> None:
        from ..models import load

        mx.random.seed(self.cfg.seed)
        self.echo(f"loading {self.cfg.model}" + (f" ({self.cfg.quantize}-bit)" if self.cfg.quantize else ""))
        self.model, self.tok = load(self.cfg.model, quantize=self.cfg.quantize)

    def check_stop(self) -> None:
        if stop_requested():
            raise Interrupted("pipeline")

    # -- reward model and judge
    def reward_model(self) -> Any:
        """The reward model PPO climbs and the judge that grades the quiz's preference part.

        eval.judge: `split` trains them on two disjoint halves of the pairs (the gate is
        not graded by the reward PPO optimises); `reward` uses the reward model for both;
        any other value is the directory of a reward model to judge with."""
        from ..train.reward import RewardModel

        cfg = self.cfg
        pairs = list(self.dataset.preference) + list(self.dataset.distinctions)
        judge = cfg.eval.judge
        if judge == "split":
            reward_pairs, judge_pairs = split_pairs(pairs, cfg.seed)
        else:
            reward_pairs, judge_pairs = pairs, []
        if cfg.reward.path:
            adapter_dir = Path(cfg.reward.path)
            self.state.data["reward_model"] = {"done": True, "adapter_dir": str(adapter_dir), "reused": True}
            self.state.save()
        else:
            adapter_dir = self._train_scorer("reward_model", "reward", reward_pairs)
        judge_dir = self._train_scorer("judge_model", "judge", judge_pairs) if judge == "split" else None
        rm = RewardModel.load(self.model, self.tok, adapter_dir)
        if judge_dir is not None:
            self.judge = RewardModel.load(self.model, self.tok, judge_dir, name="judge")
        elif judge == "reward":
            self.judge = rm
        else:
            self.judge = RewardModel.load(self.model, self.tok, Path(judge), name="judge")
            self.state.data["judge_model"] = {"done": True, "adapter_dir": str(judge), "reused": True}
        lora.set_active(self.model, [])
        return rm

    def _train_scorer(self, key: str, label: str, pairs: list) -> Path:
        """Train (or find done) a Bradley-Terry scorer into run_dir/{key}; its adapter dir."""
        from ..train.reward import train_reward_model

        cfg, st = self.cfg, self.state
        rec = st.data.get(key)
        if rec and (self.run_dir / rec["adapter_dir"]).exists():
            self.echo(f"{label} model: done ({rec['adapter_dir']})")
            return self.run_dir / rec["adapter_dir"]
        if not pairs:
            raise MindprintError(f"{cfg.data_dir}: no preference pairs or distinctions to train "
                                 f"the {label} model on (or set reward.path / eval.judge)")
        # distinctions go in as such: RewardConfig.include_distinctions decides
        rcfg = resolve_section(cfg, "reward.train")
        self.echo(f"{label} model: training on {len(pairs)} pairs")
        lora.set_active(self.model, [])
        before = set(lora.adapter_names(self.model))
        res = train_reward_model(self.model, self.tok, pairs, rcfg, self.run_dir / key, resume=self.resume)
        for n in [n for n in lora.adapter_names(self.model) if n not in before]:
            lora.remove_adapter(self.model, n)   # reloaded by the caller, frozen and disabled
        adapter_dir = Path(res.adapter_dir)
        mfiles = _copy_metrics(self.run_dir / key, self.metrics, label)
        st.data[key] = {
            "done": True, "adapter_dir": st.rel(adapter_dir), "metrics": mfiles, "pairs": len(pairs),
            "best_val_loss": res.best_val_loss, "best_val_accuracy": res.best_val_accuracy,
            "stopped_early": res.stopped_early, "epochs": res.epochs}
        st.save()
        self.echo(f"{label} model: validation accuracy {res.best_val_accuracy:.3f}")
        return adapter_dir

    # -- topics
    def fold(self, acc: str | None, unit_name: str, names: list[str]) -> str:
        lora.combine_adapters(self.model, ([acc] if acc else []) + names, unit_name)
        return unit_name

    def load_done_topic(self, key: str, acc: str | None, unit_name: str) -> str:
        from ..models.adapters import load_adapter

        names = []
        for ph in ("sft", "ppo"):
            rec = self.state.phase(key, ph)
            if rec and rec.get("adapter"):
                load_adapter(self.model, self.run_dir / rec["adapter"], name=ph)
                names.append(ph)
        return self.fold(acc, unit_name, names) if names else acc

    def _trained(self, key: str) -> bool:
        return self.state.phase(key, "final") is not None

    def topic_done(self, key: str) -> bool:
        return self.state.phase(key, "final") is not None or self.state.phase(key, "skip") is not None

    def quiz(self, topic, active: list[str]) -> ev.QuizResult:
        return self.quiz_many([topic], active)[topic.key]

    def quiz_many(self, topics: list, active: list[str]) -> dict[str, ev.QuizResult]:
        """The quiz of each topic with the `active` adapters; greedy answers in one batch."""
        markers = list(getattr(self.dataset.persona, "voice_markers", []) or [])
        items = {t.key: _quiz_items(t, self.dataset.persona, self.cfg.eval.max_questions) for t in topics}
        flat = [it.messages for t in topics for it in items[t.key]]
        out = {}
        with lora.active_adapters(self.model, active):
            answers = ev.greedy_answers(self.model, self.tok, flat, max_tokens=self.cfg.eval.max_tokens)
            i = 0
            for t in topics:
                n = len(items[t.key])
                out[t.key] = ev.evaluate_quiz(
                    self.model, self.tok, items[t.key], markers=markers,
                    target_density=_target_density(t, markers), reward=self.judge,
                    weights=self.cfg.eval.weights, max_tokens=self.cfg.eval.max_tokens,
                    answers=answers[i:i + n])
                i += n
        return out

    def retention_row(self, after: str, active: list[str]) -> None:
        """Quiz every topic trained so far with everything up to `after` (one matrix row)."""
        ret = self.state.data.setdefault("retention", {"rows": {}, "order": []})
        if not self.cfg.eval.retention or after in ret["rows"]:
            return
        # the topic itself was just graded with these same adapters (its final quiz)
        res = self.quiz_many([t for t in self.trained if t.key != after], active)
        ret["rows"][after] = {t.key: res[t.key].score if t.key in res else
                              self.state.phase(after, "final")["score"] for t in self.trained}
        ret["order"] = [t.key for t in self.trained]
        ret["metrics"] = continual_metrics(ret["rows"], ret["order"])
        self.state.save()
        earlier = [k for k in ret["order"] if k != after]
        if earlier:
            m = ret["metrics"]
            self.echo(f"[{after}] retention: earlier topics now "
                      + ", ".join(f"{ret['rows'][after][k]:.2f}" for k in earlier)
                      + f" (average {m['average']:.3f}, backward transfer {m['backward_transfer']:+.3f})")

    def final_eval(self, final_dir: Path) -> None:
        """Grade what the user takes home: the final adapter, loaded back from disk, on every
        trained topic's quiz. Its pass rate is the run's headline."""
        from ..models.adapters import load_adapter

        st = self.state
        if st.data.get("final_eval"):
            return
        load_adapter(self.model, final_dir, name="final_check")
        res = self.quiz_many(list(self.trained), ["final_check"])
        lora.remove_adapter(self.model, "final_check")
        plans = {p["key"]: p for p in self.plan}
        st.data["final_eval"] = {k: {"score": q.score, "parts": q.parts, "items": q.items,
                                     "passed": q.score >= plans[k]["plan"]["pass_threshold"]}
                                 for k, q in res.items()}
        ret = st.data.setdefault("retention", {"rows": {}, "order": []})
        ret["order"] = ret["order"] or [t.key for t in self.trained]
        ret["final"] = {k: q.score for k, q in res.items()}
        ret["metrics"] = continual_metrics(ret["rows"], ret["order"], final=ret["final"])
        st.save()
        n = sum(v["passed"] for v in st.data["final_eval"].values())
        self.echo(f"final adapter: {n}/{len(res)} topics pass their quiz "
                  f"(average {ret['metrics']['average']:.3f})")

    def policy_reward(self, prompts: list, active: list[str], pcfg: Any) -> float:
        """Mean reward of sampled answers to all `prompts` (fixed sampling keys, so the
        numbers before and after PPO compare the same draws): PPO's effect, measured."""
        from ..ppo.rollout import generate_batch

        enc = [ev.encode_prompt(self.tok, p) for p in prompts]
        n = self.cfg.eval.reward_samples
        T = int(getattr(pcfg, "max_new_tokens", self.cfg.eval.max_tokens))
        temp = float(getattr(pcfg, "temperature", 1.0))
        top_p = float(getattr(pcfg, "top_p", 1.0))
        scores = []
        with lora.active_adapters(self.model, active):
            for k in range(n):
                for i in range(0, len(enc), 16):
                    g = generate_batch(self.model, enc[i:i + 16], T, ev.eos_ids(self.tok),
                                       ev.pad_id(self.tok), temp, top_p,
                                       mx.random.key(self.cfg.seed * 1000 + 7919 + k * 101 + i))
                    s = self.rm.score_tokens(g.tokens, g.lengths)
                    scores.extend(float(x) for x in s.tolist())
        return float(sum(scores) / max(1, len(scores)))

    def log_eval(self, index: int, key: str, name: str, q: ev.QuizResult) -> None:
        append_jsonl(self.metrics / PIPELINE_METRICS, {
            "step": index, "topic": key, f"eval/{name}_score": q.score,
            **{f"eval/{name}_{k}": v for k, v in q.parts.items()}})

    def run_topic(self, index: int, topic, plan: dict, frozen: list[str]) -> list[str]:
        """Train one topic on top of the `frozen` adapters; returns the adapters to fold."""
        from ..models.adapters import adapter_metadata, load_adapter, load_heads, save_adapter

        st, key, cfg = self.state, topic.key, self.cfg
        adir = self.run_dir / "adapters" / Path(*[safe_name(p, "topic path") for p in Path(topic.rel_dir).parts])
        work = self.work / topic.rel_dir
        slug = topic_slug(topic.rel_dir, key)   # hashed: a/b__c and a__b/c differ
        meta = {"unit": topic.unit, "chapter": topic.chapter, "topic": topic.name,
                "frozen_below": frozen}
        if not plan["plan"]["trainable"]:
            st.finish_phase(key, "skip", {"reason": "; ".join(plan["reasons"])})
            self.echo(f"[{key}] skipped: {'; '.join(plan['reasons'])}")
            return []

        # SFT
        lora.set_active(self.model, frozen)
        rec = st.phase(key, "sft")
        if rec:
            load_adapter(self.model, self.run_dir / rec["adapter"], name="sft")
        else:
            from ..train.sft import train_sft

            scfg = _topic_sft_config(cfg, plan)
            pool = [r for t in self.trained for r in t.sft]
            n_replay = replay_count(len(topic.sft), scfg.replay_fraction, len(pool))
            self.echo(f"[{key}] SFT on {len(topic.sft)} examples"
                      + (f" + {n_replay} an epoch replayed from {len(pool)} of {len(self.trained)} "
                         "earlier topics" if n_replay else ""))
            before = set(lora.adapter_names(self.model))
            res = train_sft(self.model, self.tok, list(topic.sft), scfg, work / "sft",
                            adapter_name="sft", resume=self.resume, replay_records=pool,
                            replay_per_epoch=n_replay)
            _adopt_adapter(self.model, before, "sft", getattr(res, "adapter_dir", None))
            save_adapter(self.model, "sft", adir / "sft_adapter", metadata={**meta, "phase": "sft"})
            mfiles = _copy_metrics(work / "sft", self.metrics, f"sft-{slug}")
            st.finish_phase(key, "sft", {
                "adapter": st.rel(adir / "sft_adapter"), "artefacts": [st.rel(adir / "sft_adapter")],
                "train_loss": getattr(res, "train_loss", None), "eval_loss": getattr(res, "eval_loss", None),
                "steps": getattr(res, "steps", None), "metrics": mfiles, "replay_per_epoch": n_replay,
                "config": to_dict(scfg) if dataclasses.is_dataclass(scfg) else scfg})
            shutil.rmtree(work / "sft", ignore_errors=True)
        self.check_stop()

        # quiz after SFT
        active = frozen + ["sft"]
        rec = st.phase(key, "quiz")
        if rec is None:
            q = self.quiz(topic, active)
            st.finish_phase(key, "quiz", {"score": q.score, "parts": q.parts, "items": q.items,
                                          "target_marker_density": q.target_marker_density})
            self.log_eval(index, key, "quiz", q)
            rec = st.phase(key, "quiz")
        threshold = plan["plan"]["pass_threshold"]
        self.echo(f"[{key}] quiz {rec['score']:.3f} (threshold {threshold:.2f}; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in rec["parts"].items()) + ")")
        self.check_stop()

        # PPO when below the threshold
        rec_ppo = st.phase(key, "ppo")
        prompts = _ppo_prompts(topic, self.dataset.persona)
        if rec_ppo is None:
            reason = None
            if not cfg.run_ppo:
                reason = "run_ppo is false"
            elif rec["score"] >= threshold:
                reason = f"quiz {rec['score']:.3f} >= threshold {threshold:.2f}"
            elif not prompts:
                reason = "no prompts"
            if reason:
                st.finish_phase(key, "ppo", {"skipped": True, "reason": reason})
                self.echo(f"[{key}] PPO skipped: {reason}")
            else:
                from ..ppo import train_ppo

                pcfg = resolve_section(cfg, "ppo")
                self.echo(f"[{key}] PPO on {len(prompts)} prompts (quiz {rec['score']:.3f} < {threshold:.2f})")
                reward_before = self.policy_reward(prompts, active, pcfg)
                lora.set_active(self.model, active)
                before = set(lora.adapter_names(self.model))
                res = train_ppo(self.model, self.tok, prompts, self.rm.score_tokens, pcfg, work / "ppo",
                                frozen_adapters=active, resume=self.resume)
                _adopt_adapter(self.model, before, "ppo", getattr(res, "adapter_dir", None))
                reward_after = self.policy_reward(prompts, active + ["ppo"], pcfg)
                # keep the trainer's value head and metadata (stack, steps, config) beside ours
                rdir = getattr(res, "adapter_dir", None)
                heads = load_heads(rdir) if _is_adapter_dir(rdir) else None
                tmeta = adapter_metadata(rdir) if _is_adapter_dir(rdir) else {}
                save_adapter(self.model, "ppo", adir / "ppo_adapter",
                             metadata={**tmeta, **meta, "phase": "ppo"}, heads=heads or None)
                mfiles = _copy_metrics(work / "ppo", self.metrics, f"ppo-{slug}")
                if not mfiles and getattr(res, "history", None):
                    name = f"ppo-{slug}.jsonl"
                    atomic_write_text(self.metrics / name, "".join(
                        json.dumps(h, default=float) + "\n" for h in res.history))
                    mfiles = [name]
                st.finish_phase(key, "ppo", {
                    "adapter": st.rel(adir / "ppo_adapter"), "artefacts": [st.rel(adir / "ppo_adapter")],
                    "steps": res.steps, "mean_score_first": res.mean_score_first,
                    "mean_score_last": res.mean_score_last, "metrics": mfiles,
                    "reward_before": reward_before, "reward_after": reward_after,
                    "reward_gain": res.reward_gain, "reward_bias": res.reward_bias,
                    "trend": (trend := score_trend(res.history)),
                    "config": to_dict(pcfg) if dataclasses.is_dataclass(pcfg) else pcfg})
                shutil.rmtree(work / "ppo", ignore_errors=True)
                self.echo(f"[{key}] PPO: mean reward on the topic's prompts {reward_before:.3f} -> "
                          f"{reward_after:.3f}; training batches, mean of the first 3 -> last 3: "
                          f"{trend['first']:.3f} -> {trend['last']:.3f} "
                          f"({'rises' if trend['rises'] else 'DOES NOT RISE'})")
            rec_ppo = st.phase(key, "ppo")
        elif not rec_ppo.get("skipped"):
            load_adapter(self.model, self.run_dir / rec_ppo["adapter"], name="ppo")
        ran_ppo = not rec_ppo.get("skipped")
        self.check_stop()

        # final quiz
        names = ["sft"] + (["ppo"] if ran_ppo else [])
        if st.phase(key, "final") is None:
            if ran_ppo:
                q = self.quiz(topic, frozen + names)
                final = {"score": q.score, "parts": q.parts, "items": q.items}
                self.log_eval(index, key, "final", q)
            else:
                final = {k: rec[k] for k in ("score", "parts")}
            final["passed"] = final["score"] >= threshold
            st.finish_phase(key, "final", final)
            write_report(self.run_dir, st.data, self.resolved)
            self.echo(f"[{key}] final {final['score']:.3f}: {'pass' if final['passed'] else 'FAIL'}")
        return names

    def verify_unit(self, unit: str, topics: list, active: list[str]) -> list[dict]:
        out = []
        for t in topics:
            fin = self.state.phase(t.key, "final")
            if fin is None:
                continue
            q = self.quiz(t, active)
            drop = fin["score"] - q.score
            out.append({"key": t.key, "final": fin["score"], "merged": q.score, "drop": drop,
                        "parts": q.parts, "regression": drop > self.cfg.verify.tolerance})
        return out

    def check_lora(self) -> None:
        """Every section's LoRA layers exist in this model: fail before anything trains."""
        from ..guards import check_lora_fits

        sections = ["sft"] + (["ppo"] if self.cfg.run_ppo else []) + \
            ([] if self.cfg.reward.path else ["reward.train"])
        for name in sections:
            sec = resolve_section(self.cfg, name, strict=False)
            check_lora_fits(self.model, name, _get(sec, "lora_targets"), _get(sec, "num_layers"))

    def reward_at_chance(self) -> str | None:
        """A stop reason when the trained reward model is no better than chance (PPO on it
        would optimise noise), unless reward.continue_at_chance."""
        from ..guards import reward_at_chance

        rec = self.state.data.get("reward_model") or {}
        if not self.cfg.run_ppo or rec.get("reused") or self.cfg.reward.continue_at_chance \
                or not reward_at_chance(rec.get("best_val_accuracy")):
            return None
        return (f"the reward model's validation accuracy is {rec.get('best_val_accuracy')} (chance: "
                "0.5), so PPO would optimise noise; add preference pairs or train it longer, or "
                "set reward.continue_at_chance=true to go on anyway")

    def run(self) -> str:
        from ..models.adapters import load_adapter, save_adapter

        st = self.state
        self.check_lora()
        self.rm = self.reward_model()
        chance = self.reward_at_chance()
        if chance:
            self.echo("STOPPED: " + chance)
            return "stopped: " + chance
        self.check_stop()
        plans = {p["key"]: p for p in self.plan}
        units: list[str] = []
        for t in self.curriculum.topics:
            if t.unit not in units:
                units.append(t.unit)
        prior: list[str] = []
        self.trained = []      # topics trained so far, in curriculum order (replay, retention)
        index = 0
        for ui, unit in enumerate(units):
            uname = f"u{ui}"
            topics = [t for t in self.curriculum.topics if t.unit == unit]
            merged_dir = self.run_dir / "merged_adapters" / f"{safe_name(unit, 'unit')}_merged"
            if st.unit_done(unit):
                self.trained += [t for t in topics if self._trained(t.key)]
                if st.data["units"][unit].get("merged"):
                    load_adapter(self.model, self.run_dir / st.data["units"][unit]["merged"], name=uname)
                    prior.append(uname)
                index += len(topics)
                continue
            acc = None
            for t in topics:
                index += 1
                if self.topic_done(t.key):
                    acc = self.load_done_topic(t.key, acc, uname)
                else:
                    frozen = prior + ([acc] if acc else [])
                    names = self.run_topic(index, t, plans[t.key], frozen)
                    if names:
                        acc = self.fold(acc, uname, names)
                if self._trained(t.key):
                    if t not in self.trained:
                        self.trained.append(t)
                    self.retention_row(t.key, prior + [acc])
                self.check_stop()
            # merge + verify
            rec = st.unit(unit)
            if acc:
                save_adapter(self.model, uname, merged_dir, metadata={
                    "unit": unit, "topics": [t.key for t in topics], "frozen_below": list(prior),
                    "composition": "sft (+ppo) of each topic, in curriculum order, ranks concatenated"})
                rec["merged"] = st.rel(merged_dir)
                rec["artefacts"] = [rec["merged"]]
                prior.append(uname)
            verify = self.verify_unit(unit, topics, list(prior))
            rec.update(verify=verify, done=True, tolerance=self.cfg.verify.tolerance)
            st.save()
            for v in verify:
                append_jsonl(self.metrics / PIPELINE_METRICS, {
                    "step": index, "topic": v["key"], "eval/merged_score": v["merged"], "eval/merge_drop": v["drop"]})
            bad = [v for v in verify if v["regression"]]
            self.echo(f"[unit {unit}] merged -> {rec.get('merged', '(nothing to merge)')}; verify: "
                      + (", ".join(f"{v['key']} {v['final']:.3f}->{v['merged']:.3f}" for v in verify) or "no topics"))
            if bad:
                msg = (f"regression after merging unit {unit}: "
                       + ", ".join(f"{v['key']} dropped {v['drop']:.3f}" for v in bad)
                       + f" (tolerance {self.cfg.verify.tolerance})")
                self.echo("WARNING: " + msg)
                if self.cfg.verify.stop_on_regression:
                    return "stopped: " + msg
            self.check_stop()
        # The whole curriculum as one adapter (every unit's merged adapter, ranks concatenated):
        # what `mindprint export peft` and `mlx_lm.generate --adapter-path` take.
        if prior:
            final_dir = self.run_dir / "final_adapter"
            lora.combine_adapters(self.model, list(prior), "final")
            if not st.data.get("final_adapter"):
                save_adapter(self.model, "final", final_dir, metadata={
                    "units": units, "composition": "all units' merged adapters, in order"})
                st.data["final_adapter"] = st.rel(final_dir)
                st.save()
            self.final_eval(final_dir)
        return "finished"


def run_pipeline(cfg: PipelineConfig, resume: bool = False, dry_run: bool = False,
                 echo: Callable[[str], None] | None = None) -> PipelineResult:
    """Run (or continue, or only plan) the curriculum of `cfg`; see the module docstring.

    A run holds the run directory's lock (`runlock`) for its life; resuming first repairs
    what a killed run left (`io.repair_tree`)."""
    from ..guards import check_model_ref
    from ..io import repair_tree
    from ..runlock import acquire

    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    check_model_ref(cfg.model)      # before run_dir is touched: a typo leaves nothing behind
    if dry_run:
        return _run_pipeline(cfg, resume, dry_run, echo)
    with acquire(cfg.run_dir, note=echo):
        if resume:
            for line in repair_tree(cfg.run_dir):
                echo(f"resume: {line}")
        return _run_pipeline(cfg, resume, dry_run, echo)


def _run_pipeline(cfg: PipelineConfig, resume: bool, dry_run: bool,
                  echo: Callable[[str], None]) -> PipelineResult:
    from .. import distributed as dist

    if not dry_run and dist.size() > 1:
        # The trainers are data parallel, but the pipeline around them (quizzes, merges,
        # state.json, reloading adapters rank 0 wrote) is not yet: refuse rather than let
        # ranks on other Macs look for files only rank 0 has.
        raise MindprintError("mindprint pipeline runs as one process (it is not data parallel yet); "
                             "under mlx.launch use mindprint sft, mindprint reward train or "
                             "mindprint ppo")
    run = _Run(cfg, resume, echo)
    early = run.prepare(dry_run)
    if early is not None:
        return early
    t0 = time.time()
    status = "interrupted"
    with graceful_sigint():
        try:
            run.load_model()
            status = run.run()
        except Interrupted:   # between phases, or a trainer mid-phase (checkpointed)
            status = "interrupted"
            echo("interrupted: state saved; continue with --resume")
        except BaseException as e:
            status = f"failed: {type(e).__name__}: {e}".strip()
            raise
        finally:
            st = run.state
            st.data["finished"] = status == "finished"
            if status != "finished":
                st.data["stopped"] = status
            st.data.setdefault("wall_seconds", 0.0)
            st.data["wall_seconds"] += time.time() - t0
            st.save()
            report = write_report(run.run_dir, st.data, run.resolved)
            write_metrics_csv(run.run_dir)
    if status == "finished":
        shutil.rmtree(run.work, ignore_errors=True)
        try:
            from ..plots import plot_run

            plot_run(run.run_dir)
        except MindprintError as e:
            echo(f"plots: {e}")
    return PipelineResult(run.run_dir, run.state.data, status, run.plan, report=report)


def summary(result: PipelineResult) -> str:
    return summary_table(result.state)
