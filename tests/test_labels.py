"""Preference labels on the policy's own answers (mindprint_mlx.labels) and the demo's
stand-in for its person (mindprint_mlx.demo.person)."""

from __future__ import annotations

import json
import math

import pytest

from mindprint_mlx.config import ConfigError
from mindprint_mlx.data import DataError, load_records_file, parse_record
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.labels import judged_pairs, label_records, load_judge, score_all, user_text


def test_a_judge_loads_from_a_file_or_a_module_and_bad_specs_say_why(tmp_path):
    f = tmp_path / "my_judge.py"
    f.write_text("def j(prompt, response):\n    return 1.0 if 'tide' in response else 0.0\n")
    j = load_judge(f"{f}:j")
    assert j("q", "the tide turns") == 1.0 and j("q", "no") == 0.0
    assert load_judge("my_judge.py:j", root=tmp_path)("q", "tide") == 1.0      # relative to root
    demo = load_judge("mindprint_mlx.demo.person:tove_marsh")
    assert demo is load_judge("mindprint_mlx/demo/person.py:tove_marsh",
                              root=__import__("pathlib").Path(__file__).parent.parent)
    for spec, msg in [(f"{f}:missing", "has no function 'missing'"),
                      ("nofunc", "expected FILE.py:FUNC"),
                      (f"{tmp_path / 'none.py'}:j", "not found"),
                      ("no_such_module_xyz:j", "cannot import no_such_module_xyz"),
                      ("a b:j", "neither a .py file nor a module name")]:
        with pytest.raises(MindprintError, match=msg):
            load_judge(spec)
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(MindprintError, match="importing .*bad.py failed: RuntimeError: boom"):
        load_judge(f"{bad}:j")


def test_judged_pairs_label_every_pair_far_enough_apart():
    pairs = judged_pairs(["p", "q"], [["a", "b", "c"], ["x", "y"]],
                         [[0.1, 0.5, 0.12], [0.3, 0.3]], min_gap=0.05)
    # p: (b > a), (b > c); a and c are 0.02 apart: no pair; q: a tie
    assert pairs == [("p", "b", "a", 0.5, 0.1), ("p", "b", "c", 0.5, 0.12)]
    assert judged_pairs(["p"], [["same", "same "]], [[0.0, 1.0]], 0.05) == []   # one answer twice


def test_label_records_are_preference_records_of_the_topic():
    prompt = [{"role": "user", "content": "Why wait?"}]
    group = {"unit": "u", "chapter": "c", "topic": "t"}
    recs = label_records([prompt], [group], [["Winter comes. Wait.", "Buy now", "Hm"]],
                         [[0.9, 0.2, 0.21]], min_gap=0.05)
    assert [(r["chosen"], r["rejected"]) for r in recs] == [("Winter comes. Wait.", "Buy now"),
                                                            ("Winter comes. Wait.", "Hm")]
    rec, warnings = parse_record("preference", json.loads(json.dumps(recs[0])))
    assert not warnings and (rec.unit, rec.chapter, rec.topic) == ("u", "c", "t")
    assert rec.prompt == tuple(prompt) and user_text(rec.prompt) == "Why wait?"


def test_score_all_refuses_a_judge_that_gives_no_number():
    prompts = [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]]
    seen = []
    assert score_all(lambda p, x: seen.append(p) or len(x), prompts, [["ab", "abc"]]) == [[2.0, 3.0]]
    assert seen == ["q", "q"]                      # the judge sees the user's text
    with pytest.raises(MindprintError, match="returned nan"):
        score_all(lambda p, x: math.nan, prompts, [["a"]])
    with pytest.raises(MindprintError, match="not a number"):
        score_all(lambda p, x: "good", prompts, [["a"]])


def test_a_labels_file_loads_with_errors_naming_the_line(tmp_path):
    f = tmp_path / "labels.jsonl"
    good = {"topic": "t", "prompt": "Why?", "chosen": "Mind the season.", "rejected": "Buy."}
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "chosen": "Buy."}) + "\n")
    with pytest.raises(DataError, match=r"labels\.jsonl:2: chosen and rejected are identical"):
        load_records_file("preference", f)
    f.write_text(json.dumps(good) + "\n")
    (r,) = load_records_file("preference", f)
    assert r.chosen == "Mind the season." and r.topic == "t" and r.source.endswith("labels.jsonl:1")


def test_label_settings_are_checked():
    from mindprint_mlx.pipeline.config import load_pipeline_config

    base = {"model": "m", "data_dir": "d"}
    cfg = load_pipeline_config(None, ["reward.labels.judge=x.py:f"], base=base)
    assert cfg.reward.labels.judge == "x.py:f" and cfg.reward.labels.samples == 4
    for kv, msg in [("reward.labels.samples=1", "reward.labels.samples"),
                    ("reward.labels.temperature=0", "reward.labels.temperature"),
                    ("reward.labels.file=/no/such/labels.jsonl", "reward.labels.file")]:
        with pytest.raises(ConfigError, match=msg):
            load_pipeline_config(None, [kv], base=base)


def test_the_demo_person_likes_her_own_voice_in_real_words():
    from mindprint_mlx.demo.person import tove_marsh

    hers = ("Watch the season. Accumulation is the thaw after deep winter. "
            "Put risk first and wait with patience.")
    neutral = ("Accumulation is a phase where informed participants buy an asset over a "
               "period of time while the price moves sideways within a range.")
    assert 0.0 <= tove_marsh("q", neutral) < tove_marsh("q", hers) <= 1.0
    assert tove_marsh("q", hers) > 0.8
    assert tove_marsh("q", "ec b, risksevi your the to0 happ winter.") < 0.3   # fragments
    assert tove_marsh("q", "Winter.") == 0.0                                   # too short
    repeated = "Winter comes. " * 4
    assert tove_marsh("q", repeated) < tove_marsh("q", "Winter comes. Wait. Risk first. Spring.")
