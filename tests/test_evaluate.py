"""Quiz score parts and evaluate-generations on a real tiny model."""

import json
import math

import mlx.core as mx
import pytest

from mindprint_mlx import evaluate as ev
from mindprint_mlx.data import batching
from mindprint_mlx.generate import generate_text
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.heads import ScalarHead, hidden_size


def test_token_f1_is_squad_style():
    assert ev.token_f1("The cat sat.", "the cat") == pytest.approx(0.8)   # P 2/3, R 1
    assert ev.token_f1("a b", "c d") == 0.0
    assert ev.token_f1("", "") == 1.0
    assert ev.token_f1("x", "") == 0.0


def test_marker_density_counts_whole_words_per_100_words():
    markers = ["the tide", "patience", "..."]
    text = "Patience. The tide turns... patiences do not count"   # 8 words
    assert ev.marker_count(text, markers) == 3
    assert ev.marker_density(text, markers) == pytest.approx(100 * 3 / 8)


def test_marker_score_peaks_at_the_target():
    assert ev.marker_score(5.0, 5.0) == 1.0
    assert ev.marker_score(2.5, 5.0) == pytest.approx(0.5)
    assert ev.marker_score(0.0, 5.0) == 0.0
    assert ev.marker_score(12.0, 5.0) == 0.0
    assert ev.marker_score(3.0, 0.0) == 1.0      # no target: nothing to miss


def test_combine_parts_renormalises_missing_parts():
    w = ev.QuizWeights(preference=0.5, markers=0.25, overlap=0.25)
    assert ev.combine_parts({"preference": 1.0, "markers": 0.0, "overlap": 0.0}, w) == pytest.approx(0.5)
    assert ev.combine_parts({"markers": 1.0, "overlap": 0.0}, w) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def model_and_reward(tiny_llama):
    from mindprint_mlx.train.reward import RewardModel

    model, tok = load(tiny_llama)
    mx.random.seed(0)
    lora.apply_lora(model, "reward", r=2, alpha=2.0, trainable=False, enabled=False)
    for _, m in lora.lora_layers(model):   # a non-zero reward adapter
        a = m.adapters["reward"]
        a.lora_b = mx.random.normal(a.lora_b.shape) * 0.5
    rm = RewardModel(model, tok, adapter="reward", head=ScalarHead(hidden_size(model), zero_init=False))
    return model, tok, rm


def test_quiz_parts_are_reported_and_combine_into_the_score(model_and_reward):
    model, tok, rm = model_and_reward
    items = ev.quiz_items([("What does the teacher read?", "The teacher reads the book."),
                           ("Why?", "Because it matters, with patience.")])
    markers = ["patience", "the book"]
    res = ev.evaluate_quiz(model, tok, items, markers=markers, reward=rm, max_tokens=8)
    assert set(res.parts) == {"preference", "markers", "overlap", "likelihood"}
    assert all(0.0 <= v <= 1.0 for v in res.parts.values())
    assert 0.0 <= res.score <= 1.0
    assert res.score == pytest.approx(ev.combine_parts(res.parts, ev.QuizWeights()))
    # the preference part is sigmoid(r(answer) - r(reference)), by the reward model's own scorer
    answers = [it["answer"] for it in res.items]
    prompts = [list(it.messages) for it in items]
    r_ans = rm.score_batch(prompts, answers)
    r_ref = rm.score_batch(prompts, [it.reference for it in items])
    expected = sum(1 / (1 + math.exp(-(a - b))) for a, b in zip(r_ans, r_ref)) / 2
    assert res.parts["preference"] == pytest.approx(expected, abs=1e-4)
    assert res.target_marker_density == pytest.approx(
        ev.target_marker_density([it.reference for it in items], markers))


def test_quiz_scores_rows_exactly_as_reward_training_laid_them_out(model_and_reward):
    """The quiz's preference part reads the reward model on the very rows reward training
    builds (`data.batching.encode_pair`, cut to the reward model's max_len), so its score of a
    (prompt, response) is the reward model's own."""
    from mindprint_mlx.train.reward import RewardModel

    model, tok, rm = model_and_reward
    short = RewardModel(model, tok, adapter="reward", head=rm.head, max_len=24)   # rows get cut
    prompt = [{"role": "system", "content": "You are Tove."},
              {"role": "user", "content": "What does the teacher read, and why, in the winter?"}]
    answers = ["The teacher reads the book, with patience, every long winter evening.", "Yes."]
    seen = []

    def recording(tokens, lengths):
        seen.extend(row[:n] for row, n in zip(tokens.tolist(), lengths.tolist()))
        return short.score_tokens(tokens, lengths)

    expected = [batching.encode_pair(tok, prompt, a, 24) for a in answers]
    assert expected[0][2]                                   # the long row is truncated
    got = ev.reward_scores(recording, tok, [prompt] * 2, answers, max_len=24)
    assert seen == [row for row, _, _ in expected]          # token ids: batching's, to the id
    assert got == pytest.approx(short.score_batch([prompt] * 2, answers), abs=1e-6)
    assert ev.reward_scores(short, tok, [prompt] * 2, answers) == pytest.approx(got, abs=1e-6)
    assert ev.reward_scores(short.score_tokens, tok, [prompt] * 2, answers) == pytest.approx(got, abs=1e-6)
    # and the quiz's preference is sigmoid of the reward model's own score difference
    items = [ev.QuizItem(tuple(prompt), answers[1])]
    res = ev.evaluate_quiz(model, tok, items, reward=short, answers=answers[:1])
    r_ans, r_ref = short.score_batch([prompt, prompt], [answers[0], answers[1]])
    assert res.items[0]["reward_answer"] == pytest.approx(r_ans, abs=1e-6)
    assert res.items[0]["reward_reference"] == pytest.approx(r_ref, abs=1e-6)
    assert res.parts["preference"] == pytest.approx(1 / (1 + math.exp(r_ref - r_ans)), abs=1e-6)


def test_quiz_of_the_reference_itself_scores_full_overlap_and_even_preference(model_and_reward):
    model, tok, rm = model_and_reward
    items = ev.quiz_items([("Why?", "Because it matters, with patience.")])
    refs = [items[0].reference]
    w = ev.QuizWeights(preference=0.5, markers=0.25, overlap=0.25, likelihood=0.0)
    res = ev.evaluate_quiz(model, tok, items, markers=["patience"], reward=rm, answers=refs, weights=w)
    assert res.parts == pytest.approx({"preference": 0.5, "markers": 1.0, "overlap": 1.0})
    assert res.score == pytest.approx(0.75)


def test_reference_likelihood_is_the_mean_token_log_probability(model_and_reward):
    model, tok, _ = model_and_reward
    prompt, ref = [{"role": "user", "content": "Why?"}], "Because it matters."
    got = ev.reference_likelihood(model, tok, [prompt, prompt], [ref, ref + " Always."])
    with lora.active_adapters(model, []):
        assert ev.reference_likelihood(model, tok, [prompt], [ref]) == pytest.approx(got[:1], rel=1e-5)
    # by hand: the completion tokens and the EOS, each predicted from everything before it
    row, start, _ = batching.encode_pair(tok, prompt, ref, 1024)
    assert start == len(batching.encode_prompt(tok, prompt))
    logits = model(mx.array([row[:-1]])).astype(mx.float32)[0]
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    toks = [lp[t - 1, row[t]].item() for t in range(start, len(row))]
    assert got[0] == pytest.approx(sum(toks) / len(toks), rel=1e-5)
    assert got[1] < 0.0


def test_likelihood_score_is_the_share_of_a_uniform_guess_surprisal_removed():
    assert ev.likelihood_score(0.0, 1000) == 1.0
    assert ev.likelihood_score(-math.log(1000), 1000) == pytest.approx(0.0)
    assert ev.likelihood_score(-0.25 * math.log(1000), 1000) == pytest.approx(0.75)
    assert ev.likelihood_score(-50.0, 1000) == 0.0          # worse than uniform: clipped


def test_batched_greedy_answers_equal_one_at_a_time(model_and_reward):
    model, tok, _ = model_and_reward
    prompts = [[{"role": "user", "content": q}] for q in ("Hello!", "What does the teacher read?",
                                                           "Tell me a long story about the river.")]
    batched = ev.greedy_answers(model, tok, prompts, max_tokens=12)
    assert batched == [generate_text(model, tok, p, max_tokens=12, temp=0.0) for p in prompts]


def test_evaluate_generations_ranks_best_medium_worst(model_and_reward):
    model, tok, rm = model_and_reward
    out = ev.evaluate_generations(model, tok, rm, ["Tell me a story.", "Hello!"], k=3, max_tokens=6)
    json.dumps(out)                                   # JSON-ready
    assert len(out["prompts"]) == 2
    for p in out["prompts"]:
        scores = [c["score"] for c in p["completions"]]
        assert scores == sorted(scores, reverse=True)
        assert [c["rank"] for c in p["completions"]] == [1, 2, 3]
        assert p["BEST"]["score"] >= p["MEDIUM"]["score"] >= p["WORST"]["score"]
        assert p["prompt"] == [{"role": "user", "content": p["prompt"][0]["content"]}]


def test_topic_quiz_items_and_target_density():
    from mindprint_mlx.data import QuizRecord, SFTRecord
    from mindprint_mlx.data.curriculum import Topic

    p = ({"role": "user", "content": "Why wait?"},)
    t = Topic("u", "c", "t", "u/c/t", "u/c/t")
    t.sft = [SFTRecord(p, "Patience, always patience.", "u", "c", "t", "f:0")]      # 3 words, 2 markers
    t.quiz = [QuizRecord(f"Q{i}?", "The tide turns with patience.", "u", "c", "t") for i in range(3)]
    items = ev.topic_quiz_items(t, 2)
    assert [it.messages for it in items] == [({"role": "user", "content": "Q0?"},),
                                             ({"role": "user", "content": "Q1?"},)]
    assert [it.reference for it in items] == ["The tide turns with patience."] * 2
    # 2 + 3 markers in 3 + 3 * 5 words, pooled
    assert ev.topic_target_density(t, ["patience"]) == pytest.approx(100 * 5 / 18)
    t.quiz = []                                      # no quiz: the SFT examples serve
    assert [(it.messages, it.reference) for it in ev.topic_quiz_items(t, 5)] == [(p, t.sft[0].completion)]


def test_gold_agreement_counts_pairs_gold_separates_ties_half():
    from mindprint_mlx.evaluate import gold_agreement

    # prompt 0: gold 0.9 > 0.1 > (0.12 is within the gap of 0.1); the scorer orders
    # (a, b) right, (a, c) right; prompt 1: a tie in the scorer; prompt 2: wrong way round
    grades = [[0.9, 0.1, 0.12], [0.8, 0.2], [0.0, 1.0]]
    scores = [[3.0, 1.0, 2.0], [5.0, 5.0], [1.0, 0.0]]
    got, n = gold_agreement(grades, scores, min_gap=0.05)
    assert n == 4 and got == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert gold_agreement([[0.5, 0.52]], [[0.0, 1.0]], min_gap=0.05) == (None, 0)
    assert gold_agreement(grades, grades, min_gap=0.05)[0] == 1.0
