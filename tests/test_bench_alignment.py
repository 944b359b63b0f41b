"""scripts/bench_alignment.py's own parts: a user's gold function by path, the default gold,
the bootstrap interval and each method's settings (the benchmark itself is minutes long and
runs by hand: docs/benchmarks.md)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ba():
    spec = importlib.util.spec_from_file_location("bench_alignment", ROOT / "scripts" / "bench_alignment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
