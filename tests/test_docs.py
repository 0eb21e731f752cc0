"""The user docs hold together: every relative link and image resolves, the README stays short,
and BENCHMARKS.md's headings name topics, not internal work items."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 170

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def user_docs() -> list[Path]:
    """The documents this test guards: README.md, BENCHMARKS.md and docs/*.md."""
    return [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks: a `#` or `[x](y)` in code is not markdown."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, line))
    return lines


def headings(text: str) -> list[str]:
    """The ATX headings' text, outside code blocks."""
    found = []
    for _, line in prose_lines(text):
        match = _HEADING.match(line)
        if match:
            found.append(match.group(2))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor GitHub makes for a document's headings (repeats get -1, -2...)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(text):
        base = slug(heading)
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link, image and HTML src/href outside code."""
    found = []
    for number, line in prose_lines(text):
        line = _INLINE_CODE.sub("", line)
        found += [(number, m.group(1)) for m in _LINK.finditer(line)]
        found += [(number, m.group(1)) for m in _HTML_SRC.finditer(line)]
    return found


def broken_links(doc: Path) -> list[str]:
    """One line per relative link or image of ``doc`` whose file, or heading anchor, does not exist."""
    problems = []
    for number, target in links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:...
            continue
        path_part, _, fragment = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        where = f"{doc.name}:{number}: {target}"
        if not path.exists():
            problems.append(f"{where}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading with anchor #{fragment} in {path.name}")
    return problems


# ---------------------------------------------------------------------------- the checker itself


def test_the_checker_finds_a_missing_file_a_missing_anchor_and_ignores_code(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "chart.png").write_bytes(b"png")
    (tmp_path / "other.md").write_text("# Title\n\n## The `--help` flag, fast (2026)\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n\n## Same\n\n## Same\n\n"
        "![chart](img/chart.png) [ok](other.md#the---help-flag-fast-2026) [self](#same-1)\n"
        "[gone](missing.md) ![gone too](img/nothing.png) [bad anchor](other.md#nowhere)\n"
        "[web](https://example.org/x) `[in code](nope.md)`\n"
        "```\n[in a block](nope.md)\n## not a heading\n```\n"
    )
    problems = broken_links(doc)
    assert len(problems) == 3, problems
    assert any("missing.md: no such file" in p for p in problems)
    assert any("img/nothing.png: no such file" in p for p in problems)
    assert any("#nowhere" in p for p in problems)
    assert "not a heading" not in headings(doc.read_text())


def test_slugs_follow_githubs_rule():
    assert slug("Quality: CLIP-PING against CLIP on OpenClipart") == "quality-clip-ping-against-clip-on-openclipart"
    assert slug("Reproducing the paper's setting (CC3M / CC12M, ViT-XS, GPUs)") == \
        "reproducing-the-papers-setting-cc3m--cc12m-vit-xs-gpus"
    assert slug("Against open_clip_train") == "against-open_clip_train"


# ---------------------------------------------------------------------------- the docs


@pytest.mark.parametrize("doc", user_docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(doc):
    assert broken_links(doc) == []


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"


def test_benchmark_headings_name_topics_not_issue_numbers():
    named = [h for h in headings((REPO / "BENCHMARKS.md").read_text(encoding="utf-8"))
             if re.search(r"issue\s*#?\d+", h, re.IGNORECASE)]
    assert named == []


def test_benchmarks_opens_with_the_current_figures():
    assert headings((REPO / "BENCHMARKS.md").read_text(encoding="utf-8"))[1] == "Current figures"


# ---------------------------------------------------------------------------- the README's chart


def test_the_readme_chart_draws_a_quality_results_file_with_the_reports_bar_chart(tmp_path):
    from conftest import load_benchmark_script

    chart = load_benchmark_script("headline_chart")
    quality = {"results": [
        {"setting": setting, "seed": seed,
         "metrics": {"test": {"i2t/R@1": base + seed, "zs/shape/top1": 2 * base, "probe/shape": 50.0, "score": 1.0}}}
        for setting, base in (("clip", 10.0), ("clip-ping", 12.0)) for seed in (0, 1)
    ]}
    results = chart.results_for_chart(quality, ["clip", "clip-ping"])
    assert [s["name"] for s in results["settings"]] == ["clip", "clip-ping"]
    assert set(results["metrics"]) == {"retrieval/image_to_text/R@1", "zeroshot/shape/top1",
                                       "linear_probe/shape/accuracy"}  # no report key for the score
    stats = results["metrics"]["retrieval/image_to_text/R@1"]["settings"]["clip-ping"]
    assert stats["mean"] == 12.5 and stats["n"] == 2 and stats["values"] == [12.0, 13.0]
    with pytest.raises(SystemExit, match="relational"):
        chart.results_for_chart(quality, ["clip", "relational"])

    from clip_ping.report.plots import plot_metric_bars

    out = tmp_path / "chart.png"
    assert plot_metric_bars(results, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
