"""``learnpruner report DIR``: one self-contained HTML page from an eval folder (its content checked here; a test
marked slow renders it in headless Chromium and checks the screenshot is not blank)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from learnpruner.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--model", "shapes-tiny", "--methods", "none,divprune,learnpruner", "--tokens", "32",
                 "--limit", "6", "--max-new-tokens", "2", "--out", str(out)]) == 0
    return out


def test_the_page_holds_the_plot_the_tables_the_verdicts_and_items(folder, capsys):
    assert main(["report", str(folder), "--items", "1"]) == 0
    page = (folder / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "</html>" in page
    assert page.count("data:image/png;base64,") >= 3  # the plot and one item under two methods, all embedded
    assert "http://" not in page and "https://" not in page  # self-contained
    assert re.search(r"shapes-tiny · data shapesvqa · 6 items", page)
    assert "<th>32 tokens</th>" in page and "none (all tokens)" in page
    assert "McNemar p" in page and "verdict" in page  # the paired table
    assert "<th>color</th>" in page or "<th>count</th>" in page  # accuracy per question type
    assert re.search(r"reference: [^<]+", page) and "learnpruner @ 32" in page


def test_report_refuses_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no eval results" in capsys.readouterr().err


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(folder, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    assert main(["report", str(folder), "--items", "1"]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", (folder / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    from PIL import Image

    im = Image.open(shot).convert("L")
    lo, hi = im.getextrema()
    assert hi - lo > 100  # not blank: text and pictures drawn
    hist = im.histogram()
    assert max(hist) < 0.97 * sum(hist)  # not one flat colour
