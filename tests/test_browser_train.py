"""The Train tab in a real browser (Debian's chromium via Playwright), with the app's default trainer on 100 kB of Tiny
Shakespeare for the shortest budget, 1 minute: upload, Start (and Start again, which says why not), the live status and
curve, the int8 report, the zip and the web site's zip, Generate with "yours", then a second run stopped early, and a
reload, at 1280 and at 390 px, that keeps the model. SMALLGPT_SCREENSHOTS=1 also saves the tab after the 1-minute run
to docs/train-tab.png, and after the reload at 390 px to docs/train-tab-390.png."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest
from app_support import BROWSER_TEST, CHROMIUM, CHROMIUM_ARGS, served, tiny_checkpoint

from model.webapp.train_tab import CURVE_DPI, CURVE_FONT_PT
from model.webapp.training_job import TrainingSlot
from model.webapp.visitors import KEPT, Visitors

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "train-tab.png"
SCREENSHOT_PHONE = ROOT / "docs" / "train-tab-390.png"
PHONE = {"width": 390, "height": 844}
BUDGET_MINUTES = 1  # the tab's minimum
# The second run, stopped early, evaluates (and saves its best weights) every 20 steps, so that Stop finds weights to
# keep; the first runs with the app's defaults, as a visitor's does.
SAVE_OFTEN = ("--eval-interval", "20")

pytestmark = BROWSER_TEST


@pytest.fixture(scope="module")
def app(tmp_path_factory, gpt2_tokenizer):
    """One server (the app's default trainer) and one chromium for the module: yields (url, browser, visitors)."""
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("browser-train")
    visitors = Visitors(TrainingSlot(tmp / "runs"))
    with served(tiny_checkpoint(tmp, gpt2_tokenizer), visitors) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield url, browser, visitors
        finally:
            browser.close()


def open_train_tab(app):
    from playwright.sync_api import expect

    url, browser, _ = app
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.goto(url)
    expect(page.locator("#model-card")).to_contain_text("nats/char", timeout=30_000)
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-status")).to_contain_text("No training in this session yet.")
    return page


def upload(page, path: Path) -> None:
    from playwright.sync_api import expect

    page.locator("#train-file input[type=file]").set_input_files(str(path))
    expect(page.locator("#train-file")).to_contain_text(path.name, timeout=10_000)


def wait_for(condition, page, timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s * 4)):
        if condition():
            return
        page.wait_for_timeout(250)
    raise AssertionError("timed out")


def test_train_watch_try_download_and_stop(app, tmp_path, shakespeare_path):
    from playwright.sync_api import expect

    _, _, visitors = app
    text = tmp_path / "shakespeare-100k.txt"
    text.write_text(shakespeare_path.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    page = open_train_tab(app)
    expect(page.get_by_text(KEPT)).to_have_count(1)  # every way a model goes, the fifth visitor's included
    assert "a newer visitor's model pushes it out" in KEPT
    start, stop = page.locator("#train-start"), page.locator("#train-stop")
    expect(stop).to_be_disabled()  # nothing to stop yet
    assert "stop" not in (stop.get_attribute("class") or "").split()  # not the bright red "stop" variant
    upload(page, text)
    minutes = page.locator("#train-minutes input[type=number]")
    minutes.fill(str(BUDGET_MINUTES))
    minutes.press("Enter")
    start.click()

    status = page.locator("#train-status")
    expect(status).to_contain_text("Training: 0 s of 60 s", timeout=15_000)
    expect(stop).to_be_enabled(timeout=10_000)
    start.click()  # Start during the run says why it does nothing
    expect(page.get_by_text("Your model is still training: press Stop")).to_have_count(1, timeout=10_000)
    job = visitors.slot.current()
    assert job is not None

    # The status's clock never passes the budget; the curve is drawn while it trains.
    seen = []
    for _ in range(int(240 / 0.5)):
        seen.append(status.inner_text())
        if "Done:" in seen[-1] or "Failed" in seen[-1]:
            break
        page.wait_for_timeout(500)
    clock = [int(n) for t in seen for n in re.findall(r"Training: (\d+) s of 60 s", t)]
    assert clock and max(clock) <= 60, seen
    assert any("now making the int8 copy" in t for t in seen), seen
    expect(status).to_contain_text("Done: trained for", timeout=120_000)
    expect(stop).to_be_disabled()
    curve = page.locator("#train-curve img")
    expect(curve).to_be_visible()
    assert curve.evaluate("img => img.naturalWidth") >= 500  # the figure (its legend checked in test_train_tab.py)
    st = job.status()
    assert len(st.val_curve) >= 3 and len(st.train_curve) >= 3, st  # both curves have points to draw
    report = page.locator("#train-report")
    expect(report.get_by_role("row", name="int8")).to_contain_text("nats/char")
    expect(report.get_by_role("row", name="fp32")).to_contain_text("MB")
    folder = f"smallgpt-{job.run_dir.name}"
    expect(report).to_contain_text(f"the zip unpacks to {folder} (DIR below)")
    expect(page.locator("#train-sample textarea")).not_to_have_value("")
    if os.environ.get("SMALLGPT_SCREENSHOTS") == "1":
        page.screenshot(path=str(SCREENSHOT), full_page=True)

    with page.expect_download() as download:
        page.locator("#train-download").click()
    path = tmp_path / "model.zip"
    download.value.save_as(path)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert f"{folder}/int8/model.safetensors" in zf.namelist(), zf.namelist()  # DIR is the zip's one folder
    # The second download: the model as a static web site (export_web.py's folder), which the report explains.
    expect(report).to_contain_text(f"its zip unpacks to {folder}-site")
    with page.expect_download() as download:
        page.locator("#train-download-site").click()
    download.value.save_as(tmp_path / "site.zip")
    with zipfile.ZipFile(tmp_path / "site.zip") as zf:
        assert zf.testzip() is None
        assert {f"{folder}-site/index.html", f"{folder}-site/onnx/model_quantized.onnx"} <= set(zf.namelist())

    page.get_by_role("tab", name="Generate").click()
    page.locator("#model-choice").get_by_text("yours", exact=True).click()
    expect(page.locator("#model-card")).to_contain_text("Your model", timeout=30_000)
    expect(page.locator("#model-card")).to_contain_text("gpt2-compact")  # the trained model's tokenizer, not the bundled gpt2
    page.locator("#prompt textarea").fill("ROMEO:\n")
    page.locator("#generate").click()
    for i in (1, 2, 3):
        expect(page.locator(f"#seq-{i} textarea")).not_to_have_value("", timeout=30_000)

    # A second run, stopped early: the best weights so far are kept and quantized.
    visitors.slot.train_args = SAVE_OFTEN
    page.get_by_role("tab", name="Train").click()
    start.click()
    expect(status).to_contain_text("Training: ", timeout=15_000)
    second = visitors.slot.current()
    assert second is not None and second is not job
    wait_for(lambda: len(second.status().val_curve) >= 2, page, 90)  # a saved best by then
    expect(page.locator("#train-curve img")).to_be_visible(timeout=10_000)
    stop.click()
    expect(page.get_by_text("Stopping: the best weights so far are kept")).to_have_count(1, timeout=10_000)
    expect(status).to_contain_text("the best weights so far were kept and quantized to int8", timeout=120_000)
    expect(status).to_contain_text("Stopped after")
    expect(stop).to_be_disabled()
    expect(report).to_contain_text("Your model, its zip and its web site's zip are deleted at ", timeout=10_000)

    # A reload, at 1280 px and then at 390 px: the model, its report and its zip are still there, and so is "yours".
    for viewport in ({"width": 1280, "height": 1000}, PHONE):
        page.set_viewport_size(viewport)
        page.reload()
        expect(page.locator("#model-card")).to_contain_text("nats/char", timeout=30_000)
        page.get_by_role("tab", name="Train").click()
        expect(status).to_contain_text("the best weights so far were kept and quantized to int8", timeout=15_000)
        expect(report).to_contain_text(re.compile(r"Your model, its zip and its web site's zip are deleted at \d\d:\d\d UTC, "
                                                  r"in \d+ minutes"))
        expect(page.locator("#train-download")).to_be_visible()
        expect(page.locator("#train-download-site")).to_be_visible()
        curve = page.locator("#train-curve img")
        expect(curve).to_be_visible(timeout=10_000)
        shown, natural = curve.evaluate("img => [img.getBoundingClientRect().width, img.naturalWidth]")
        assert CURVE_FONT_PT * CURVE_DPI / 72 * shown / natural >= 10, (viewport, shown, natural)  # its smallest text, in px
        if viewport == PHONE and os.environ.get("SMALLGPT_SCREENSHOTS") == "1":
            page.screenshot(path=str(SCREENSHOT_PHONE), full_page=True)
        page.get_by_role("tab", name="Generate").click()
        page.locator("#model-choice").get_by_text("yours", exact=True).click()
        expect(page.locator("#model-card")).to_contain_text("Your model", timeout=30_000)
        page.locator("#prompt textarea").fill("ROMEO:\n")
        page.locator("#generate").click()
        expect(page.locator("#seq-1 textarea")).not_to_have_value("", timeout=30_000)


def test_bad_upload_and_no_model_yet_get_one_message(app, tmp_path):
    """A binary file gets one warning and starts nothing; choosing "yours" before training warns and stays "bundled"."""
    from playwright.sync_api import expect

    _, _, training = app
    (tmp_path / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\xff" * 5000)
    page = open_train_tab(app)
    upload(page, tmp_path / "photo.txt")
    page.locator("#train-start").click()
    expect(page.get_by_text("The text looks like a binary file, not text")).to_have_count(1, timeout=10_000)
    expect(page.locator("#train-status")).to_contain_text("No training in this session yet.")
    expect(page.locator("#train-status").get_by_text("Error", exact=True)).to_have_count(0)
    assert training.slot.current() is None

    page.get_by_role("tab", name="Generate").click()
    page.locator("#model-choice").get_by_text("yours", exact=True).click()
    expect(page.get_by_text("You have no trained model yet")).to_have_count(1, timeout=10_000)
    expect(page.locator("#model-choice input[value=bundled]")).to_be_checked()
    expect(page.locator("#model-card")).not_to_contain_text("Your model")
