"""The retention figures, replay sizes and the reward/judge split: pure functions, by hand."""

import pytest

from mindprint_mlx.data import PreferenceRecord
from mindprint_mlx.pipeline.retention import continual_metrics, replay_count
from mindprint_mlx.pipeline.decide import score_trend
from mindprint_mlx.pipeline.phases import split_pairs
from mindprint_mlx.train.sft import epoch_order


def test_replay_count_makes_the_replayed_rows_that_share_of_the_epoch():
    assert replay_count(8, 0.75, 100) == 24          # 24 / (8 + 24) = 0.75
    assert replay_count(8, 0.5, 100) == 8
    assert replay_count(8, 0.75, 10) == 10           # no more than earlier topics have
    assert replay_count(8, 0.0, 100) == 0 and replay_count(8, 0.75, 0) == 0


def test_each_epoch_takes_every_topic_row_and_a_fresh_draw_of_replayed_rows():
    lengths = [5] * 4 + [6] * 20                      # 4 topic rows, 20 replayable
    e0 = sorted(i for g in epoch_order(lengths, 4, 6, 2, seed=0) for i in g)
    e1 = sorted(i for g in epoch_order(lengths, 4, 6, 2, seed=1) for i in g)
    for e in (e0, e1):
        assert e[:4] == [0, 1, 2, 3] and len(e) == 10 and len(set(e)) == 10
        assert all(4 <= i < 24 for i in e[4:])
    assert e0[4:] != e1[4:]                           # drawn afresh
    assert epoch_order(lengths, 4, 6, 2, seed=0) == epoch_order(lengths, 4, 6, 2, seed=0)
    # without replay: the plain batch order (a run without earlier topics is unchanged)
    from mindprint_mlx.data.batching import batch_order
    assert epoch_order(lengths[:4], 4, 0, 2, seed=3) == batch_order(lengths[:4], 2, seed=3)


def test_continual_metrics_average_backward_transfer_and_forgetting():
    rows = {"a": {"a": 0.8}, "b": {"a": 0.6, "b": 0.9}, "c": {"a": 0.5, "b": 0.9, "c": 0.7}}
    m = continual_metrics(rows, ["a", "b", "c"])
    assert m["average"] == pytest.approx((0.5 + 0.9 + 0.7) / 3)
    assert m["backward_transfer"] == pytest.approx(((0.5 - 0.8) + (0.9 - 0.9)) / 2)
    assert m["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.9 - 0.9)) / 2)
    # the final adapter stands for the last row, and then the last topic counts too
    f = continual_metrics(rows, ["a", "b", "c"], final={"a": 0.4, "b": 1.0, "c": 0.6})
    assert f["average"] == pytest.approx(2.0 / 3)
    assert f["backward_transfer"] == pytest.approx(((0.4 - 0.8) + (1.0 - 0.9) + (0.6 - 0.7)) / 3)
    assert f["forgetting"] == pytest.approx(((0.8 - 0.4) + (0.9 - 1.0) + (0.7 - 0.6)) / 3)
    # no matrix (eval.retention off): the final adapter's mean only
    assert continual_metrics({}, [], final={"a": 0.2, "b": 0.4})["average"] == pytest.approx(0.3)


def test_split_pairs_gives_disjoint_halves_that_cover_every_topic():
    pairs = [PreferenceRecord(prompt=({"role": "user", "content": f"q{t}{i}"},), chosen="c",
                              rejected="r", topic=f"t{t}") for t in range(3) for i in range(5)]
    a, b = split_pairs(pairs, seed=0)
    assert len(a) + len(b) == 15 and not set(map(id, a)) & set(map(id, b))
    assert {p.topic for p in a} == {p.topic for p in b} == {"t0", "t1", "t2"}
    assert abs(len(a) - len(b)) <= 1
    assert split_pairs(pairs, seed=0) == (a, b)


def test_score_trend_compares_the_first_and_last_three_steps():
    h = [{"objective/scores": x} for x in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    assert score_trend(h) == {"first": 2.0, "last": 5.0, "rises": True}
    assert score_trend([])["rises"] is None


def test_training_records_that_repeat_a_quiz_question_are_warned_about_and_dropped(tmp_path):
    import json

    from mindprint_mlx.data import build_curriculum, load_data_dir
    from mindprint_mlx.pipeline.phases import drop_quiz_repeats, ppo_prompts

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps({"topic": "t", **r}) + "\n" for r in rows))

    write("sft_data.jsonl", [{"prompt": "What is a cycle?", "completion": "A season."},
                             {"prompt": "what is a TREND", "completion": "The tide."}])
    write("preference_data.jsonl", [{"prompt": "What is a trend?", "chosen": "a", "rejected": "b"},
                                    {"prompt": "Why wait?", "chosen": "a", "rejected": "b"}])
    write("quiz_data.jsonl", [{"question": "What is a trend?", "reference_answer": "A direction."}])
    ds = load_data_dir(tmp_path)
    warned = [w for w in ds.warnings if "repeats the quiz question" in w.message]
    assert [(w.file.endswith(f), w.line) for w, f in zip(warned, ["sft_data.jsonl", "preference_data.jsonl"])] \
        == [(True, 2), (True, 1)]
    cur = build_curriculum(ds)
    assert drop_quiz_repeats(ds, cur) == {"sft": 1, "preference": 1, "distinctions": 0,
                                          "prompts": 0}
    (topic,) = cur.topics
    assert [r.completion for r in topic.sft] == ["A season."] and len(ds.preference) == 1
    # PPO's prompts never include the quiz questions
    assert [p[-1]["content"] for p in ppo_prompts(topic)] == ["What is a cycle?", "Why wait?"]
    # with practice prompts (prompt_data.jsonl) PPO samples on those alone, quiz repeats dropped
    write("prompt_data.jsonl", [{"prompt": "How long is a season?"}, {"prompt": "What is a trend"},
                                {"prompt": "How long is a season?"}])
    ds = load_data_dir(tmp_path)
    cur = build_curriculum(ds)
    assert drop_quiz_repeats(ds, cur)["prompts"] == 1
    (topic,) = cur.topics
    assert [p[-1]["content"] for p in ppo_prompts(topic)] == ["How long is a season?"]


def test_contrast_pairs_prefer_the_persons_answer_to_each_base_sample():
    from mindprint_mlx.pipeline.phases import contrast_pairs

    q1, q2 = ({"role": "user", "content": "Q1"},), ({"role": "user", "content": "Q2"},)
    pairs = contrast_pairs([(q1, "Mind the season."), (q2, "Risk first.")],
                           [["A cycle is a pattern.", " Mind the season. ", ""], ["Buy now."]])
    # a sample equal to the person's answer (or empty) is no contrast
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (q1, "Mind the season.", "A cycle is a pattern."), (q2, "Risk first.", "Buy now.")]
