"""scripts/bench_alignment.py's own parts: a user's gold function by path, the default gold,
the bootstrap interval, the gold-labelled pairs and each method's settings (the benchmark
itself is minutes long and runs by hand: docs/benchmarks.md)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    """scripts/NAME.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ba():
    return _script("bench_alignment")


def test_gold_by_path_and_the_default(ba, tmp_path):
    f = tmp_path / "my_gold.py"
    f.write_text("def g(prompt, response):\n    return 1.0 if 'tide' in response else 0.0\n")
    g = ba.load_gold(f"{f}:g")
    assert g("q", "the tide turns") == 1.0 and g("q", "no") == 0.0
    default = ba.load_gold(ba.DEFAULT_GOLD)
    assert 0.0 <= default("Why?", "Winter comes. The tide turns. Rings grow in the tree.") <= 1.0
    with pytest.raises(SystemExit, match="has no function"):
        ba.load_gold(f"{f}:missing")
    with pytest.raises(SystemExit, match="expected FILE.py:FUNC"):
        ba.load_gold("nofunc")


def test_bootstrap_interval_holds_the_mean(ba):
    assert ba.bootstrap_ci(np.full((3, 5), 0.25)) == pytest.approx((0.25, 0.25))
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 0.2, (3, 28))
    lo, hi = ba.bootstrap_ci(d)
    assert lo < d.mean() < hi and hi - lo < 0.2


def test_method_settings_match_ppo_where_they_mean_the_same(ba):
    a = type("A", (), {"ppo_steps": 40, "max_tokens": 48, "temperature": 0.7, "progress": False})()
    g = ba.method_settings("grpo", a, 0)
    assert g["num_iterations"] == 4 and g["batch_size"] * g["group_size"] == 16 and g["steps"] == 40
    d = ba.method_settings("ditto", a, 0)
    assert d["rpo_alpha"] == 1.0 and d["temperature"] == 1.0 and d["steps"] * d["rounds"] <= 40
    assert "rpo_alpha" not in ba.method_settings("dpo", a, 0)
    with pytest.raises(SystemExit, match="unknown method"):
        ba.method_settings("kto", a, 0)


def test_pairs_in_rounds_draws_more_while_a_gold_labels_too_few(ba):
    calls = []

    def draw(k0, n):
        calls.append((k0, n))
        return [[f"p{j}-{k}" for j in range(3)] for k in range(k0, k0 + n)]

    # answers tie (score 0) except every third sampling key: few pairs from the first round
    def grade(prompt, answer):
        return 1.0 if int(answer.split("-")[1]) % 3 == 0 else 0.0

    pairs, n = ba.pairs_in_rounds(list("abc"), draw, grade, samples=2, min_gap=0.5)
    assert calls == [(0, 2)] and n == 2 and len(pairs) == 3          # min_pairs 0: one round
    calls.clear()
    pairs, n = ba.pairs_in_rounds(list("abc"), draw, grade, samples=2, min_gap=0.5,
                                  min_pairs=100, max_samples=7)
    assert calls == [(0, 2), (2, 2), (4, 2)] and n == 6   # another round would pass 7 a prompt
    # keys 0 and 3 score 1 among 6: 2 x 4 pairs a prompt, 3 prompts
    assert len(pairs) == 24 and all(c.endswith(("-0", "-3")) for _, c, *_ in pairs)
    calls.clear()
    pairs, n = ba.pairs_in_rounds(list("abc"), draw, grade, samples=2, min_gap=0.5,
                                  min_pairs=9, max_samples=12)
    assert n == 4 and len(pairs) == 12                                # stops once enough
    assert ba.pairs_in_rounds([], draw, grade, samples=2, min_gap=0.5, min_pairs=9) == ([], 0)


def test_the_example_golds_load_by_path_and_score_in_range(ba):
    for name in ("nature_sentences", "concise_and_warm"):
        g = ba.load_gold(f"{ROOT / 'scripts' / 'gold_examples.py'}:{name}")
        for text in ("The season turns. Prices fall. Patience wins.", "Prices rise. Prices rise.", "a b"):
            assert 0.0 <= g("Why?", text) <= 1.0
    nature = ba.load_gold(f"{ROOT / 'scripts' / 'gold_examples.py'}:nature_sentences")
    assert nature("q", "The season turns. Prices fall. Patience wins.") == 1.0
    assert nature("q", "Prices rise and fall. Volume matters a lot here.") == 0.0


@pytest.fixture(scope="module")
def ra():
    return _script("rm_agreement")


def test_rm_agreement_prompts_file_errors_name_the_line(ra, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Why wait?"}\n\n{"text": "no prompt"}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl:3: expected a JSON object"):
        ra.read_prompts(f)
    f.write_text('{"prompt": "Why wait?"}\n{"prompt": "  "}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl:2: \"prompt\" must be a non-empty string"):
        ra.read_prompts(f)
    f.write_text('{"prompt": "Why wait?"}\n')
    assert ra.read_prompts(f) == ["Why wait?"]
    with pytest.raises(SystemExit, match="not found"):
        ra.read_prompts(tmp_path / "missing.jsonl")
    assert len(ra.read_prompts(ra.DEFAULT_PROMPTS)) == 28
