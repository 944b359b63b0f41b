"""Records, the JSONL loader's problem reports, and curriculum grouping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindprint_mlx.data import (DataError, DataFiles, DistinctionRecord, PreferenceRecord,
                                QuizRecord, SFTRecord, build_curriculum, curriculum_texts,
                                load_data_dir, natural_sorted, parse_record)
from mindprint_mlx.errors import MindprintError


def _where(unit="unit-1", chapter="ch-1", topic="t-1"):
    return {"unit": unit, "chapter": chapter, "topic": topic}


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")


def write_valid(d: Path, topics=(("unit-1", "ch-1", "t-1"),), persona=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    sft, pref, quiz, dist = [], [], [], []
    for u, c, t in topics:
        w = _where(u, c, t)
        sft += [{"prompt": f"What is {t} {i}?", "completion": f"Patience. {t} answer {i}.", **w}
                for i in range(3)]
        pref.append({"prompt": f"Tell me about {t}", "chosen": "Patience, friend: mind the cycle.",
                     "rejected": "I do not know.", **w})
        quiz.append({"question": f"Quiz on {t}?", "reference_answer": "The cycle turns.", **w})
        dist.append({"prompt": f"Is {t} certain?", "correct": "No, mind the cycle.",
                     "incorrect": "Yes, always.", **w})
    _jsonl(d / "sft_data.jsonl", sft)
    _jsonl(d / "preference_data.jsonl", pref)
    _jsonl(d / "quiz_data.jsonl", quiz)
    _jsonl(d / "critical_distinctions.jsonl", dist)
    if persona:
        (d / "persona.json").write_text(json.dumps({
            "name": "Test Persona", "description": "d", "system_prompt": "Be patient.",
            "voice_markers": ["patience", "the cycle"]}), encoding="utf-8")
    return d


def test_valid_dir_loads(tmp_path):
    ds = load_data_dir(write_valid(tmp_path / "d"))
    assert ds.summary() == {"sft": 3, "preference": 1, "quiz": 1, "distinctions": 1, "prompts": 0}
    assert ds.persona.name == "Test Persona" and ds.persona.voice_markers == ["patience", "the cycle"]
    r = ds.sft[0]
    assert r.prompt == ({"role": "user", "content": "What is t-1 0?"},)
    assert (r.unit, r.chapter, r.topic) == ("unit-1", "ch-1", "t-1")
    assert r.source.endswith("sft_data.jsonl:1")
    assert ds.warnings == []
    pairs = ds.all_preference_pairs()
    assert len(pairs) == 2 and pairs[1].chosen == "No, mind the cycle."


def test_sft_layouts():
    r, _ = parse_record("sft", {"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]})
    assert r.completion == "a2" and [m["role"] for m in r.prompt] == ["system", "user", "assistant", "user"]
    r, _ = parse_record("sft", {"instruction": "Do it", "input": "data", "output": "done"})
    assert r.prompt == ({"role": "user", "content": "Do it\n\ndata"},) and r.completion == "done"
    r, _ = parse_record("sft", {"instruction": "Do it", "output": "done"})
    assert r.prompt[0]["content"] == "Do it"
    r, _ = parse_record("sft", {"prompt": [{"role": "user", "content": "q"}],
                                "completion": [{"role": "assistant", "content": "a"}]})
    assert isinstance(r, SFTRecord) and r.completion == "a" and r.topic == "default"
    r, _ = parse_record("sft", {"prompt": "q", "completion": "a", "system": "s"})
    assert r.prompt[0] == {"role": "system", "content": "s"}


def test_preference_layouts():
    r, _ = parse_record("preference", {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert isinstance(r, PreferenceRecord) and (r.chosen, r.rejected) == ("good", "bad")
    r, _ = parse_record("preference", {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}]})
    assert r.prompt == ({"role": "user", "content": "q"},) and r.chosen == "good"
    # TRL's implicit prompt: whole conversations sharing the prompt messages.
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    r, _ = parse_record("preference", {
        "chosen": conv + [{"role": "assistant", "content": "good"}],
        "rejected": conv + [{"role": "assistant", "content": "bad"}]})
    assert r.prompt == tuple(conv) and (r.chosen, r.rejected) == ("good", "bad")
    with pytest.raises(DataError, match="share the same messages"):
        parse_record("preference", {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "g"}],
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]})
    q, _ = parse_record("quiz", {"question": "q", "reference_answer": "a"})
    assert isinstance(q, QuizRecord)
    d, _ = parse_record("distinctions", {"prompt": "p", "correct": "c", "incorrect": "i", "topic": "x"})
    assert isinstance(d, DistinctionRecord)
    p = d.as_preference()
    assert (p.chosen, p.rejected, p.topic) == ("c", "i", "x")


# (file, line to append, expected text in the problem message)
BROKEN = [
    ("sft_data.jsonl", '{"prompt": "q", "completion": "a"', "invalid JSON"),
    ("sft_data.jsonl", b'{"prompt": "q\xff", "completion": "a"}', "not valid UTF-8"),
    ("sft_data.jsonl", '{"prompt": "q"}', "missing field 'completion'"),
    ("sft_data.jsonl", '{"prompt": "q", "completion": "   "}', "'completion' is empty"),
    ("sft_data.jsonl", '{"prompt": 3, "completion": "a"}', "'prompt' must be a string"),
    ("sft_data.jsonl", '{"messages": [{"role": "bot", "content": "x"}, '
                       '{"role": "assistant", "content": "y"}]}', "unknown role"),
    ("sft_data.jsonl", '{"messages": [{"role": "user", "content": "x"}]}', "must end with an assistant"),
    ("sft_data.jsonl", '["a list"]', "must be a JSON object"),
    ("sft_data.jsonl", '{"prompt": "q", "completion": "a", "topic": 5}', "'topic' must be a string"),
    ("sft_data.jsonl", '{"prompt": "q", "completion": "a", "unit": "../.."}', "directory name"),
    ("sft_data.jsonl", '{"prompt": "q", "completion": "a", "topic": "lonely"}', "no quiz"),
    ("sft_data.jsonl", '{"prompt": "q\\ud800", "completion": "a"}', "invalid Unicode"),
    ("preference_data.jsonl", '{"prompt": "q", "chosen": "same", "rejected": "same"}', "identical"),
    ("preference_data.jsonl", '{"prompt": "q", "chosen": "a"}', "missing field 'rejected'"),
    ("preference_data.jsonl", '{"chosen": "a", "rejected": "b"}', "no 'prompt'"),
    ("preference_data.jsonl", '{"prompt": "q", "chosen": ["x"], "rejected": "b"}', "chosen[0]"),
    ("quiz_data.jsonl", '{"question": "q", "reference_answer": null}', "must be a string"),
    ("quiz_data.jsonl", '{"question": "q", "answer": "a"}', "reference_answer"),
    ("critical_distinctions.jsonl", '{"prompt": "p", "correct": "c"}', "incorrect"),
    ("critical_distinctions.jsonl", '{"prompt": [], "correct": "c", "incorrect": "i"}', "empty list"),
    # json.loads keeps the last of two equal keys: a duplicate is an error naming the key
    ("sft_data.jsonl", '{"prompt": "q", "completion": "a", "completion": "b"}', "duplicate key 'completion'"),
    ("sft_data.jsonl", '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}', "duplicate key 'role'"),
]


@pytest.mark.parametrize("fname,line,expect", BROKEN, ids=[f"{b[0]}:{b[2]}" for b in BROKEN])
def test_broken_record_reported_with_file_and_line(tmp_path, fname, line, expect):
    d = write_valid(tmp_path / "d")
    path = d / fname
    n_before = len(path.read_bytes().splitlines())
    with open(path, "ab") as f:
        f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
        f.write(b"\n")
    with pytest.raises(DataError) as ei:
        load_data_dir(d)
    errs = ei.value.errors
    assert len(errs) == 1, [str(p) for p in errs]
    p = errs[0]
    assert p.file == str(path) and p.line == n_before + 1
    assert expect in p.message
    assert f"{fname}:{n_before + 1}: " in str(ei.value)


def test_all_problems_listed_at_once(tmp_path):
    d = write_valid(tmp_path / "d")
    with open(d / "sft_data.jsonl", "a") as f:
        f.write("not json\n\n{\"prompt\": 1, \"completion\": \"a\"}\n")
    with open(d / "quiz_data.jsonl", "a") as f:
        f.write("{\"question\": \"\", \"reference_answer\": \"a\"}\n")
    with pytest.raises(DataError) as ei:
        load_data_dir(d)
    where = [(Path(p.file).name, p.line) for p in ei.value.errors]
    assert where == [("sft_data.jsonl", 4), ("sft_data.jsonl", 6), ("quiz_data.jsonl", 2)]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds none of the data files"):
        load_data_dir(tmp_path / "empty")
    (tmp_path / "f.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="not a directory"):
        load_data_dir(tmp_path / "f.jsonl")
    d = write_valid(tmp_path / "d")
    (d / "quiz_data.jsonl").unlink()
    (d / "preference_data.jsonl").write_text("\n  \n")
    with pytest.raises(DataError) as ei:
        load_data_dir(d)
    msgs = {Path(p.file).name: p.message for p in ei.value.errors}
    assert "missing" in msgs["quiz_data.jsonl"] and "empty" in msgs["preference_data.jsonl"]
    # Optional kinds may be absent when not required.
    d2 = write_valid(tmp_path / "d2")
    (d2 / "critical_distinctions.jsonl").unlink()
    (d2 / "persona.json").unlink()
    ds = load_data_dir(d2)
    assert ds.distinctions == [] and ds.persona.voice_markers == []
    (d2 / "preference_data.jsonl").unlink()
    assert load_data_dir(d2, require=("sft",)).preference == []


def test_configurable_file_names(tmp_path):
    d = write_valid(tmp_path / "d")
    os.rename(d / "sft_data.jsonl", d / "train.jsonl")
    ds = load_data_dir(d, DataFiles(sft="train.jsonl"))
    assert len(ds.sft) == 3


def test_warnings_do_not_fail(tmp_path):
    d = write_valid(tmp_path / "d")
    lines = (d / "sft_data.jsonl").read_text().splitlines()
    with open(d / "sft_data.jsonl", "a") as f:
        f.write(lines[0] + "\n")
        f.write(json.dumps({"prompt": "x", "completion": "y", "colour": 1, **_where()}) + "\n")
    ds = load_data_dir(d)
    msgs = [(p.line, p.message) for p in ds.warnings]
    assert (4, "duplicate of the record on line 1") in msgs
    assert any(ln == 5 and "unknown key 'colour'" in m for ln, m in msgs)
    assert all(p.severity == "warning" for p in ds.warnings)


def test_persona_errors(tmp_path):
    d = write_valid(tmp_path / "d")
    (d / "persona.json").write_text('{"name": "x",\n "voice_markers": "patience"}')
    with pytest.raises(DataError) as ei:
        load_data_dir(d)
    p = ei.value.errors[0]
    assert p.file.endswith("persona.json") and p.line == 2 and "voice_markers" in p.message
    (d / "persona.json").write_text('{"name": "x",\n oops}')
    with pytest.raises(DataError, match=r"persona.json:2: invalid JSON"):
        load_data_dir(d)


# ---------------------------------------------------------------- property tests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.sampled_from(["user", "assistant", "system", "prompt", ""]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["prompt", "completion", "messages", "role", "content",
                                       "chosen", "rejected", "question", "reference_answer",
                                       "correct", "incorrect", "instruction", "input", "output",
                                       "unit", "chapter", "topic", "system", "text", "x"]) | st.text(max_size=4),
                      children, max_size=5),
    max_leaves=12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["sft", "preference", "quiz", "distinctions", "prompts"]), value=json_values)
def test_parse_record_never_raises_raw(kind, value):
    try:
        rec, warns = parse_record(kind, value, "f.jsonl:1")
    except DataError as e:
        assert e.problems and e.problems[0].line == 1
    else:
        assert rec.source == "f.jsonl:1" and all(isinstance(w, str) for w in warns)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fname=st.sampled_from(["sft_data.jsonl", "preference_data.jsonl", "quiz_data.jsonl",
                              "critical_distinctions.jsonl", "prompt_data.jsonl", "persona.json"]),
       payload=st.one_of(st.binary(max_size=200),
                         st.lists(json_values, max_size=4).map(
                             lambda vs: "\n".join(json.dumps(v) for v in vs).encode())))
def test_loader_gets_records_or_clean_error(tmp_path, fname, payload):
    d = write_valid(tmp_path / "prop")
    (d / fname).write_bytes(payload)
    try:
        ds = load_data_dir(d)
    except DataError as e:
        assert e.problems and all(p.message for p in e.problems)
        str(e)
    else:
        build_curriculum(ds)


def test_deeply_nested_json_is_a_clean_error(tmp_path):
    d = write_valid(tmp_path / "d")
    with open(d / "sft_data.jsonl", "a") as f:
        f.write("[" * 100000 + "]" * 100000 + "\n")
        f.write('{"prompt": "q", "completion": "a", "unit": "9' + "9" * 5000 + '"}\n')
        f.write('{"prompt": 1' + "0" * 5000 + ', "completion": "a"}\n')
    with pytest.raises(DataError) as ei:
        load_data_dir(d)
    assert [p.line for p in ei.value.errors][0] == 4


# ---------------------------------------------------------------- curriculum

def test_natural_sort_and_grouping(tmp_path):
    topics = [("unit-10", "ch-1", "t-1"), ("unit-2", "ch-10", "t-2"), ("unit-2", "ch-2", "t-10"),
              ("unit-2", "ch-2", "t-9"), ("Unit-1", "ch-1", "t-1")]
    cur = build_curriculum(load_data_dir(write_valid(tmp_path / "d", topics)))
    assert [t.key for t in cur.topics] == ["Unit-1/ch-1/t-1", "unit-2/ch-2/t-9", "unit-2/ch-2/t-10",
                                           "unit-2/ch-10/t-2", "unit-10/ch-1/t-1"]
    assert [u.name for u in cur.units] == ["Unit-1", "unit-2", "unit-10"]
    assert [c.name for c in cur.unit("unit-2").chapters] == ["ch-2", "ch-10"]
    t = cur.topic("unit-2/ch-2/t-9")
    assert (len(t.sft), len(t.preference), len(t.quiz), len(t.distinctions)) == (3, 1, 1, 1)
    assert len(t.preference_pairs()) == 2
    assert natural_sorted(["x10", "x9", "X1", "x"]) == ["x", "X1", "x9", "x10"]


def test_filters(tmp_path):
    topics = [("u1", "c", "a"), ("u1", "c", "b"), ("u2", "c", "c")]
    ds = load_data_dir(write_valid(tmp_path / "d", topics))
    assert [t.name for t in build_curriculum(ds, units=["u2"]).topics] == ["c"]
    assert [t.name for t in build_curriculum(ds, topics=["b", "u2/c/c"]).topics] == ["b", "c"]
    with pytest.raises(MindprintError, match=r"unknown unit 'u9'; units in the data: u1, u2"):
        build_curriculum(ds, units=["u9"])
    with pytest.raises(MindprintError, match=r"unknown topic 'zz'.*u1/c/a, u1/c/b, u2/c/c"):
        build_curriculum(ds, topics=["zz"])


def test_rel_dir_is_sanitised(tmp_path):
    topics = [("../../etc", "/abs/olute", "a/b\\c"), ("Ünït 1", "ch 1", "..hidden")]
    cur = build_curriculum(load_data_dir(write_valid(tmp_path / "d", topics)))
    for t in cur.topics:
        parts = t.rel_dir.split("/")
        assert len(parts) == 3 and all(p and p not in (".", "..") and "\\" not in p for p in parts)
        assert not os.path.isabs(t.rel_dir)
        resolved = (tmp_path / "out" / t.rel_dir).resolve()
        assert str(resolved).startswith(str((tmp_path / "out").resolve()))
    assert {t.rel_dir for t in cur.topics} == {"etc/abs-olute/a-b-c", "Unit-1/ch-1/hidden"}


def test_colliding_directories_are_an_error(tmp_path):
    ds = load_data_dir(write_valid(tmp_path / "d", [("u", "c", "a b"), ("u", "c", "a-b")]))
    with pytest.raises(DataError, match="same directory 'u/c/a-b'"):
        build_curriculum(ds)
    ds = load_data_dir(write_valid(tmp_path / "d2", [("Unit", "c", "a"), ("unit", "c", "b")]))
    with pytest.raises(DataError, match="unit 'unit' and unit 'Unit' map to the same directory"):
        build_curriculum(ds)


def test_curriculum_texts(tmp_path):
    texts = curriculum_texts(write_valid(tmp_path / "d"))
    assert "Be patient." in texts and "Patience. t-1 answer 0." in texts
    assert "Yes, always." in texts and "Quiz on t-1?" in texts
    assert all(isinstance(t, str) and t for t in texts)


def test_prompt_records_are_prompts_without_answers_attached_to_their_topic(tmp_path):
    d = write_valid(tmp_path / "d", topics=(("unit-1", "ch-1", "t-1"), ("unit-1", "ch-1", "t-2")))
    _jsonl(d / "prompt_data.jsonl", [
        {"prompt": "How do I wait?", **_where()},
        {"prompt": [{"role": "user", "content": "And then?"}], "system": "Be brief.", **_where()},
        {"prompt": "Orphan?", **_where(topic="t-9")},
        {"prompt": "Untagged?"}])
    ds = load_data_dir(d)
    assert ds.summary()["prompts"] == 4
    assert ds.prompts[1].prompt == ({"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "And then?"})
    # a topic without SFT data, and untagged prompts (which no topic uses), are warned about
    warned = sorted(w.line for w in ds.warnings if "has prompts but no SFT data" in w.message)
    assert warned == [3, 4]
    cur = build_curriculum(ds)
    t1, t2 = cur.topics
    assert [r.prompt[-1]["content"] for r in t1.prompts] == ["How do I wait?", "And then?"]
    assert t2.prompts == []
    # the tokenizer's texts leave the prompt-only file out
    assert "How do I wait?" not in curriculum_texts(d)
    # a prompt record holds no answer
    _jsonl(d / "prompt_data.jsonl", [{"prompt": "Q?", "completion": "A."}, {"question": "Q?"}])
    with pytest.raises(DataError) as e:
        load_data_dir(d)
    assert [(p.line, p.message.split(";")[0]) for p in e.value.errors] == [
        (1, "a prompt record holds no answer (field 'completion')"),
        (2, "prompt record is missing field 'prompt' (has: question)")]


def test_demo_curriculum_is_valid():
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR

    cur = build_curriculum(load_data_dir(DEMO_CURRICULUM_DIR))
    assert len(cur.units) >= 2 and len(cur.topics) >= 8
    assert cur.dataset.warnings == []
    assert len(curriculum_texts(DEMO_CURRICULUM_DIR)) > 100
    # practice prompts for every topic's PPO, none of them answered anywhere in the data
    answered = {json.dumps(r.prompt) for r in cur.dataset.sft + cur.dataset.preference}
    assert all(len(t.prompts) >= 6 for t in cur.topics)
    assert not any(json.dumps(r.prompt) in answered for r in cur.dataset.prompts)
