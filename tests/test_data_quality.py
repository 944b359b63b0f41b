"""Quality metrics, the markdown report and adaptive per-topic plans."""

from __future__ import annotations

import pytest

from mindprint_mlx.config import ConfigError
from mindprint_mlx.data import (AdaptiveBounds, Persona, PreferenceRecord, QuizRecord, SFTRecord,
                                build_curriculum, decide, load_bounds, quality_report,
                                render_markdown, topic_quality)
from mindprint_mlx.data.curriculum import Topic
from mindprint_mlx.data.quality import LengthStats, TopicQuality, jaccard_distance, pair_score
from mindprint_mlx.text import marker_count

PERSONA = Persona(name="P", voice_markers=["patience", "the cycle", "Mind the season"])


def _topic(completions, pairs=(), n_quiz=3) -> Topic:
    p = ({"role": "user", "content": "q"},)
    t = Topic("u", "c", "t", "u/c/t", "u/c/t")
    t.sft = [SFTRecord(p, c, "u", "c", "t", f"f:{i}") for i, c in enumerate(completions)]
    t.preference = [PreferenceRecord(p, c, r, "u", "c", "t") for c, r in pairs]
    t.quiz = [QuizRecord("q", "a", "u", "c", "t") for _ in range(n_quiz)]
    return t


def test_marker_counting_is_case_insensitive_whole_words():
    pats = PERSONA.voice_markers
    assert marker_count("Patience. PATIENCE! impatience", pats) == 2
    assert marker_count("Watch the cycle; mind the season.", pats) == 2
    assert marker_count("the cycles turn", pats) == 0
    assert marker_count("patience", ["patience"]) == 1


def test_density_and_coverage_by_hand():
    # 3 completions, 2 contain a marker; markers: 2 + 1 + 0 = 3 in 4 + 5 + 3 = 12 words.
    t = _topic(["Patience, patience, always wait.", "Respect the cycle of things.", "Buy it now."])
    q = topic_quality(t, PERSONA)
    assert q.marker_coverage == pytest.approx(200 / 3)
    assert q.markers_per_100_words == pytest.approx(100 * 3 / 12)
    assert q.completion_words == LengthStats(4.0, 4.0, 3, 5)
    assert q.n_sft == 3 and q.n_quiz == 3 and q.preference_score is None
    # quality = mean of the available signals (coverage only here)
    assert q.quality_score == pytest.approx(2 / 3)


def test_preference_score():
    pats = PERSONA.voice_markers
    assert jaccard_distance("a b c", "a b c") == 0.0
    assert jaccard_distance("a b", "c d") == 1.0
    assert jaccard_distance("a b c", "a b d") == pytest.approx(0.5)
    # Disjoint words, chosen carries the voice: the best pair.
    assert pair_score("Patience, the cycle turns.", "Buy now quickly.", pats) == 1.0
    # Identical wording except the rejected one has the marker: poor.
    assert pair_score("Wait for it.", "Wait for patience.", pats) == pytest.approx(0.5 * 0.5)
    # Without markers: Jaccard distance alone.
    assert pair_score("a b c", "a b d", []) == pytest.approx(0.5)
    good = topic_quality(_topic(["x"], [("Patience, the cycle turns.", "Buy now quickly.")]), PERSONA)
    bad = topic_quality(_topic(["x"], [("Buy now.", "Buy now, patience.")]), PERSONA)
    assert good.preference_score == 1.0 and 0 <= bad.preference_score < 0.5
    assert any("weak preference pairs" in f for f in bad.flags)


def test_weak_topic_flags_and_recommendations():
    q = topic_quality(_topic(["ok"], n_quiz=0), PERSONA)
    assert q.weak
    text = " ".join(q.flags)
    for expected in ("few SFT examples (1 < 8)", "no quiz questions", "no preference pairs",
                     "low voice-marker coverage", "short completions"):
        assert expected in text
    assert len(q.recommendations) == len(q.flags)
    assert topic_quality(_topic(["ok"]), Persona()).flags.count("no voice markers defined") == 1
    long = "Patience matters. The cycle turns slowly, and we wait for it with care."
    strong = topic_quality(_topic([long] * 7 + [long + " Again."],
                                  [("Patience, the cycle turns.", "Buy now quickly.")] * 4), PERSONA)
    assert strong.n_duplicates == 6 and strong.flags == ["6 duplicate SFT records"]
    assert not any("few" in f for f in strong.flags)


def _q(n_sft=10, n_quiz=3, quality=0.8, coverage=60.0, pref=0.8) -> TopicQuality:
    return TopicQuality("u/c/t", "u/c/t", n_sft, 4, n_quiz, 0, LengthStats(), 3, coverage,
                        5.0 if coverage is not None else None, pref, quality)


def test_adaptive_ranges_and_reasons():
    b = AdaptiveBounds()
    for n in range(0, 200, 3):
        for quality in (0.0, 0.3, 1.0):
            for cov in (None, 0.0, 50.0, 100.0):
                p = decide(_q(n, 3, quality, cov), b)
                assert 3 <= p.sft_epochs <= 5
                assert 1 <= p.batch_size <= 8 and (p.batch_size >= 2 or n < 2)
                assert 0.5 <= p.lr_multiplier <= 1.0
                assert 0.75 <= p.pass_threshold <= 0.85
                assert len(p.reasons) == 5
                for field, r in zip(("sft_epochs", "batch_size", "lr_multiplier", "pass_threshold"),
                                    p.reasons):
                    assert r.startswith(field + "=")
    assert decide(_q(8)).sft_epochs == 5 and decide(_q(64)).sft_epochs == 3
    assert decide(_q(8)).batch_size == 2 and decide(_q(64)).batch_size == 8
    assert decide(_q(quality=0.0)).lr_multiplier == 0.5 and decide(_q(quality=1.0)).lr_multiplier == 1.0
    assert decide(_q(coverage=20)).pass_threshold == 0.75
    assert decide(_q(coverage=80)).pass_threshold == 0.85


def test_adaptive_is_monotone_and_deterministic():
    ns = list(range(0, 150))
    epochs = [decide(_q(n_sft=n)).sft_epochs for n in ns]
    batch = [decide(_q(n_sft=n)).batch_size for n in ns]
    assert all(a >= b for a, b in zip(epochs, epochs[1:]))          # more data, fewer epochs
    assert all(a <= b for a, b in zip(batch, batch[1:]))            # more data, bigger batches
    qs = [i / 50 for i in range(51)]
    lrs = [decide(_q(quality=q)).lr_multiplier for q in qs]
    assert all(a <= b for a, b in zip(lrs, lrs[1:])) and lrs[0] < lrs[-1]
    covs = [float(c) for c in range(0, 101)]
    pts = [decide(_q(coverage=c)).pass_threshold for c in covs]
    assert all(a <= b for a, b in zip(pts, pts[1:])) and pts[0] < pts[-1]
    assert decide(_q()) == decide(_q())


def test_untrainable_topics_state_why():
    p = decide(_q(n_sft=1))
    assert not p.trainable and "1 SFT example (need at least 2)" in p.skip_reason
    p = decide(_q(n_sft=10, n_quiz=0))
    assert not p.trainable and "0 quiz questions" in p.skip_reason
    assert p.reasons[-1].startswith("not trainable")
    assert decide(_q(n_sft=2)).trainable


def test_bounds_from_yaml(tmp_path):
    y = tmp_path / "b.yaml"
    y.write_text("max_epochs: 4\nmin_sft_examples: 5\n")
    b = load_bounds(y)
    assert b.max_epochs == 4 and decide(_q(n_sft=8), b).sft_epochs == 4
    assert not decide(_q(n_sft=4), b).trainable
    y.write_text("max_epoch: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'max_epochs'"):
        load_bounds(y)
    y.write_text("min_epochs: 6\n")
    with pytest.raises(ConfigError, match="must not exceed max_epochs"):
        load_bounds(y)
    assert load_bounds(None, ["max_batch_size=4"]).max_batch_size == 4


def test_report_renders(tmp_path):
    from test_data_records import write_valid
    from mindprint_mlx.data import load_data_dir

    cur = build_curriculum(load_data_dir(write_valid(tmp_path / "d", [("u1", "c", "a"), ("u2", "c", "b")])))
    rep = quality_report(cur)
    assert len(rep.topics) == len(rep.plans) == 2 and rep.summary["topics"] == 2
    md = render_markdown(rep)
    assert "| u1/c/a | 3 | 1 | 1 | 1 | 0 |" in md      # SFT, pref, quiz, dist, practice prompts
    assert "## Adaptive training plan" in md and "decision: sft_epochs=5" in md
    assert "recommend:" in md


def test_demo_report():
    from mindprint_mlx.data import load_data_dir
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR

    rep = quality_report(build_curriculum(load_data_dir(DEMO_CURRICULUM_DIR)))
    assert all(p.trainable for p in rep.plans)
    assert all(q.preference_score is not None and 0 <= q.preference_score <= 1 for q in rep.topics)
    assert "Tove" in render_markdown(rep) or rep.persona.name in render_markdown(rep)
    assert all(q.n_prompts == 6 for q in rep.topics) and "48 practice prompts" in render_markdown(rep)
