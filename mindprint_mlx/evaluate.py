"""Quiz scoring and evaluate-generations (BEST / MEDIUM / WORST).

The quiz score of a topic is a number in [0, 1] built from three parts, each reported
on its own (every part is the mean over the topic's quiz questions):

- `preference`: the reward model's preference for the generated answer over the
  reference answer, sigmoid(r(answer) - r(reference)) (the Bradley-Terry probability
  that the answer wins). 0.5 means "as good as the reference", above 0.5 better. The
  rows it reads are laid out exactly as reward training laid them out (the same tokens,
  cut to the reward model's max_seq_length), so the score is the reward model's own.
- `markers`: voice-marker density of the answer against the topic's target density
  (markers per 100 words in the topic's own reference texts):
  1 - min(1, |density - target| / target); 1.0 when the topic has no markers to hit.
- `overlap`: content overlap with the reference answer, token-level F1 (SQuAD style:
  case-folded words as `mindprint_mlx.text.words` splits them, "don't" one word; multiset
  overlap).
- `likelihood`: how well the model knows the reference answer: 1 - NLL / log V, with NLL
  the mean per-token negative log-likelihood of the reference answer and its EOS given the
  question and V the vocabulary size (0: no better than a uniform guess; 1: certain). The
  share of a uniform guess's surprisal the model removes; a plain geometric-mean
  probability would sit near 0 for any answer not taught verbatim. A model that emits
  fragments cannot earn it, and PPO does not optimise it.

score = sum(w_i * part_i) / sum(w_i) over the parts that exist (without a reward model,
`preference` is left out and the other weights are renormalised). Default weights:
0.25 each (`QuizWeights`).

Answers are generated greedily (temperature 0), in batches, so a score is reproducible.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable, Collection, Sequence

import mlx.core as mx
import mlx.nn as nn

# The one token layout, EOS set and pad id (training's), and the one rule for words and
# voice markers; re-exported here for the quiz's callers.
from .data.batching import encode_pair, encode_prompt, eos_ids, pad_id, pad_rows  # noqa: F401
from .errors import MindprintError
from .text import marker_count, marker_density, words  # noqa: F401

Messages = Sequence[dict]


# ---------------------------------------------------------------- text parts

def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 over the words (`text.words`) of both; 1.0 when both are empty."""
    a, r = words(answer), words(reference)
    if not a and not r:
        return 1.0
    if not a or not r:
        return 0.0
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def target_marker_density(texts: Sequence[str], markers: Sequence[str]) -> float:
    """The density a topic's own reference texts show (pooled over all of them)."""
    n = sum(len(words(t)) for t in texts)
    if n == 0 or not markers:
        return 0.0
    return 100.0 * sum(marker_count(t, markers) for t in texts) / n


def marker_score(density: float, target: float) -> float:
    """1 at the target density, falling linearly to 0 at 0 or 2x the target."""
    if target <= 0:
        return 1.0
    return max(0.0, 1.0 - min(1.0, abs(density - target) / target))


def real_word_fraction(text: str, lexicon: Collection[str]) -> float:
    """The share of `text`'s word tokens (`text.words`) found in `lexicon`;
    0.0 for a text with no words."""
    ws = words(text)
    if not ws:
        return 0.0
    return sum(w in lexicon for w in ws) / len(ws)


def is_real_words(text: str, lexicon: Collection[str], min_words: int = 3,
                  threshold: float = 0.9) -> bool:
    """True when `text` has at least `min_words` word tokens and at least `threshold` of
    them are in `lexicon` (an answer "made of real words", not byte fragments)."""
    return len(words(text)) >= min_words and real_word_fraction(text, lexicon) >= threshold


@lru_cache(maxsize=1)
def demo_lexicon() -> frozenset[str]:
    """The words of the demo texts (neutral corpus + demo curriculum), tokenised as `words`."""
    from .data import curriculum_texts
    from .demo import DEMO_CURRICULUM_DIR
    from .demo.neutral_corpus import neutral_texts

    return frozenset(w for t in neutral_texts() + curriculum_texts(DEMO_CURRICULUM_DIR)
                     for w in words(t))


def gold_agreement(grades: Sequence[Sequence[float]], scores: Sequence[Sequence[float]],
                   min_gap: float = 0.05) -> tuple[float | None, int]:
    """How often a scorer orders a prompt's answers as a gold judge does: over every pair of
    prompt i's answers whose gold scores `grades[i]` differ by at least `min_gap`, the share
    the scorer's `scores[i]` put the same way round (a tie counts half); and the number of
    such pairs. (None, 0) when gold separates no pair. 0.5 is chance."""
    won, n = 0.0, 0
    for g, s in zip(grades, scores):
        for u in range(len(g)):
            for v in range(u + 1, len(g)):
                if abs(g[u] - g[v]) < min_gap:
                    continue
                d = (s[u] - s[v]) * (1.0 if g[u] > g[v] else -1.0)
                won += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
                n += 1
    return (won / n if n else None), n


def scorer_agreement(model: nn.Module, tokenizer, prompts: Sequence[Messages],
                     answers: Sequence[Sequence[str]], grades: Sequence[Sequence[float]],
                     scorers: dict[str, Any], min_gap: float = 0.05) -> tuple[dict, int]:
    """`gold_agreement` of each reward model in `scorers` ({name: RewardModel}) on prompt i's
    `answers[i]` (gold scores `grades[i]`), and of two scorers that know nothing of the
    preference: "likelihood", the mean log-likelihood of the answer under `model` with its
    active adapters (the policy that wrote them), and "length", its length in tokens.
    Returns ({name: agreement}, number of pairs)."""
    flat_p = [p for p, xs in zip(prompts, answers) for _ in xs]
    flat_a = [a for xs in answers for a in xs]
    sizes = [len(xs) for xs in answers]

    def per_prompt(values: Sequence[float]) -> list[list[float]]:
        out, i = [], 0
        for n in sizes:
            out.append(list(values[i:i + n]))
            i += n
        return out

    scores = {"likelihood": reference_likelihood(model, tokenizer, flat_p, flat_a),
              "length": [float(len(tokenizer.encode(a))) for a in flat_a]}
    scores.update({name: reward_scores(rm, tokenizer, flat_p, flat_a) for name, rm in scorers.items()})
    agree = {name: gold_agreement(grades, per_prompt(xs), min_gap) for name, xs in scores.items()}
    return {name: a for name, (a, _) in agree.items()}, agree["length"][1]


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# ---------------------------------------------------------------- reward scores

RewardFn = Callable[[mx.array, mx.array], mx.array]


def reward_scores(reward: Any, tokenizer, prompts: Sequence[Messages], completions: Sequence[str],
                  batch_size: int = 8, max_len: int | None = None) -> list[float]:
    """Reward scores of (prompt, completion) pairs by a RewardModel, or by a plain
    `fn(tokens, lengths)` such as `RewardModel.score_tokens`, with rows laid out exactly as
    reward training laid them out (`train.reward.score_pairs`). `max_len`: the row length
    rows are cut to; by default the reward model's own (its training's max_seq_length)."""
    from .train.reward import score_pairs

    fn = as_reward_fn(reward)
    if fn is None:
        raise MindprintError("reward_scores needs a reward model")
    # a RewardModel, and its bound score_tokens, know the row length training used
    max_len = max_len or getattr(getattr(fn, "__self__", reward), "max_len", None) or 2048
    return score_pairs(fn, tokenizer, prompts, completions, max_len, batch_size)


def as_reward_fn(reward: Any) -> RewardFn | None:
    """A RewardModel (anything with `.score_tokens`) or a plain callable, or None."""
    if reward is None:
        return None
    fn = getattr(reward, "score_tokens", None)
    if fn is not None:
        return fn
    if callable(reward):
        return reward
    raise MindprintError(f"reward must be a RewardModel or a callable, got {type(reward).__name__}")


# ---------------------------------------------------------------- generation

def greedy_answers(model: nn.Module, tokenizer, prompts: Sequence[Messages], max_tokens: int = 64,
                   batch_size: int = 16) -> list[str]:
    """Greedy answers to chat `prompts`, `batch_size` at a time in one batched KV cache,
    each cut at its first EOS (which is not part of the text)."""
    return sampled_answers(model, tokenizer, prompts, max_tokens, temperature=0.0,
                           batch_size=batch_size)


def sampled_answers(model: nn.Module, tokenizer, prompts: Sequence[Messages], max_tokens: int = 64,
                    temperature: float = 1.0, top_p: float = 1.0,
                    key_of: Callable[[int], Any] | None = None, batch_size: int = 16) -> list[str]:
    """Answers to chat `prompts` sampled at `temperature` (0: greedy), `batch_size` at a
    time in one batched KV cache, each cut at its first EOS (not part of the text).
    `key_of(i)`: the sampling key of the batch that starts at prompt i (None: MLX's own)."""
    from .ppo.rollout import generate_batch

    out: list[str] = []
    enc = [encode_prompt(tokenizer, p) for p in prompts]
    for i in range(0, len(enc), batch_size):
        g = generate_batch(model, enc[i:i + batch_size], max_tokens, eos_ids(tokenizer),
                           pad_id(tokenizer), temperature, top_p,
                           key=key_of(i) if key_of is not None else None)
        toks, n, ended = g.response_tokens.tolist(), g.response_lengths.tolist(), g.ended.tolist()
        for row, k, e in zip(toks, n, ended):
            out.append(tokenizer.decode(row[:k - 1] if e else row[:k]))
    return out


def likelihood_score(mean_logprob: float, vocab_size: int) -> float:
    """1 - NLL / log V, clipped to [0, 1] (see the module docstring)."""
    return float(min(1.0, max(0.0, 1.0 + mean_logprob / math.log(max(2, vocab_size)))))


def reference_likelihood(model: nn.Module, tokenizer, prompts: Sequence[Messages],
                         references: Sequence[str], batch_size: int = 16,
                         max_len: int = 1024) -> list[float]:
    """Mean log p (nats per token) of each reference answer's tokens and EOS given its
    prompt, under the model's active adapters (teacher forcing, float32 log-softmax); rows
    laid out as SFT lays them out (`data.batching.encode_pair`, cut to `max_len`)."""
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows, starts = [], []
        for p, r in zip(prompts[i:i + batch_size], references[i:i + batch_size]):
            row, n_prompt, _ = encode_pair(tokenizer, p, r, max_len)
            rows.append(row)
            starts.append(n_prompt)
        tokens, lengths = pad_rows(rows, pad_id(tokenizer))
        logits = model(tokens[:, :-1]).astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        lp = mx.take_along_axis(lp, tokens[:, 1:, None], axis=-1).squeeze(-1)
        pos = mx.arange(tokens.shape[1] - 1)[None, :] + 1       # position of the predicted token
        mask = (pos >= mx.array(starts)[:, None]) & (pos < lengths[:, None])
        mask = mask.astype(mx.float32)
        mean = (lp * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1.0)
        mx.eval(mean)
        out.extend(float(m) for m in mean.tolist())
    return out


def taught_f1(model: nn.Module, tokenizer, records: Sequence[Any], max_tokens: int = 64) -> float:
    """Mean token F1 of the model's greedy answers to SFT records' prompts against the taught
    completions: does the model (with its active adapters) still answer what it was taught?"""
    answers = greedy_answers(model, tokenizer, [list(r.prompt) for r in records], max_tokens)
    return _mean([token_f1(a, r.completion) for a, r in zip(answers, records)])


# ---------------------------------------------------------------- quiz

@dataclass
class QuizWeights:
    """Weights of the quiz score's parts (any non-negative numbers; normalised)."""

    preference: float = field(
        default=0.25, metadata={"help": "the judge (a reward model): answer vs reference answer"})
    markers: float = field(
        default=0.25, metadata={"help": "voice-marker density vs the topic's target"})
    overlap: float = field(default=0.25, metadata={"help": "token F1 with the reference answer"})
    likelihood: float = field(
        default=0.25, metadata={"help": "1 - NLL / log V of the reference answer"})

    def validate(self) -> None:
        from .config import ConfigError

        for k, v in asdict(self).items():
            if v < 0:
                raise ConfigError(f"key 'weights.{k}': must be >= 0, got {v}")
        if sum(asdict(self).values()) <= 0:
            raise ConfigError("key 'weights': at least one weight must be > 0")


@dataclass
class QuizItem:
    messages: tuple          # the chat prompt (system prompt + question)
    reference: str


@dataclass
class QuizResult:
    score: float                                  # in [0, 1]
    parts: dict[str, float]                       # preference / markers / overlap means
    target_marker_density: float
    marker_density: float                         # mean density of the answers
    n: int
    items: list[dict] = field(default_factory=list)   # per question: answer and parts

    def summary(self) -> dict:
        return {"score": self.score, **{f"part/{k}": v for k, v in self.parts.items()},
                "marker_density": self.marker_density,
                "target_marker_density": self.target_marker_density, "n": self.n}


def combine_parts(parts: dict[str, float], weights: QuizWeights) -> float:
    w = asdict(weights)
    used = {k: w[k] for k in parts if w.get(k, 0) > 0}
    total = sum(used.values())
    if total <= 0:
        return 0.0
    return float(min(1.0, max(0.0, sum(used[k] * parts[k] for k in used) / total)))


def quiz_items(questions: Sequence[tuple[str, str]], system_prompt: str | None = None) -> list[QuizItem]:
    """(question, reference answer) pairs -> chat prompts."""
    sys_msg = ({"role": "system", "content": system_prompt},) if system_prompt else ()
    return [QuizItem(sys_msg + ({"role": "user", "content": q},), ref) for q, ref in questions]


def topic_quiz_items(topic: Any, max_questions: int) -> list[QuizItem]:
    """A curriculum topic's first `max_questions` quiz questions as single user turns (the
    layout its SFT prompts have: the data loader adds no persona system prompt); a topic
    without quiz questions is quizzed on its SFT examples."""
    if topic.quiz:
        return quiz_items([(q.question, q.reference_answer) for q in topic.quiz[:max_questions]])
    return [QuizItem(tuple(r.prompt), r.completion) for r in topic.sft[:max_questions]]


def topic_target_density(topic: Any, markers: Sequence[str]) -> float:
    """The voice-marker density a topic's own texts show: its SFT completions and quiz
    reference answers, pooled (`target_marker_density`)."""
    texts = [r.completion for r in topic.sft] + [q.reference_answer for q in topic.quiz]
    return target_marker_density(texts, markers)


def evaluate_quiz(model: nn.Module, tokenizer, items: Sequence[QuizItem], markers: Sequence[str] = (),
                  target_density: float | None = None, reward: Any = None,
                  weights: QuizWeights | None = None, max_tokens: int = 64,
                  answers: Sequence[str] | None = None) -> QuizResult:
    """Score `items` with the model's currently active adapters (greedy answers).

    `target_density` defaults to the density of the reference answers. `answers` skips
    generation (scores given texts). The reward model, when given, is run with only its
    own adapter active (RewardModel.score_tokens does the switching)."""
    weights = weights or QuizWeights()
    if not items:
        raise MindprintError("quiz evaluation needs at least one question")
    if answers is None:
        answers = greedy_answers(model, tokenizer, [it.messages for it in items], max_tokens=max_tokens)
    refs = [it.reference for it in items]
    if target_density is None:
        target_density = target_marker_density(refs, markers)
    f1 = [token_f1(a, r) for a, r in zip(answers, refs)]
    dens = [marker_density(a, markers) for a in answers]
    mk = [marker_score(d, target_density) for d in dens]
    parts: dict[str, float] = {"markers": _mean(mk), "overlap": _mean(f1)}
    per_item = [{"question": it.messages[-1]["content"], "reference": it.reference, "answer": a,
                 "overlap": f, "marker_density": d, "markers": m}
                for it, a, f, d, m in zip(items, answers, f1, dens, mk)]
    if weights.likelihood > 0:
        lps = reference_likelihood(model, tokenizer, [it.messages for it in items], refs)
        V = int(getattr(getattr(model, "args", None), "vocab_size", 0) or 0) or _vocab(tokenizer)
        lik = [likelihood_score(lp, V) for lp in lps]
        parts["likelihood"] = _mean(lik)
        for d, x, lp in zip(per_item, lik, lps):
            d.update(likelihood=x, reference_logprob=lp)
    fn = as_reward_fn(reward)
    if fn is not None:
        prompts = [it.messages for it in items]
        r_ans = reward_scores(fn, tokenizer, prompts, answers)
        r_ref = reward_scores(fn, tokenizer, prompts, refs)
        pref = [sigmoid(a - b) for a, b in zip(r_ans, r_ref)]
        parts["preference"] = _mean(pref)
        for d, ra, rr, p in zip(per_item, r_ans, r_ref, pref):
            d.update(reward_answer=ra, reward_reference=rr, preference=p)
    parts = {k: parts[k] for k in ("preference", "markers", "overlap", "likelihood") if k in parts}
    return QuizResult(score=combine_parts(parts, weights), parts=parts,
                      target_marker_density=target_density, marker_density=_mean(dens),
                      n=len(items), items=per_item)


def _vocab(tokenizer) -> int:
    return len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else 2


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


# ---------------------------------------------------------------- generations

def evaluate_generations(model: nn.Module, tokenizer, reward: Any, prompts: Sequence[Messages | str],
                         k: int = 4, max_tokens: int = 64, temp: float = 0.8,
                         seed: int = 0) -> dict:
    """N prompts x K sampled completions, scored by the reward model and ranked.

    Returns a JSON-ready dict: per prompt its completions sorted best first with score
    and rank, and the BEST (highest), MEDIUM (median) and WORST (lowest) completion;
    plus the overall mean score."""
    if k < 1:
        raise MindprintError(f"k must be >= 1, got {k}")
    from .generate import generate_text

    fn = as_reward_fn(reward)
    if fn is None:
        raise MindprintError("evaluate-generations needs a reward model")
    out = []
    all_scores: list[float] = []
    for i, p in enumerate(prompts):
        messages = ({"role": "user", "content": p},) if isinstance(p, str) else tuple(p)
        texts = [generate_text(model, tokenizer, messages, max_tokens=max_tokens, temp=temp,
                               seed=seed + 1000 * i + j) for j in range(k)]
        scores = reward_scores(fn, tokenizer, [messages] * k, texts)
        order = sorted(range(k), key=lambda j: -scores[j])
        ranked = [{"rank": r + 1, "text": texts[j], "score": scores[j]} for r, j in enumerate(order)]
        all_scores.extend(scores)
        out.append({"prompt": list(messages), "completions": ranked,
                    "BEST": ranked[0], "MEDIUM": ranked[len(ranked) // 2], "WORST": ranked[-1]})
    return {"k": k, "temp": temp, "max_tokens": max_tokens, "seed": seed,
            "mean_score": _mean(all_scores), "prompts": out}
