"""The pipeline's decisions (pipeline/decide.py), by hand: numbers in, decisions out, no training."""

import math

import pytest

from mindprint_mlx.data import AdaptiveBounds, PreferenceRecord, QuizRecord, SFTRecord
from mindprint_mlx.data.curriculum import Topic
from mindprint_mlx.data.quality import LengthStats, TopicQuality
from mindprint_mlx.pipeline import decide
from mindprint_mlx.train.sft import SFTConfig


def _topic(n_sft: int, n_quiz: int = 2, n_pref: int = 1) -> Topic:
    p = ({"role": "user", "content": "q"},)
    t = Topic("u", "c", "t", "u/c/t", "u/c/t")
    t.sft = [SFTRecord(p, f"a{i}", "u", "c", "t", f"f:{i}") for i in range(n_sft)]
    t.preference = [PreferenceRecord(p, "good", "bad", "u", "c", "t") for _ in range(n_pref)]
    t.quiz = [QuizRecord("q", "a", "u", "c", "t") for _ in range(n_quiz)]
    return t


def _quality(n_sft: int, n_quiz: int = 2, coverage: float | None = 50.0,
             score: float = 0.5) -> TopicQuality:
    return TopicQuality(key="u/c/t", rel_dir="u/c/t", n_sft=n_sft, n_preference=1, n_quiz=n_quiz,
                        n_distinctions=0, completion_words=LengthStats(1.0, 1.0, 1, 1), n_markers=3,
                        marker_coverage=coverage, markers_per_100_words=None,
                        preference_score=None, quality_score=score)


def test_adaptive_plan_of_a_topic_halfway_between_the_bounds():
    # 36 SFT examples: halfway from 8 to 64, so epochs 5 -> 4, batch 2 -> 5; quality 0.5:
    # lr x0.75; coverage 50%: halfway from 20% to 80%, threshold 0.75 -> 0.80
    row = decide.topic_plan(_topic(36), _quality(36), AdaptiveBounds())
    assert row["plan"] == {"sft_epochs": 4, "batch_size": 5, "lr_multiplier": 0.75,
                           "pass_threshold": 0.8, "trainable": True}
    assert row["counts"] == {"sft": 36, "preference": 1, "quiz": 2, "distinctions": 0,
                             "prompts": 0}
    assert (row["key"], row["unit"], row["chapter"], row["topic"]) == ("u/c/t", "u", "c", "t")
    assert row["quality"]["marker_coverage"] == 50.0
    assert any(r.startswith("sft_epochs=4:") for r in row["reasons"])
    assert any(r.startswith("pass_threshold=0.8:") for r in row["reasons"])


def test_adaptive_plan_caps_the_batch_and_skips_a_topic_without_enough_data():
    b = AdaptiveBounds(min_batch_size=4, max_batch_size=4, min_pass_threshold=0.4,
                       max_pass_threshold=0.4)
    row = decide.topic_plan(_topic(3), _quality(3, coverage=None), b)
    assert row["plan"]["batch_size"] == 3                      # never more than the examples
    assert row["plan"]["pass_threshold"] == 0.4 and row["plan"]["trainable"]
    row = decide.topic_plan(_topic(1, n_quiz=0), _quality(1, n_quiz=0), b)
    assert not row["plan"]["trainable"]
    assert "1 SFT example (need at least 2)" in row["reasons"][-1]
    assert "0 quiz questions (need at least 1" in row["reasons"][-1]


def test_topic_sft_config_applies_the_plan_and_keeps_the_rest():
    base = SFTConfig(learning_rate=2e-3, epochs=3, batch_size=8, lora_rank=16, replay_fraction=0.5)
    got = decide.topic_sft_config(base, {"sft_epochs": 20, "batch_size": 4, "lr_multiplier": 0.75,
                                         "pass_threshold": 0.4, "trainable": True})
    assert (got.epochs, got.batch_size) == (20, 4)
    assert got.learning_rate == pytest.approx(1.5e-3)
    assert (got.lora_rank, got.replay_fraction) == (16, 0.5)
    assert (base.epochs, base.batch_size, base.learning_rate) == (3, 8, 2e-3)   # not changed


@pytest.mark.parametrize("score,threshold,run_ppo,n_prompts,reason", [
    (0.39, 0.40, True, 3, None),                               # below the bar: PPO
    (0.40, 0.40, True, 3, "quiz 0.400 >= threshold 0.40"),     # at the bar: passed already
    (0.912, 0.85, True, 3, "quiz 0.912 >= threshold 0.85"),
    (0.10, 0.40, False, 3, "run_ppo is false"),                # switched off, whatever the score
    (0.10, 0.40, True, 0, "no prompts"),
])
def test_ppo_runs_only_below_the_threshold_when_enabled_with_prompts(score, threshold, run_ppo,
                                                                    n_prompts, reason):
    assert decide.ppo_skip_reason(score, threshold, run_ppo, n_prompts) == reason


def test_a_score_passes_at_or_above_the_threshold():
    assert decide.passed(0.4, 0.4) and decide.passed(0.41, 0.4)
    assert not decide.passed(0.3999, 0.4)
    assert not decide.passed(0.99, 1.0)


def test_a_regression_is_a_drop_beyond_the_tolerance():
    row = decide.verify_row("a", 0.8, 0.6, 0.05, {"overlap": 0.5})
    assert row == {"key": "a", "final": 0.8, "merged": 0.6, "drop": pytest.approx(0.2),
                   "parts": {"overlap": 0.5}, "regression": True}
    assert not decide.verify_row("b", 0.5, 0.25, 0.25)["regression"]      # exactly the tolerance
    assert decide.verify_row("c", 0.5, 0.24, 0.25)["regression"]
    up = decide.verify_row("d", 0.5, 0.7, 0.0)
    assert up["drop"] == pytest.approx(-0.2) and not up["regression"]    # the merge helped
    rows = [decide.verify_row("a", 0.8, 0.6, 0.1), decide.verify_row("b", 0.5, 0.45, 0.1),
            decide.verify_row("c", 0.9, 0.5, 0.1)]
    assert decide.regression_message("u1", rows, 0.1) == \
        "regression after merging unit u1: a dropped 0.200, c dropped 0.400 (tolerance 0.1)"
    assert decide.regression_message("u1", rows[1:2], 0.1) is None
    assert decide.regression_message("u1", [], 0.1) is None


@pytest.mark.parametrize("run_ppo,reused,go_on,acc,stops", [
    (True, False, False, 0.5, True),          # a coin: stop before PPO
    (True, False, False, 0.25, True),
    (True, False, False, None, True),         # no number at all
    (True, False, False, math.nan, True),
    (True, False, False, 0.51, False),        # better than a coin
    (False, False, False, 0.5, False),        # no PPO to protect
    (True, True, False, 0.5, False),          # a given reward model is the user's call
    (True, False, True, 0.5, False),          # reward.continue_at_chance
])
def test_the_run_stops_before_ppo_on_a_reward_model_at_chance(run_ppo, reused, go_on, acc, stops):
    reason = decide.chance_stop(run_ppo, reused, go_on, acc)
    assert (reason is not None) == stops
    if stops:
        assert reason.startswith(f"the reward model's validation accuracy is {acc} (chance: 0.5)")
        assert "reward.continue_at_chance=true" in reason


def test_score_trend_compares_the_first_and_last_three_steps():
    h = [{"objective/scores": x} for x in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)] + [{"other": 1}]
    assert decide.score_trend(h) == {"first": 2.0, "last": 5.0, "rises": True}
    assert decide.score_trend(h[:2]) == {"first": 1.5, "last": 1.5, "rises": False}
    assert decide.score_trend(list(reversed(h[:6])))["rises"] is False
    assert decide.score_trend([]) == {"first": None, "last": None, "rises": None}


def test_the_run_seed_offsets_every_trainers_seed():
    from mindprint_mlx.train.sft import SFTConfig

    assert decide.trainer_seed(0, 0) == 0 and decide.trainer_seed(5, 0) == 5   # seed 0: as written
    assert decide.trainer_seed(0, 2) == 2 and decide.trainer_seed(5, 2) == 7
    plan = {"sft_epochs": 3, "batch_size": 2, "lr_multiplier": 0.5}
    assert decide.topic_sft_config(SFTConfig(seed=1), plan, run_seed=3).seed == 4
    assert decide.topic_sft_config(SFTConfig(seed=1), plan).seed == 1
