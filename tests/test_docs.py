"""The documentation: the generated config reference is current, every relative link and
#anchor resolves, the README stays short, and no page cites notes outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mindprint_mlx import docs_ref

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # a link's text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_config_reference_is_current():
    try:
        docs_ref.check()
    except docs_ref.StaleReference as e:
        pytest.fail(str(e))


def test_a_stale_reference_names_the_command(tmp_path):
    stale = tmp_path / "config.md"
    stale.write_text(docs_ref.render().replace("| `seed` |", "| `sead` |", 1))
    with pytest.raises(docs_ref.StaleReference, match=r"docs/config.md is stale: run "
                       r"python -m mindprint_mlx.docs_ref to regenerate"):
        docs_ref.check(stale)
    assert docs_ref.main(["--check", "--out", str(stale)]) == 1
    assert docs_ref.main(["--out", str(stale)]) == 0
    docs_ref.check(stale)


def test_reference_rows_carry_type_default_and_help():
    text = docs_ref.render()
    # a nested dataclass becomes dotted keys; a dataclass with a table of its own is linked
    assert "| `eval.weights.preference` | `float` | `0.25` |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `ppo` | `PPOConfig` |"))
    assert row.endswith("the keys of [PPOConfig](#ppoconfig) |")
    row = next(line for line in text.splitlines() if line.startswith("| `max_seq_length` |"))
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[1:3] == ["`int`", "`512`"] and cells[3]       # a help text, whatever its words
    for path, _ in docs_ref.SECTIONS:
        assert f"\n## {path.split(':')[1]}\n" in text


def test_a_missing_class_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(docs_ref, "SECTIONS", [("mindprint_mlx.train.sft:NoSuchConfig", "x")])
    with pytest.raises(docs_ref.MindprintError, match="mindprint_mlx.train.sft has no dataclass "
                       "NoSuchConfig; update SECTIONS"):
        docs_ref.render()


def test_help_falls_back_to_the_source_comment():
    from dataclasses import dataclass, field

    @dataclass
    class Example:
        a: int = 1  # beside the field
        # a block of two lines
        # above the field
        b: int = 2
        # a one-line heading is not help
        c: int = 3
        d: float = field(default=0.5, metadata={"help": "from the metadata"})  # not this
        e: str = "x"  # a comment that goes on
                      # on the next line

    rows = "\n".join(docs_ref._rows(Example, "", set()))
    assert "| `a` | `int` | `1` | beside the field |" in rows
    assert "| `b` | `int` | `2` | a block of two lines above the field |" in rows
    assert "| `c` | `int` | `3` |  |" in rows
    assert "| `d` | `float` | `0.5` | from the metadata |" in rows
    assert "a comment that goes on on the next line" in rows


def test_slugs_follow_github():
    assert slug("Will it fit? `mindprint plan`") == "will-it-fit-mindprint-plan"
    assert slug("Beyond PPO: DPO, DITTO, GRPO and RLOO") == "beyond-ppo-dpo-ditto-grpo-and-rloo"
    assert slug("`mindprint reward train` / `mindprint reward score`") == \
        "mindprint-reward-train--mindprint-reward-score"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):      # http:, https:, mailto:
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no heading #{frag} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_cite_nothing_outside_the_repository():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for name in ("DESIGN.md", "PPO_DETAILS", "CRAFT.md", "../shared"):
            assert name not in text, f"{page.relative_to(ROOT)} cites {name}"


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300
    head = "\n".join(lines[:20])
    assert "pip install -e . && mindprint demo" in head
    assert 'pip install -e ".[test]" && bash scripts/test.sh' in head
