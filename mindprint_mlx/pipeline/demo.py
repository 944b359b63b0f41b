"""`mindprint demo`: the whole pipeline, offline, on a tiny model and the demo curriculum.

The settings are embedded here (the package may be installed without the repository);
configs/demo.yaml holds the same values for reading and editing (a test keeps them equal).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import MindprintError

# Tuned with bias-corrected Adam on the pretrained demo base: SFT at lr 2e-3 over 20 epochs
# with replay keeps every taught answer (token F1 of the final adapter's greedy answers to the
# SFT prompts: 0.99 and more on every topic; at 1e-3 it leaves them half learnt); dropout 0.1
# on the LoRA input keeps them and makes the voice carry better to unseen prompts. The reward
# model learns from contrast pairs (the person's answers over 4 base-model samples each) on
# every linear layer; PPO samples 16 answers a step at temperature 0.7 on each topic's
# practice prompts, at lr 3e-4 with a nearly fixed KL coefficient of 0.05 (KL to SFT 1-4 nats
# after 16 steps). Seeds 0-2 and what each change bought: docs/demo.md.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEMO_CONFIG: dict = {
    "seed": 0,
    "reward": {"train": {"lora_rank": 8, "lora_alpha": 16.0, "epochs": 6, "batch_size": 8,
                         "max_seq_length": 96, "learning_rate": 1e-3, "weight_decay": 0.01, "patience": 2,
                         "log_every": 2, "include_distinctions": True, "compile": False,
                         "lora_targets": ALL_LINEAR},
               "contrast_samples": 4},
    "sft": {"lora_rank": 16, "lora_alpha": 32.0, "learning_rate": 2e-3, "max_seq_length": 96, "save_every": 100,
            "lora_targets": ALL_LINEAR, "compile": False, "replay_fraction": 0.75,
            "lora_dropout": 0.1, "min_steps": 120},
    "ppo": {"steps": 16, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4,
            "learning_rate": 3e-4, "max_new_tokens": 56, "temperature": 0.7, "init_kl_coef": 0.05,
            "adap_kl_ctrl": True, "target": 6.0, "horizon": 10000.0, "missing_eos_penalty": 1.0,
            "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ALL_LINEAR, "save_every": 4,
            "progress": False},
    # the other refine methods (refine.method: grpo | rloo | dpo | ditto): a few steps, rank 4;
    # GRPO/RLOO sized like PPO (16 rollouts a step, 4 passes, lr 3e-4, temperature 0.7)
    "grpo": {"steps": 16, "batch_size": 4, "group_size": 4, "num_iterations": 4,
             "learning_rate": 3e-4, "temperature": 0.7, "beta": 0.04,
             "max_new_tokens": 56, "missing_eos_penalty": 1.0, "lora_rank": 4, "lora_alpha": 8.0,
             "lora_targets": ALL_LINEAR, "save_every": 4, "progress": False},
    "dpo": {"steps": 12, "batch_size": 4, "learning_rate": 1e-3, "beta": 0.1, "max_seq_length": 128,
            "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ALL_LINEAR, "save_every": 4,
            "progress": False},
    "ditto": {"rounds": 3, "steps": 4, "batch_size": 4, "samples_per_prompt": 1,
              "learning_rate": 1e-3, "beta": 0.1, "max_new_tokens": 56, "max_seq_length": 128,
              "lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ALL_LINEAR, "save_every": 4,
              "progress": False},
    "adaptive": {"min_epochs": 20, "max_epochs": 20, "min_batch_size": 4, "max_batch_size": 4,
                 "min_pass_threshold": 0.4, "max_pass_threshold": 0.4},
    "eval": {"max_tokens": 64, "max_questions": 3, "reward_samples": 4},
    "verify": {"tolerance": 0.1, "stop_on_regression": False},
}

# --fast: the first two topics of the first unit with the same settings (a smoke test of the
# whole path; those topics come out exactly as in the full demo).
FAST_OVERRIDES: dict = {
    "units": ["unit-1-foundations"],
    "topics": ["cycle-phases", "drivers-of-cycles"],
}

HONEST = ("Note: the demo model is tiny (about a million parameters, pretrained for under a "
          "minute on a plain market primer), so its text is not meant to be good: after SFT "
          "it recalls taught answers with slips, and on new prompts it stitches its primer's "
          "sentences together (real words, loose sense). The "
          "reward model, trained on 40 hand-written pairs and the person's answers preferred over "
          "the base's own, is easy to fool; PPO takes a few small, KL-bounded steps that raise its "
          "reward (and here the voice markers), not the answers' sense. "
          "The demo shows the machinery, every phase, file and report of a real run, not the "
          "quality of one.")


def demo_config(out: str | Path, model: str | Path, fast: bool = False):
    from ..config import deep_merge
    from ..demo import DEMO_CURRICULUM_DIR
    from .config import load_pipeline_config

    base = deep_merge(DEMO_CONFIG, FAST_OVERRIDES) if fast else dict(DEMO_CONFIG)
    base = deep_merge(base, {"model": str(model), "data_dir": str(DEMO_CURRICULUM_DIR),
                             "run_dir": str(out)})
    return load_pipeline_config(None, base=base)


def _clear_previous(out: Path) -> None:
    """Remove a previous demo run in `out`; refuse to touch anything else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise MindprintError(f"--out {out} is a file")
    if not any(out.iterdir()):
        return
    run = out / "run.json"
    try:
        cfg = json.loads(run.read_text())["config"] if run.is_file() else None
    except (json.JSONDecodeError, KeyError):
        cfg = None
    if not cfg or not str(cfg.get("data_dir", "")).endswith("demo/curriculum"):
        raise MindprintError(f"--out {out} is not empty and is not a previous demo run; "
                             "choose another directory")
    shutil.rmtree(out)


def run_demo(out: str | Path = "mindprint-demo", fast: bool = False,
             echo: Callable[[str], None] | None = None, cache_dir: str | Path | None = None) -> dict:
    """Build/reuse the tiny model, run the pipeline, export PEFT; returns what was made."""
    from ..models.tiny import demo_model
    from .runner import run_pipeline, summary

    echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.time()
    out = Path(out)
    _clear_previous(out)
    echo("mindprint demo: tiny model + demo curriculum, offline")
    model = demo_model(cache_dir)
    echo(f"model: {model} (built once, cached)")
    cfg = demo_config(out, model, fast)
    result = run_pipeline(cfg, echo=echo)
    made = {"run_dir": str(out), "status": result.status, "model": str(model)}
    final = result.state.get("final_adapter")
    if final and result.status == "finished":
        try:
            from ..export.peft import export_peft
        except ImportError:
            export_peft = None
        if export_peft is not None:
            res = export_peft(out / final, out / "peft_adapter", model=str(model))
            made["peft_adapter"] = str(out / "peft_adapter")
            echo(f"PEFT export: {out / 'peft_adapter'}" + (f" ({res})" if not hasattr(res, "__dict__") else ""))
    if result.status == "finished":
        echo("held-out prompts: answering with the base, the SFT adapters and the final adapter")
        made["heldout"] = heldout_comparison(model, out, result.state)
    made["seconds"] = time.time() - t0
    made["summary"] = summary(result)
    made["parts"], made["example"] = _parts_and_example(result.state)
    made["voice"] = voice_counts(result.state)
    made["ppo"] = ppo_effects(result.state, out)
    return made


def heldout_scores(model, tok, active: list[str], max_tokens: int = 64, samples: int = 8,
                   temperature: float = 0.7, seed: int = 4242, scorers: dict | None = None) -> dict:
    """The demo's held-out prompts (in no data file) answered with the `active` adapters:
    greedy answers, the share of them made of real words, their voice score
    (`demo.gold.voice_in_real_words`: the persona's images and short sentences, counted as
    far as the answer is real words) and how many use voice markers; and the voice score's
    mean over `samples` answers a prompt sampled at `temperature` (keys from `seed`, the
    same for every adapter). A tiny model's greedy answers on new prompts are chaotic (a
    small change of the weights flips a whole answer), so the greedy score moves by about
    0.05-0.1 with any change; the mean over sampled answers (the distribution PPO trains
    on) moves far less (docs/demo.md).

    `scorers` ({name: RewardModel}, e.g. the run's reward model and judge): how often each
    orders the sampled answers to a prompt as the voice score does (`evaluate.gold_agreement`,
    pairs 0.05 apart or more), beside two scorers that know nothing of the voice (the policy's
    own likelihood of the answer, its length): what PPO's reward can tell it on new prompts."""
    import mlx.core as mx

    from .. import evaluate as ev
    from ..demo import demo_voice_markers, heldout_prompts
    from ..demo.gold import voice_in_real_words
    from ..models import lora

    prompts = heldout_prompts()
    chats = [[{"role": "user", "content": p}] for p in prompts]
    markers = demo_voice_markers()
    lexicon = ev.demo_lexicon()
    with lora.active_adapters(model, active):
        answers = ev.greedy_answers(model, tok, chats, max_tokens=max_tokens)
        drawn = [ev.sampled_answers(model, tok, chats, max_tokens, temperature,
                                    key_of=lambda i, k=k: mx.random.key(seed + k * 131 + i))
                 for k in range(samples)]
    sampled = [voice_in_real_words(p, a) for row in drawn for p, a in zip(prompts, row)]
    out = {"answers": answers,
           "real_words": _mean([float(ev.is_real_words(a, lexicon)) for a in answers]),
           "voice": _mean([voice_in_real_words(p, a) for p, a in zip(prompts, answers)]),
           "with_markers": sum(ev.marker_count(a, markers) > 0 for a in answers),
           "voice_sampled": _mean(sampled), "samples": samples}
    if scorers and samples >= 2:
        per_prompt = [[row[i] for row in drawn] for i in range(len(prompts))]
        grades = [[voice_in_real_words(p, x) for x in xs] for p, xs in zip(prompts, per_prompt)]
        with lora.active_adapters(model, active):
            out["agreement"], out["agreement_pairs"] = ev.scorer_agreement(
                model, tok, chats, per_prompt, grades, scorers)
    return out


def heldout_comparison(model_dir: str | Path, run_dir: str | Path, state: dict,
                       max_tokens: int = 64, samples: int = 8) -> dict:
    """`heldout_scores` of the base model, of every topic's SFT adapter stacked (the PPO
    adapters left out) and of the final adapter as saved."""
    from ..demo import heldout_prompts
    from ..models import load
    from ..models.adapters import load_adapter

    run_dir = Path(run_dir)
    model, tok = load(str(model_dir))
    sft = [run_dir / rec["phases"]["sft"]["adapter"] for rec in state.get("topics", {}).values()
           if (rec.get("phases", {}).get("sft") or {}).get("adapter")]
    stages = {"base": [], "sft": [load_adapter(model, d, name=f"sft{i}") for i, d in enumerate(sft)],
              "final": [load_adapter(model, run_dir / state["final_adapter"], name="final")]}
    from ..train.reward import RewardModel

    scorers = {name: RewardModel.load(model, tok, run_dir / state[key]["adapter_dir"], name=f"heldout_{key}")
               for key, name in (("reward_model", "reward_model"), ("judge_model", "judge"))
               if (state.get(key) or {}).get("adapter_dir")}
    out = {"prompts": heldout_prompts()}
    for stage, names in stages.items():
        out[stage] = heldout_scores(model, tok, names, max_tokens, samples,
                                    scorers=scorers if stage == "final" else None)
    return out


def heldout_text(h: dict) -> str:
    n = len(h["prompts"])
    k = h["final"].get("samples", 0)
    lines = [f"Held-out prompts ({n}, in no data file), greedy answers"
             + (f" (and the voice score's mean over {k} sampled answers a prompt)" if k else "") + ":",
             f"  {'':22} {'real words':>10} {'voice score':>11} {'with markers':>12}"
             + (f" {'sampled voice':>13}" if k else "")]
    for stage, label in (("base", "base"), ("sft", "SFT adapters only"), ("final", "final adapter")):
        r = h[stage]
        lines.append(f"  {label:22} {r['real_words']:10.2f} {r['voice']:11.3f} {r['with_markers']:>7}/{n}"
                     + (f" {r['voice_sampled']:13.3f}" if k else ""))
    agree = h["final"].get("agreement") or {}
    if agree.get("reward_model") is not None:
        others = [f"the {name} {agree[name]:.0%}" for name in ("judge",) if agree.get(name) is not None]
        lines.append(f"  the reward model orders {agree['reward_model']:.0%} of the "
                     f"{h['final']['agreement_pairs']} pairs of the final adapter's sampled answers "
                     f"as the voice score does (chance 50%; the policy's own likelihood "
                     f"{agree['likelihood']:.0%}" + "".join("; " + o for o in others) + ")")
    i = max(range(n), key=lambda j: len(h["final"]["answers"][j]), default=None)
    if i is not None:
        lines += [f"  e.g. {h['prompts'][i]}", f"    base:  {h['base']['answers'][i]!r}",
                  f"    SFT:   {h['sft']['answers'][i]!r}", f"    final: {h['final']['answers'][i]!r}"]
    return "\n".join(lines)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _parts_and_example(state: dict) -> tuple[dict, dict | None]:
    """Mean quiz parts after SFT and final (after PPO where it ran) over the topics, and
    one quiz question answered after SFT."""
    sums: dict[str, dict[str, list[float]]] = {"sft": {}, "final": {}}
    example = None
    for rec in state.get("topics", {}).values():
        ph = rec.get("phases", {})
        for stage, name in (("sft", "quiz"), ("final", "final")):
            for k, v in ((ph.get(name) or {}).get("parts") or {}).items():
                sums[stage].setdefault(k, []).append(v)
        items = (ph.get("quiz") or {}).get("items")
        if example is None and items:
            example = items[0]
    return {stage: {k: _mean(v) for k, v in d.items()} for stage, d in sums.items()}, example


def voice_counts(state: dict) -> dict:
    """How many topics' greedy quiz answers after SFT use the persona's voice markers."""
    recs = [rec.get("phases", {}) for rec in state.get("topics", {}).values()]
    topics = [ph.get("quiz") for ph in recs if ph.get("quiz")]
    finals = [ph.get("final") if (ph.get("final") or {}).get("parts") else ph.get("quiz")
              for ph in recs if ph.get("quiz")]
    return {"topics": len(topics),
            "with_markers_final": sum((q.get("parts") or {}).get("markers", 0) > 0 for q in finals),
            "with_markers": sum((q.get("parts") or {}).get("markers", 0) > 0 for q in topics),
            "answers": sum(len(q.get("items") or []) for q in topics),
            "answers_with_markers": sum(it.get("marker_density", 0) > 0
                                        for q in topics for it in q.get("items") or [])}


def ppo_effects(state: dict, run_dir: str | Path) -> list[dict]:
    """Per topic where PPO ran: mean reward before/after (the same sampling keys), the KL
    to the SFT policy (summed over the response, nats) from the PPO metrics, and one quiz
    answer after SFT and after PPO."""
    out = []
    for key, rec in state.get("topics", {}).items():
        ph = rec.get("phases", {})
        ppo = ph.get("ppo") or {}
        if not ppo.get("done") or ppo.get("skipped"):
            continue
        kls = []
        for name in ppo.get("metrics") or []:
            path = Path(run_dir) / "metrics" / name
            if path.is_file():
                for line in path.read_text().splitlines():
                    row = json.loads(line)
                    if "objective/kl" in row:
                        kls.append(float(row["objective/kl"]))
        before = (ph.get("quiz") or {}).get("items") or []
        after = (ph.get("final") or {}).get("items") or []
        # the question whose answer after SFT has the most words (one-character answers
        # such as "." say little about what PPO did)
        i = max(range(len(before)), key=lambda j: len(before[j]["answer"].split()), default=None)
        ok = i is not None and i < len(after)
        out.append({"key": key, "reward_before": ppo.get("reward_before"),
                    "reward_after": ppo.get("reward_after"),
                    "kl_mean": _mean(kls), "kl_last": kls[-1] if kls else None,
                    "markers_before": ((ph.get("quiz") or {}).get("parts") or {}).get("markers"),
                    "markers_after": ((ph.get("final") or {}).get("parts") or {}).get("markers"),
                    "question": before[i]["question"] if ok else None,
                    "answer_before": before[i]["answer"] if ok else None,
                    "answer_after": after[i]["answer"] if ok else None,
                    "words_before": len(before[i]["answer"].split()) if ok else 0,
                    "trend": ppo.get("trend") or {}})
    return out


def parts_text(made: dict) -> str:
    lines = [heldout_text(made["heldout"])] if made.get("heldout") else []
    v = made.get("voice")
    if v and v["topics"]:
        lines.append(f"Voice after SFT: the greedy quiz answers of {v['with_markers']} of {v['topics']} "
                     f"topics use the persona's voice markers ({v['answers_with_markers']} of "
                     f"{v['answers']} answers); after PPO where it ran: {v['with_markers_final']} "
                     f"of {v['topics']} topics.")
    parts = made.get("parts") or {}
    for stage, label in (("sft", "after SFT"), ("final", "final     ")):
        if parts.get(stage):
            lines.append(f"Quiz parts {label}, mean over topics: " + ", ".join(
                f"{k} {x:.2f}" for k, x in parts[stage].items() if x is not None))
    for p in made.get("ppo") or []:
        rb, ra = p["reward_before"], p["reward_after"]
        kl = (f"; KL to the SFT policy: mean {p['kl_mean']:.2f}, last step {p['kl_last']:.2f} nats"
              if p["kl_mean"] is not None else "")
        mk = (f"; voice-marker part {p['markers_before']:.2f} -> {p['markers_after']:.2f}"
              if p.get("markers_before") is not None and p.get("markers_after") is not None else "")
        tr = p.get("trend") or {}
        tb = (f"; training batches {tr['first']:+.3f} -> {tr['last']:+.3f} (first 3 -> last 3 steps: "
              f"{'rises' if tr['rises'] else 'does not rise'})" if tr.get("first") is not None else "")
        lines.append(f"PPO {p['key'].rsplit('/', 1)[-1]}: mean reward of sampled answers {rb:+.3f} -> "
                     f"{ra:+.3f}{tb}{kl}{mk}")
    shown = max((p for p in made.get("ppo") or [] if p["question"]),
                key=lambda p: p["words_before"], default=None)
    if shown:
        lines += [f"Sample ({shown['key'].rsplit('/', 1)[-1]}): {shown['question']}",
                  f"  after SFT: {shown['answer_before']!r}",
                  f"  after PPO: {shown['answer_after']!r}"]
    ex = made.get("example")
    if ex and not shown:
        lines += [f"Example question: {ex['question']}", f"  reference:  {ex['reference']}",
                  f"  tiny model: {ex['answer']!r}"]
    return "\n".join(lines)


def where_text(made: dict) -> str:
    run = Path(made["run_dir"])
    lines = [f"Everything is in {run}/:",
             "  report.md            per-topic scores, PPO, adaptive decisions, pass rate",
             "  state.json, run.json what is done; config, versions, data hashes",
             "  reward_model/        the reward model (LoRA + head)",
             "  adapters/            per topic: sft_adapter/, ppo_adapter/ (mlx-lm format)",
             "  merged_adapters/     one adapter per unit",
             "  final_adapter/       the whole curriculum in one adapter"]
    if any((run / "plots").glob("*.png")):
        lines.append("  metrics/, plots/     JSONL + CSV metrics, PNG curves")
    else:
        lines.append("  metrics/             JSONL + CSV metrics (PNG curves: pip install "
                     "\"mindprint-mlx[plot]\", then mindprint plot " + str(run) + ")")
    if made.get("peft_adapter"):
        lines.append("  peft_adapter/        the final adapter for PEFT/transformers")
    lines.append(f"Try: mindprint generate -m {made['model']} -a {run}/final_adapter -p "
                 "\"What is a market cycle?\" --compare")
    return "\n".join(lines)
