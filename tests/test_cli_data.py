"""`mindprint data check` and `mindprint data report`: exit codes and output."""

from __future__ import annotations

from click.testing import CliRunner

from mindprint_mlx.cli import cli
from test_data_records import write_valid


def _run(*args):
    return CliRunner().invoke(cli, ["data", *map(str, args)], catch_exceptions=False)


def test_check_valid_exits_0_with_summary(tmp_path):
    d = write_valid(tmp_path / "d", [("u1", "c", "a"), ("u2", "c", "b")])
    r = _run("check", d)
    assert r.exit_code == 0, r.output
    assert "ok: 2 units, 2 chapters, 2 topics; 6 SFT" in r.output
    assert "u1/c/a: 3 SFT, 1 pref, 1 quiz, 1 dist" in r.output


def test_check_invalid_exits_1_listing_every_problem(tmp_path):
    d = write_valid(tmp_path / "d")
    with open(d / "sft_data.jsonl", "a") as f:
        f.write("{broken\n")
        f.write('{"prompt": "q", "completion": ""}\n')
    with open(d / "quiz_data.jsonl", "ab") as f:
        f.write(b'{"question": "\xc3\x28", "reference_answer": "a"}\n')
    r = _run("check", d)
    assert r.exit_code == 1
    assert f"{d / 'sft_data.jsonl'}:4: invalid JSON" in r.output
    assert f"{d / 'sft_data.jsonl'}:5: field 'completion' is empty" in r.output
    assert f"{d / 'quiz_data.jsonl'}:2: not valid UTF-8" in r.output
    assert "Traceback" not in r.output


def test_check_missing_dir_and_unknown_filter(tmp_path):
    r = _run("check", tmp_path / "nope")
    assert r.exit_code == 1 and "does not exist" in r.output
    d = write_valid(tmp_path / "d")
    r = _run("check", d, "--unit", "unit-9")
    assert r.exit_code == 1 and "unknown unit 'unit-9'; units in the data: unit-1" in r.output


def test_check_strict_fails_on_warnings(tmp_path):
    d = write_valid(tmp_path / "d")
    with open(d / "quiz_data.jsonl", "a") as f:
        f.write('{"question": "Quiz on t-1?", "reference_answer": "The cycle turns.", '
                '"unit": "unit-1", "chapter": "ch-1", "topic": "t-1", "hint": "x"}\n')
    r = _run("check", d)
    assert r.exit_code == 0 and "quiz_data.jsonl:2: warning: unknown key 'hint'" in r.output
    assert "quiz_data.jsonl:2: warning: duplicate of the record on line 1" in r.output
    assert _run("check", "--strict", d).exit_code == 1


def test_check_custom_file_names(tmp_path):
    d = write_valid(tmp_path / "d")
    (d / "sft_data.jsonl").rename(d / "train.jsonl")
    assert _run("check", d).exit_code == 1
    assert _run("check", d, "--sft-file", "train.jsonl").exit_code == 0


def test_report_writes_markdown(tmp_path):
    d = write_valid(tmp_path / "d")
    out = tmp_path / "r" / "report.md"
    bounds = tmp_path / "b.yaml"
    bounds.write_text("max_epochs: 4\n")
    r = _run("report", d, "-o", out, "--bounds", bounds)
    assert r.exit_code == 0, r.output
    md = out.read_text()
    assert md.startswith("# Data quality report")
    assert "| unit-1/ch-1/t-1 | yes | 4 | 2 |" in md
    assert not [p for p in out.parent.iterdir() if p.name != "report.md"]  # no temp files left


def test_report_on_invalid_data_exits_1_and_writes_nothing(tmp_path):
    d = write_valid(tmp_path / "d")
    (d / "quiz_data.jsonl").write_text("[]\n")
    out = tmp_path / "report.md"
    r = _run("report", d, "-o", out)
    assert r.exit_code == 1 and "quiz_data.jsonl:1" in r.output and not out.exists()
    r = _run("report", write_valid(tmp_path / "d2"), "-o", out, "--set", "min_epochs=9")
    assert r.exit_code == 1 and "min_epochs" in r.output and not out.exists()


def test_demo_curriculum_checks_and_reports(tmp_path):
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR

    r = _run("check", DEMO_CURRICULUM_DIR)
    assert r.exit_code == 0, r.output
    r = _run("report", DEMO_CURRICULUM_DIR, "-o", tmp_path / "demo.md")
    assert r.exit_code == 0, r.output
    assert "## Adaptive training plan" in (tmp_path / "demo.md").read_text()
