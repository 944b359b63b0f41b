"""The pipeline's phases, as functions over one small run context (`Run`).

Reward model (and judge) once; per topic SFT -> quiz -> refine (PPO, when `decide` says so)
-> final quiz; per unit merge -> verify; at the end the final adapter and its grade. Every
topic phase goes through `step`: skip it when state.json says it is done (restoring what
it left in memory), else run it and record it, then stop if a stop was requested. The
decisions themselves are `decide`'s pure functions.

Composition (one base in memory, adapters stacked by name):
- prior units: one frozen adapter each, `u0`, `u1`, ... (loaded from
  merged_adapters/{unit}_merged on resume), always active;
- the current unit: a running frozen adapter `u{i}` into which each finished topic's
  `sft` (and refine) adapters are folded with `models.lora.combine_adapters` (exact: ranks
  concatenate), so the next topic of the unit trains on top of everything before it;
- the topic being trained: `sft` (trainable during SFT, then frozen), then the refine
  method's adapter, named after the method (`ppo`, `grpo`, `rloo`, `dpo`, `ditto`; see
  `refine`), trainable, with `sft` and everything below frozen: the reference policy is the
  model without it.
After the unit's last topic, `merge_unit` saves `u{i}` as the unit's merged adapter (an
mlx-lm adapter directory, loadable on its own on the base after the prior units' merged
adapters); `verify` re-grades the unit's topics with it.

Under `mlx.launch` every rank walks the same phases: training on all of them (data
parallel), the quizzes and every file write on rank 0 alone (`distributed.on_main`: the
others receive its record, or its error), adapters rank 0 wrote read through
`distributed.fetch_dir` (the others need no copy of run_dir), and a stop agreed by all.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from .. import distributed as dist
from .. import evaluate as ev
from ..config import to_dict
from ..data.batching import eos_ids, pad_id
from ..errors import MindprintError
from ..io import append_jsonl, atomic_write_text, safe_name, topic_slug
from ..models import lora
from ..errors import Interrupted
from . import decide
from .config import PipelineConfig
from .refine import PHASE, REWARD_METHODS, adapter_of, topic_method
from .report import write_report
from .retention import continual_metrics, replay_count
from .state import RunState

PIPELINE_METRICS = "pipeline.jsonl"


@dataclasses.dataclass
class Run:
    """What the phases share: the config, the run's record, the data, the model in memory."""

    cfg: PipelineConfig
    state: RunState
    dataset: Any
    curriculum: Any
    plan: list[dict]
    resolved: dict                  # the config as run.json holds it (for report.md)
    echo: Callable[[str], None]
    resume: bool = False
    model: Any = None
    tok: Any = None
    rm: Any = None                  # the reward model PPO climbs
    judge: Any = None               # the reward model that grades the quiz's preference part
    merger: Any = None              # merge.Merger: what merge.mode does at each unit's merge
    trained: list = dataclasses.field(default_factory=list)  # topics trained, curriculum order

    @property
    def run_dir(self) -> Path:
        return self.state.run_dir

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics"

    @property
    def work(self) -> Path:
        return self.run_dir / "work"


def check_stop() -> None:
    """Raise `Interrupted` once a stop was requested, on any rank: every rank agrees
    (`stop.stop_now`), so all stop after the same phase."""
    from ..stop import stop_now

    if stop_now():
        raise Interrupted("pipeline")


def read_dir(run: Run, rel: str | Path) -> Path:
    """A directory of the run (relative to run_dir) that rank 0 wrote, readable on this
    rank (`distributed.fetch_dir`: the run directory itself on one process)."""
    return dist.fetch_dir(run.run_dir / rel)


def step(run: Run, key: str, name: str, compute: Callable[[], dict], *,
         saved: Callable[[dict], None] | None = None,
         restore: Callable[[dict], None] | None = None,
         report: Callable[[dict], None] | None = None) -> dict:
    """Phase `name` of topic `key`: when state.json holds it as done, `restore(record)` puts
    back what it left in memory; else `compute()` runs it, its record is saved and then
    `saved(record)` runs. Then `report(record)`, and a requested stop stops the run.

    Distributed: every rank runs `compute` (which returns rank 0's record on every rank)
    and `restore`; `saved` (files, messages) runs on rank 0 alone."""
    rec = run.state.phase(key, name)
    if rec is None:
        run.state.finish_phase(key, name, compute())
        rec = run.state.phase(key, name)
        if saved is not None and dist.is_main():
            saved(rec)
    elif restore is not None:
        restore(rec)
    if report is not None:
        report(rec)
    check_stop()
    return rec


# ---------------------------------------------------------------- data

def drop_quiz_repeats(dataset, curriculum) -> dict[str, int]:
    """Remove training records whose prompt repeats a quiz question (any topic's), from the
    dataset (reward model) and every topic (SFT, PPO prompts); returns the counts dropped."""
    from ..data.records import quiz_repeats

    counts = {}
    for kind in ("sft", "preference", "distinctions", "prompts"):
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


def ppo_prompts(topic) -> list[list[dict]]:
    """The prompts PPO (GRPO, RLOO) samples on (unique): the topic's practice prompts
    (prompt_data.jsonl) when it has any, else its SFT and preference prompts. Practice
    prompts are the better choice: the SFT policy already recites the taught answers, so on
    those prompts its samples barely differ and PPO has little to learn from (docs/pipeline.md).
    Never the quiz questions: the quiz grades PPO's result, so it must stay held out."""
    out, seen = [], set()
    prompts = ([list(r.prompt) for r in topic.prompts] if topic.prompts else
               [list(r.prompt) for r in topic.sft] + [list(r.prompt) for r in topic.preference])
    for p in prompts:
        key = repr(p)
        if key not in seen:
            seen.add(key)
            out.append([dict(m) for m in p])
    return out


def copy_metrics(work: Path, metrics_dir: Path, prefix: str) -> list[str]:
    """A trainer's *.jsonl files from its work dir into metrics/, atomically."""
    out = []
    for f in sorted(work.rglob("*.jsonl")) if work.exists() else []:
        stem = f.stem if f.stem not in ("metrics", "log") else ""
        name = safe_name(f"{prefix}{'-' + stem if stem else ''}") + ".jsonl"
        atomic_write_text(metrics_dir / name, f.read_text(encoding="utf-8", errors="replace"))
        out.append(name)
    return out


# ---------------------------------------------------------------- grading

def quiz_many(run: Run, topics: list, active: list[str]) -> dict[str, ev.QuizResult]:
    """The quiz of each topic with the `active` adapters; greedy answers in one batch."""
    markers = list(run.dataset.persona.voice_markers)
    items = {t.key: ev.topic_quiz_items(t, run.cfg.eval.max_questions) for t in topics}
    flat = [it.messages for t in topics for it in items[t.key]]
    out = {}
    with lora.active_adapters(run.model, active):
        answers = ev.greedy_answers(run.model, run.tok, flat, max_tokens=run.cfg.eval.max_tokens)
        i = 0
        for t in topics:
            n = len(items[t.key])
            out[t.key] = ev.evaluate_quiz(
                run.model, run.tok, items[t.key], markers=markers,
                target_density=ev.topic_target_density(t, markers), reward=run.judge,
                weights=run.cfg.eval.weights, max_tokens=run.cfg.eval.max_tokens,
                answers=answers[i:i + n])
            i += n
    return out


def quiz(run: Run, topic, active: list[str]) -> ev.QuizResult:
    return quiz_many(run, [topic], active)[topic.key]


def log_eval(run: Run, index: int, key: str, name: str, score: float, parts: dict) -> None:
    append_jsonl(run.metrics / PIPELINE_METRICS, {
        "step": index, "topic": key, f"eval/{name}_score": score,
        **{f"eval/{name}_{k}": v for k, v in parts.items()}})


def policy_reward(run: Run, prompts: list, active: list[str]) -> float:
    """Mean reward of sampled answers to all `prompts` (fixed sampling keys, so the
    numbers before and after PPO compare the same draws): PPO's effect, measured. Sampled
    as PPO samples: its length, temperature and top_p, the full EOS set."""
    from ..ppo.rollout import generate_batch

    pcfg = run.cfg.ppo
    enc = [ev.encode_prompt(run.tok, p) for p in prompts]
    eos, pad = eos_ids(run.tok), pad_id(run.tok)
    scores = []
    with lora.active_adapters(run.model, active):
        for k in range(run.cfg.eval.reward_samples):
            for i in range(0, len(enc), 16):
                g = generate_batch(run.model, enc[i:i + 16], pcfg.max_new_tokens, eos, pad,
                                   pcfg.temperature, pcfg.top_p,
                                   mx.random.key(run.cfg.seed * 1000 + 7919 + k * 101 + i))
                scores.extend(float(x) for x in run.rm.score_tokens(g.tokens, g.lengths).tolist())
    return float(sum(scores) / max(1, len(scores)))


# ---------------------------------------------------------------- reward model and judge

def reward_models(run: Run) -> None:
    """The reward model PPO climbs (`run.rm`) and the judge that grades the quiz's
    preference part (`run.judge`).

    eval.judge: `split` trains them on two disjoint halves of the pairs (the gate is
    not graded by the reward PPO optimises); `reward` uses the reward model for both;
    any other value is the directory of a reward model to judge with."""
    from ..train.reward import RewardModel

    cfg, st = run.cfg, run.state
    judge = cfg.eval.judge
    reward_pairs, judge_pairs = reward_halves(cfg, run.dataset)
    if cfg.reward.path:
        adapter_dir = Path(cfg.reward.path)
        st.data["reward_model"] = {"done": True, "adapter_dir": str(adapter_dir), "reused": True}
        st.save()
    else:
        contrast = []
        if cfg.reward.contrast_samples and not scorer_done(run, "reward_model"):
            contrast = base_contrast_pairs(run, reward_pairs)
            run.echo(f"reward model: {len(contrast)} contrast pairs (the person's answer over "
                     f"{cfg.reward.contrast_samples} base-model samples each)")
        labelled = [] if scorer_done(run, "reward_model") else policy_labels(run)
        adapter_dir = train_scorer(run, "reward_model", "reward", reward_pairs + contrast + labelled)
        if contrast or labelled:
            st.data["reward_model"].update(contrast_pairs=len(contrast), labelled_pairs=len(labelled))
            st.save()
    judge_dir = train_scorer(run, "judge_model", "judge", judge_pairs) if judge == "split" else None
    run.rm = RewardModel.load(run.model, run.tok, adapter_dir)
    if judge_dir is not None:
        run.judge = RewardModel.load(run.model, run.tok, judge_dir, name="judge")
    elif judge == "reward":
        run.judge = run.rm
    else:
        run.judge = RewardModel.load(run.model, run.tok, Path(judge), name="judge")
        st.data["judge_model"] = {"done": True, "adapter_dir": str(judge), "reused": True}
    lora.set_active(run.model, [])


def reward_halves(cfg: PipelineConfig, dataset) -> tuple[list, list]:
    """The pairs (preference pairs and critical distinctions) the reward model trains on,
    and the judge's: `split_pairs` with eval.judge `split`, else all of them and none."""
    pairs = list(dataset.preference) + list(dataset.distinctions)
    return split_pairs(pairs, cfg.seed) if cfg.eval.judge == "split" else (pairs, [])


def contrast_sources(dataset, reward_pairs: list) -> list[tuple[tuple, str]]:
    """(prompt, the person's answer) for every answer the person wrote that the reward
    model's contrast pairs set base-model samples against: the SFT answers and the chosen
    answers of the reward model's preference pairs."""
    from ..data.records import PreferenceRecord

    return ([(r.prompt, r.completion) for r in dataset.sft]
            + [(p.prompt, p.chosen) for p in reward_pairs if isinstance(p, PreferenceRecord)])


def contrast_pairs(sources: list[tuple[tuple, str]], samples: list[list[str]]) -> list:
    """Preference pairs that prefer the person's answer to each of the base model's answers
    to the same prompt: `sources[i]` = (prompt, the person's answer), `samples[i]` = the
    base model's answers to it. A sample equal to the person's answer is no contrast."""
    from ..data.records import PreferenceRecord

    return [PreferenceRecord(prompt=tuple(prompt), chosen=answer, rejected=x)
            for (prompt, answer), xs in zip(sources, samples) for x in xs
            if x.strip() and x.strip() != answer.strip()]


def base_contrast_pairs(run: Run, reward_pairs: list) -> list:
    """reward.contrast_samples answers of the base model (no adapter) to every prompt the
    person answered (the SFT answers and the reward half's chosen answers), each a rejected
    answer against the person's: the reward model learns what separates the person's voice
    from the base's own, on the kind of text the policy writes (the hand-written pairs are
    few, and both of their sides fluent).
    Sampled like PPO (its length, top_p) at reward.contrast_temperature, with keys from the
    run's seed: the same on every rank and on a rerun."""
    cfg = run.cfg
    sources = contrast_sources(run.dataset, reward_pairs)
    prompts = [list(p) for p, _ in sources]
    from ..labels import sample_answers

    with lora.active_adapters(run.model, []):
        answers = sample_answers(run.model, run.tok, prompts, cfg.reward.contrast_samples,
                                 cfg.ppo.max_new_tokens, cfg.reward.contrast_temperature,
                                 cfg.ppo.top_p, cfg.seed, salt=4241)
    return contrast_pairs(sources, answers)


def policy_labels(run: Run) -> list:
    """reward.labels: preference pairs on the policy's own answers, for the reward model
    (the judge of the quiz never sees them): those of reward.labels.file, and with
    reward.labels.judge the judge's ranking of answers of an SFT policy (`judged_labels`)."""
    from ..data import load_records_file

    lc = run.cfg.reward.labels
    out = list(load_records_file("preference", lc.file)) if lc.file else []
    if lc.file:
        run.echo(f"reward model: {len(out)} labelled pairs from {lc.file}")
    if lc.judge:
        out += judged_labels(run)
    return out


def judged_labels(run: Run) -> list:
    """reward.labels.judge's labels: an SFT adapter trained from the base on every topic's
    SFT data (the first trainable topic's schedule) stands in for the policy PPO will
    refine; it samples reward.labels.samples answers to every trainable topic's practice
    prompts (the PPO prompts, never the quiz's), the judge scores each, and every pair of a
    prompt's answers whose scores differ by at least min_gap is a preference pair. Written to
    run_dir/labels/labels.jsonl (preference_data.jsonl's format), read back on a resume."""
    from ..data import parse_record
    from ..io import read_jsonl
    from ..labels import label_records, load_judge, practice_prompts, sample_answers, score_all
    from ..train.sft import train_sft

    cfg, st = run.cfg, run.state
    lc = cfg.reward.labels
    path = run.run_dir / "labels" / "labels.jsonl"
    rec = st.data.get("labels")
    if not (rec and rec.get("done") and st.exists(rec["file"])):
        judge = load_judge(lc.judge)
        rows = {r["key"]: r["plan"] for r in run.plan if r["plan"]["trainable"]}
        topics = [t for t in run.curriculum.topics if t.key in rows]
        if not topics:
            return []
        scfg = decide.topic_sft_config(cfg.sft, rows[topics[0].key], cfg.seed)
        scfg = dataclasses.replace(scfg, replay_fraction=0.0)
        prompts, groups = practice_prompts(topics)
        examples = [r for t in topics for r in t.sft]
        run.echo(f"labels: an SFT policy on all {len(examples)} SFT examples samples "
                 f"{lc.samples} answers to each of {len(prompts)} practice prompts for {lc.judge}")
        lora.set_active(run.model, [])
        train_sft(run.model, run.tok, examples, scfg, run.work / "label_sampler",
                  adapter_name="label_sampler", resume=run.resume, progress=False)
        with lora.active_adapters(run.model, ["label_sampler"]):
            answers = sample_answers(run.model, run.tok, prompts, lc.samples, cfg.ppo.max_new_tokens,
                                     lc.temperature, cfg.ppo.top_p, cfg.seed)
        lora.remove_adapter(run.model, "label_sampler")
        scores = score_all(judge, prompts, answers, f"judge {lc.judge}")
        records = label_records(prompts, groups, answers, scores, lc.min_gap)

        def write() -> dict:
            import json

            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            shutil.rmtree(run.work / "label_sampler", ignore_errors=True)
            flat = [x for row in scores for x in row]
            return {"done": True, "file": st.rel(path), "judge": lc.judge, "pairs": len(records),
                    "answers": len(flat), "prompts": len(prompts),
                    "mean_score": sum(flat) / max(1, len(flat))}
        st.data["labels"] = dist.on_main(write)
        st.save()
        rec = st.data["labels"]
        run.echo(f"labels: {rec['pairs']} pairs from {rec['answers']} answers "
                 f"(the judge's mean score {rec['mean_score']:.3f}) -> {rec['file']}")
    else:
        run.echo(f"labels: done ({rec['pairs']} pairs, {rec['file']})")
    rows = dist.on_main(lambda: read_jsonl(run.run_dir / rec["file"]))
    return [parse_record("preference", r, f"{rec['file']}:{i + 1}")[0] for i, r in enumerate(rows)]


def scorer_done(run: Run, key: str) -> bool:
    rec = run.state.data.get(key)
    return bool(rec and run.state.exists(rec["adapter_dir"]))


def train_scorer(run: Run, key: str, label: str, pairs: list) -> Path:
    """Train (or find done) a Bradley-Terry scorer into run_dir/{key}; its adapter dir."""
    from ..train.reward import train_reward_model

    st = run.state
    rec = st.data.get(key)
    if scorer_done(run, key):
        run.echo(f"{label} model: done ({rec['adapter_dir']})")
        return read_dir(run, rec["adapter_dir"])
    if not pairs:
        raise MindprintError(f"{run.cfg.data_dir}: no preference pairs or distinctions to train "
                             f"the {label} model on (or set reward.path / eval.judge)")
    # distinctions go in as such: RewardConfig.include_distinctions decides
    run.echo(f"{label} model: training on {len(pairs)} pairs")
    lora.set_active(run.model, [])
    rcfg = run.cfg.reward.train
    rcfg = dataclasses.replace(rcfg, seed=decide.trainer_seed(rcfg.seed, run.cfg.seed))
    res = train_reward_model(run.model, run.tok, pairs, rcfg, run.run_dir / key,
                             resume=run.resume)
    adapter_dir = Path(res.adapter_dir)
    st.data[key] = dist.on_main(lambda: {
        "done": True, "adapter_dir": st.rel(adapter_dir),
        "metrics": copy_metrics(run.run_dir / key, run.metrics, label), "pairs": len(pairs),
        "best_val_loss": res.best_val_loss, "best_val_accuracy": res.best_val_accuracy,
        "stopped_early": res.stopped_early, "epochs": res.epochs})
    st.save()
    run.echo(f"{label} model: validation accuracy {res.best_val_accuracy:.3f}")
    return read_dir(run, st.data[key]["adapter_dir"])


def chance_stop(run: Run) -> str | None:
    rec = run.state.data.get("reward_model") or {}
    # only methods that climb the reward model need one better than chance (not DPO, DITTO)
    climbs = any(topic_method(run.cfg.refine, t.key, t.name) in REWARD_METHODS
                 for t in run.curriculum.topics)
    return decide.chance_stop(run.cfg.run_ppo and climbs, bool(rec.get("reused")),
                              run.cfg.reward.continue_at_chance, rec.get("best_val_accuracy"))


# ---------------------------------------------------------------- a topic

@dataclasses.dataclass
class TopicRun:
    """One topic's place in the run: where its files go, what it trains on top of."""

    index: int                      # 1-based position in the curriculum (metrics' step)
    topic: Any
    plan: dict                      # its row of the run plan
    frozen: list[str]               # the adapters below it (prior units, earlier topics)

    @property
    def key(self) -> str:
        return self.topic.key

    @property
    def threshold(self) -> float:
        return self.plan["plan"]["pass_threshold"]

    def adapter_dir(self, run: Run) -> Path:
        return run.run_dir / "adapters" / Path(*[safe_name(p, "topic path")
                                                 for p in Path(self.topic.rel_dir).parts])

    def work(self, run: Run) -> Path:
        return run.work / self.topic.rel_dir

    @property
    def slug(self) -> str:
        return topic_slug(self.topic.rel_dir, self.key)   # hashed: a/b__c and a__b/c differ

    @property
    def meta(self) -> dict:
        t = self.topic
        return {"unit": t.unit, "chapter": t.chapter, "topic": t.name, "frozen_below": self.frozen}


def run_topic(run: Run, t: TopicRun) -> list[str]:
    """Train one topic on top of its frozen adapters: SFT -> quiz -> refine -> final.
    Returns the adapters to fold into the unit (none for a skipped topic)."""
    if not t.plan["plan"]["trainable"]:
        reason = "; ".join(t.plan["reasons"])
        step(run, t.key, "skip", lambda: {"reason": reason},
             saved=lambda rec: run.echo(f"[{t.key}] skipped: {reason}"))
        return []
    sft(run, t)
    q = quiz_phase(run, t, t.frozen + ["sft"])
    refined = adapter_of(refine(run, t, t.frozen + ["sft"], q["score"]))
    names = ["sft"] + ([refined] if refined else [])
    final(run, t, names, q)
    return names


def sft(run: Run, t: TopicRun) -> dict:
    from ..models.adapters import load_adapter, save_adapter
    from ..train.sft import train_sft

    adir, work = t.adapter_dir(run), t.work(run) / "sft"
    lora.set_active(run.model, t.frozen)

    def compute() -> dict:
        scfg = decide.topic_sft_config(run.cfg.sft, t.plan["plan"], run.cfg.seed)
        records = list(t.topic.sft)
        pool = [r for x in run.trained for r in x.sft]
        n_replay = replay_count(len(records), scfg.replay_fraction, len(pool))
        run.echo(f"[{t.key}] SFT on {len(records)} examples"
                 + (f" + {n_replay} an epoch replayed from {len(pool)} of {len(run.trained)} "
                    "earlier topics" if n_replay else ""))
        res = train_sft(run.model, run.tok, records, scfg, work, adapter_name="sft",
                        resume=run.resume, replay_records=pool, replay_per_epoch=n_replay)
        if res.epochs > scfg.epochs:
            run.echo(f"[{t.key}] SFT ran {res.epochs} epochs, not {scfg.epochs}: "
                     f"sft.min_steps {scfg.min_steps} ({res.steps} steps)")

        def write() -> dict:
            save_adapter(run.model, "sft", adir / "sft_adapter", metadata={**t.meta, "phase": "sft"})
            rel = run.state.rel(adir / "sft_adapter")
            return {"adapter": rel, "artefacts": [rel], "train_loss": res.train_loss,
                    "eval_loss": res.eval_loss, "steps": res.steps, "epochs": res.epochs,
                    "metrics": copy_metrics(work, run.metrics, f"sft-{t.slug}"),
                    "replay_per_epoch": n_replay, "config": to_dict(scfg)}
        return dist.on_main(write)

    return step(run, t.key, "sft", compute,
                saved=lambda rec: shutil.rmtree(work, ignore_errors=True),
                restore=lambda rec: load_adapter(run.model, read_dir(run, rec["adapter"]), name="sft"))


def quiz_phase(run: Run, t: TopicRun, active: list[str]) -> dict:
    """The topic's quiz right after its SFT (decides whether PPO refines it)."""
    def compute() -> dict:
        q = quiz(run, t.topic, active)
        return {"score": q.score, "parts": q.parts, "items": q.items,
                "target_marker_density": q.target_marker_density}

    def report(rec: dict) -> None:
        run.echo(f"[{t.key}] quiz {rec['score']:.3f} (threshold {t.threshold:.2f}; "
                 + ", ".join(f"{k} {v:.3f}" for k, v in rec["parts"].items()) + ")")

    return step(run, t.key, "quiz", lambda: dist.on_main(compute), report=report,
                saved=lambda rec: log_eval(run, t.index, t.key, "quiz", rec["score"], rec["parts"]))


def refine(run: Run, t: TopicRun, active: list[str], quiz_score: float) -> dict:
    """The topic's refine method (`refine.topic_method`: PPO, GRPO, RLOO, DPO or DITTO) when
    `decide.ppo_skip_reason` gives no reason not to; `refine.train` runs it."""
    from ..models.adapters import load_adapter
    from .refine import train

    method = topic_method(run.cfg.refine, t.key, t.topic.name)
    work = t.work(run) / method

    def restore(rec: dict) -> None:
        name = adapter_of(rec)
        if name:
            load_adapter(run.model, read_dir(run, rec["adapter"]), name=name)

    return step(run, t.key, PHASE, lambda: train(run, t, active, quiz_score, method, work),
                restore=restore, saved=lambda rec: shutil.rmtree(work, ignore_errors=True))


def final(run: Run, t: TopicRun, names: list[str], quiz_rec: dict) -> dict:
    """The topic's grade with its own adapters: a new quiz after refinement, else the first."""
    def compute() -> dict:
        if len(names) > 1:
            q = quiz(run, t.topic, t.frozen + names)
            rec = {"score": q.score, "parts": q.parts, "items": q.items}
            log_eval(run, t.index, t.key, "final", q.score, q.parts)
        else:
            rec = {k: quiz_rec[k] for k in ("score", "parts")}
        rec["passed"] = decide.passed(rec["score"], t.threshold)
        return rec

    def saved(rec: dict) -> None:
        write_report(run.run_dir, run.state.data, run.resolved)
        run.echo(f"[{t.key}] final {rec['score']:.3f}: {'pass' if rec['passed'] else 'FAIL'}")

    return step(run, t.key, "final", lambda: dist.on_main(compute), saved=saved)


def restore_topic(run: Run, key: str) -> list[str]:
    """A finished topic's adapters loaded back (to fold into its unit); their names."""
    from ..models.adapters import load_adapter

    names = []
    for ph in ("sft", PHASE):
        rec = run.state.phase(key, ph)
        if ph == "sft":
            name = "sft" if rec and rec.get("adapter") else None
        else:
            name = adapter_of(rec)
        if name:
            load_adapter(run.model, read_dir(run, rec["adapter"]), name=name)
            names.append(name)
    return names


def fold(run: Run, acc: str | None, unit_name: str, names: list[str]) -> str | None:
    """Fold a topic's adapters into the unit's running adapter (exact: ranks concatenate)."""
    if not names:
        return acc
    lora.combine_adapters(run.model, ([acc] if acc else []) + names, unit_name)
    return unit_name


def retention_row(run: Run, after: str, active: list[str]) -> None:
    """Quiz every topic trained so far with everything up to `after` (one matrix row)."""
    ret = run.state.data.setdefault("retention", {"rows": {}, "order": []})
    if not run.cfg.eval.retention or after in ret["rows"]:
        return
    def row() -> dict:
        # the topic itself was just graded with these same adapters (its final quiz)
        res = quiz_many(run, [t for t in run.trained if t.key != after], active)
        own = run.state.phase(after, "final")["score"]
        return {t.key: res[t.key].score if t.key in res else own for t in run.trained}
    ret["rows"][after] = dist.on_main(row)
    ret["order"] = [t.key for t in run.trained]
    ret["metrics"] = continual_metrics(ret["rows"], ret["order"])
    run.state.save()
    earlier = [k for k in ret["order"] if k != after]
    if earlier:
        m = ret["metrics"]
        run.echo(f"[{after}] retention: earlier topics now "
                 + ", ".join(f"{ret['rows'][after][k]:.2f}" for k in earlier)
                 + f" (average {m['average']:.3f}, backward transfer {m['backward_transfer']:+.3f})")


# ---------------------------------------------------------------- a unit

def merged_dir(run: Run, unit: str) -> Path:
    return run.run_dir / "merged_adapters" / f"{safe_name(unit, 'unit')}_merged"


def merge_unit(run: Run, unit: str, unit_name: str, topics: list, acc: str | None,
               prior: list[str]) -> str | None:
    """Merge the unit: the one place its topics' adapters become the unit's adapter. They
    were folded, in curriculum order, into `acc` (ranks concatenated: exact); it is saved to
    merged_adapters/{unit}_merged and stays in memory, frozen, as `unit_name`. Returns that
    name, or None when the unit trained nothing."""
    from ..models.adapters import save_adapter

    if not acc:
        return None
    d = merged_dir(run, unit)
    rec = run.state.unit(unit)
    rec.update(run.merger.unit_merged(unit, acc, prior, topics))
    dist.on_main(lambda: save_adapter(run.model, acc, d, metadata={
        "unit": unit, "topics": [t.key for t in topics], "frozen_below": list(prior),
        "composition": "sft (+ppo) of each topic, in curriculum order, ranks concatenated",
        "merge": {"mode": run.merger.mode, **({"svd": rec["svd"]} if "svd" in rec else {})}})
        and None)
    rec["merged"] = run.state.rel(d)
    rec["artefacts"] = [rec["merged"]]
    return unit_name


def verify(run: Run, unit: str, topics: list, active: list[str], index: int) -> str | None:
    """Re-grade the unit's topics with the merged adapters `active`; record the unit as
    done. Returns the regression message when a topic dropped more than the tolerance."""
    tol = run.cfg.verify.tolerance

    def grade() -> list[dict]:
        rows = []
        for t in topics:
            fin = run.state.phase(t.key, "final")
            if fin is not None:
                q = quiz(run, t, active)
                rows.append(decide.verify_row(t.key, fin["score"], q.score, tol, q.parts))
        return rows
    rows = dist.on_main(grade)
    rec = run.state.unit(unit)
    rec.update(verify=rows, done=True, tolerance=tol)
    run.state.save()
    for v in rows if dist.is_main() else []:
        append_jsonl(run.metrics / PIPELINE_METRICS, {
            "step": index, "topic": v["key"], "eval/merged_score": v["merged"],
            "eval/merge_drop": v["drop"]})
    run.echo(f"[unit {unit}] merged -> {rec.get('merged', '(nothing to merge)')}; verify: "
             + (", ".join(f"{v['key']} {v['final']:.3f}->{v['merged']:.3f}" for v in rows)
                or "no topics"))
    msg = decide.regression_message(unit, rows, tol)
    if msg:
        run.echo("WARNING: " + msg)
    return msg


# ---------------------------------------------------------------- the result

def ship(run: Run, unit_names: list[str], units: list[str]) -> None:
    """The whole curriculum as one adapter (every unit's merged adapter, ranks concatenated):
    what `mindprint export peft` and `mlx_lm.generate --adapter-path` take; then its grade."""
    from ..models.adapters import save_adapter

    st = run.state
    final_dir = run.run_dir / "final_adapter"
    lora.combine_adapters(run.model, list(unit_names), "final")
    fmeta = run.merger.final("final")    # svd compresses it; which base it sits on
    if not st.data.get("final_adapter"):
        dist.on_main(lambda: save_adapter(run.model, "final", final_dir, metadata={
            "units": units, "composition": "all units' merged adapters, in order", **fmeta})
            and None)
        st.data["final_adapter"] = st.rel(final_dir)
        st.data["final_merge"] = fmeta["merge"]
        st.save()
    final_eval(run, final_dir)


def final_eval(run: Run, final_dir: Path) -> None:
    """Grade what the user takes home: the final adapter, loaded back from disk, on every
    trained topic's quiz. Its pass rate is the run's headline."""
    from ..models.adapters import load_adapter

    st = run.state
    if st.data.get("final_eval"):
        return

    def grade() -> dict:        # rank 0: the one that has final_dir on disk
        load_adapter(run.model, final_dir, name="final_check")
        res = quiz_many(run, list(run.trained), ["final_check"])
        lora.remove_adapter(run.model, "final_check")
        plans = {p["key"]: p for p in run.plan}
        return {k: {"score": q.score, "parts": q.parts, "items": q.items,
                    "passed": decide.passed(q.score, plans[k]["plan"]["pass_threshold"])}
                for k, q in res.items()}
    st.data["final_eval"] = dist.on_main(grade)
    ret = st.data.setdefault("retention", {"rows": {}, "order": []})
    ret["order"] = ret["order"] or [t.key for t in run.trained]
    ret["final"] = {k: v["score"] for k, v in st.data["final_eval"].items()}
    ret["metrics"] = continual_metrics(ret["rows"], ret["order"], final=ret["final"])
    st.save()
    n = sum(v["passed"] for v in st.data["final_eval"].values())
    run.echo(f"final adapter: {n}/{len(ret['final'])} topics pass their quiz "
             f"(average {ret['metrics']['average']:.3f})")
