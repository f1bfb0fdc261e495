"""report.html of real tiny runs, opened from disk in headless Chromium (Debian's `chromium`,
driven by Playwright): no console errors, every image loaded, a screenshot that is not blank.

Without Chromium these tests skip, except under CI (``CI`` set), where ``.ci/run`` installs it
and a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from simclrkit.config import load_config
from simclrkit.data import load_dataset
from simclrkit.train import pretrain

from conftest import TINY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _require_browser():
    if CHROMIUM is None or __import__("importlib").util.find_spec("playwright") is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and the playwright package (.ci/run)")
        pytest.skip("needs Debian's chromium and the playwright package")


def _open_in_chromium(page_path, screenshot):
    """(console errors, images not loaded, image count, the page's text) of a file opened
    from disk, offline."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: errors.append(f"network request {r.url}")
                    if not r.url.startswith(("file:", "data:")) else None)  # fmt: skip
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            broken = page.evaluate(
                "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                ".map(i => i.alt)")  # fmt: skip
            count = page.evaluate("document.images.length")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return errors, broken, count, text


def _not_blank(screenshot):
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    return pixels.std() > 20 and (pixels < 128).mean() > 0.02  # dark ink on a light page


def test_labelled_run_page_in_chromium(tmp_path):
    _require_browser()
    run_dir = tmp_path / "run"
    overrides = [*TINY, "train.max_steps=12", "eval.run_page=true", "eval.linear=true",
                 "eval.min_seconds=5"]  # fmt: skip
    pretrain(load_config("mnist5k", overrides), run_dir, quiet=True)
    page = run_dir / "report.html"
    assert page.is_file() and page.stat().st_size < 2_000_000  # thumbnails, not originals
    errors, broken, count, text = _open_in_chromium(page, tmp_path / "page.png")
    assert errors == [] and broken == []
    assert count > 8 * 9  # curves, the preview, 8 queries with 8 neighbours, the map
    for heading in ("Training curves", "Augmentation preview", "Nearest neighbours",
                    "Map of h (t-SNE)", "Evaluation", "linear (logistic regression on frozen h)"):
        assert heading in text, heading
    assert "Green: a neighbour of the query's class" in text  # labels: neighbours are marked
    assert _not_blank(tmp_path / "page.png")
    # `simclrkit report` draws it again, from the run folder alone.
    page.unlink()
    done = subprocess.run([sys.executable, "-m", "simclrkit", "report", str(run_dir),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and page.is_file(), done.stderr


def test_unlabelled_folder_run_page_in_chromium(tmp_path):
    _require_browser()
    digits = load_dataset("mnist5k", None, "train", quiet=True).images[:80]
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(digits):  # an unlabelled folder of real images, RGB JPEGs
        Image.fromarray(image[0].numpy()).convert("RGB").resize((32, 32)).save(
            folder / f"{index:03d}.jpg", quality=90)
    run_dir = tmp_path / "run"
    overrides = [*TINY, "data.dataset=folder", f"data.root={folder}", "train.batch_size=16",
                 "eval.run_page=true"]  # fmt: skip
    pretrain(load_config("mnist5k", overrides), run_dir, quiet=True)
    errors, broken, count, text = _open_in_chromium(run_dir / "report.html", tmp_path / "p.png")
    assert errors == [] and broken == [] and count > 8 * 9
    assert "Nearest neighbours" in text and "Green:" not in text  # no labels, no marks
    assert "No evaluation with labels" in text
    assert _not_blank(tmp_path / "p.png")


def test_report_command_refuses_what_is_not_a_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "simclrkit", "report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "is not a run folder" in done.stderr
    assert "Traceback" not in done.stderr
