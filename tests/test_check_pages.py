"""benchmarks/check_pages.py in headless Chromium: a clean page passes, each kind of breakage is caught.

Skipped where Debian's `chromium` is not installed (a few seconds where it is).
"""

import shutil
from pathlib import Path

import pytest
from conftest import load_benchmark_script
from PIL import Image

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def check_pages():
    return load_benchmark_script("check_pages")


def test_clean_pages_pass_and_breakage_is_caught(check_pages, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "runs").mkdir()
    # far below the fold and lazy: the check loads it anyway
    (tmp_path / "index.html").write_text(
        '<!doctype html><html><head><title>index</title></head><body><h1 id="top">report</h1>'
        '<img src="ok.png"><img loading="lazy" src="ok.png" style="margin-top:5000px">'
        '<a href="runs">runs</a> <a href="#top">top</a> <a href="https://example.org/">site</a>'
        '<a href="page%20two.html">neighbours</a></body></html>')
    (tmp_path / "page two.html").write_text(
        '<!doctype html><html><head><title>two</title></head><body>'
        '<img src="missing.png"><img loading="lazy" src="gone.png" style="margin-top:5000px">'
        '<a href="nope.html">a</a><a href="#absent">b</a><a href="/etc/hostname">c</a>'
        '<script>console.error("boom"); notDefined();</script></body></html>')

    results = check_pages.check_pages([tmp_path / "index.html"], timeout=60)
    assert [Path(r["page"]).name for r in results] == ["index.html", "page two.html"]  # the linked page is followed
    clean, broken = results
    assert check_pages._failures(clean) == []
    assert clean["images"] == 2 and clean["external_links"] == ["https://example.org/"]

    assert broken["broken_images"] == ["missing.png", "gone.png"]
    assert [b.split(" ")[0] for b in broken["broken_links"]] == ["nope.html", "#absent", "/etc/hostname"]
    assert "absolute local path" in broken["broken_links"][2]
    errors = broken["console_errors"]
    assert any(e == "console.error: boom" for e in errors)
    assert any("notDefined" in e for e in errors)
    assert any("missing.png" in e and "ERR_FILE_NOT_FOUND" in e for e in errors)


def test_cli_exit_status(check_pages, tmp_path, capsys):
    (tmp_path / "a.html").write_text("<!doctype html><title>a</title><p>fine</p>")
    (tmp_path / "b.html").write_text('<!doctype html><title>b</title><img src="x.png">')
    assert check_pages.main([str(tmp_path / "a.html"), "--json", str(tmp_path / "out.json")]) == 0
    assert (tmp_path / "out.json").is_file()
    assert check_pages.main([str(tmp_path / "b.html")]) == 1
    assert "broken image: x.png" in capsys.readouterr().out
    assert check_pages.main([str(tmp_path / "none.html")]) == 2
