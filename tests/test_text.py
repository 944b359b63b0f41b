"""The one rule for words and voice markers, shared by data quality and the quiz."""

import pytest

from mindprint_mlx import evaluate as ev
from mindprint_mlx import text
from mindprint_mlx.data import quality
from mindprint_mlx.demo import gold


def test_a_contraction_is_one_word_and_punctuation_separates():
    assert text.words("Don't rush; y'know, Tove's tide_line turns.") == [
        "don't", "rush", "y'know", "tove's", "tide", "line", "turns"]
    assert text.words("It\u2019s FINE... 42 times") == ["it\u2019s", "fine", "42", "times"]
    assert text.words("'quoted' words'") == ["quoted", "words"]      # outer quotes are not words
    assert text.words("... !!") == []


def test_quality_quiz_and_gold_count_words_and_markers_the_same_way():
    # one function, imported everywhere that counts words or markers
    assert quality.words is text.words and ev.words is text.words and gold.words is text.words
    assert ev.marker_count is text.marker_count and ev.marker_density is text.marker_density
    assert quality.marker_count is text.marker_count
    # "don't" is one word for the quiz's token F1 too: "do" does not overlap it
    assert ev.token_f1("I don't know", "I do know") == pytest.approx(2 / 3)


def test_markers_match_whole_words_only_where_the_marker_has_word_ends():
    markers = ["patience", "the tide", "...", "don"]
    assert text.marker_count("Patience. The tide turns... patiences, impatience", markers) == 3
    assert text.marker_count("Well...the tide", ["..."]) == 1       # punctuation: no boundary
    assert text.marker_count("I don't know, don.", ["don"]) == 1    # "don" inside "don't": no
    assert text.marker_count("y'know, Y'KNOW y'knowing", ["y'know"]) == 2
    assert text.marker_count("anything", ["", "  "]) == 0
    # 3 markers in 5 words
    assert text.marker_density("Patience, the tide; patience now.", ["patience", "the tide"]) == \
        pytest.approx(100 * 3 / 5)
    assert text.marker_density("", ["patience"]) == 0.0
