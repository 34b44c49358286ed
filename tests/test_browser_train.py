"""The Train tab in a real browser (Debian's chromium via Playwright), with the app's default trainer on 100 kB of Tiny
Shakespeare for a 24 s budget: upload, Start, the live curve and sample, Stop, the int8 report, the zip, then Generate
with "yours". SMALLGPT_SCREENSHOTS=1 also saves the tab mid-run to docs/train-tab.png."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from app_support import BROWSER_TEST, CHROMIUM, CHROMIUM_ARGS, served, tiny_checkpoint

from model.webapp import train_tab, training_job
from model.webapp.training_job import TrainingSlot
from model.webapp.visitors import Visitors

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "train-tab.png"
BUDGET_MINUTES = 0.4  # below the tab's 1-minute minimum, which this module's server lowers to it
# The trainer writes its log (the curve's points) at each evaluation: every 20 steps rather than 200, so the curve
# moves during a 24 s run.
TRAIN_ARGS = ("--eval-interval", "20")

# Vega draws each curve as an SVG path; a curve of two points or more has a line segment ("L") in it.
DRAWN_LINE = "() => [...document.querySelectorAll('#train-curve .mark-line path')].some(p => (p.getAttribute('d') || '').includes('L'))"

pytestmark = BROWSER_TEST


@pytest.fixture(scope="module")
def app(tmp_path_factory, gpt2_tokenizer):
    """One server (the default trainer, evaluating more often; the minimum lowered to BUDGET_MINUTES) and one chromium
    for the module: yields (url, browser, training)."""
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("browser-train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_job, "MIN_MINUTES", BUDGET_MINUTES)  # the slot's check
        mp.setattr(train_tab, "MIN_MINUTES", BUDGET_MINUTES)  # the slider
        training = Visitors(TrainingSlot(tmp / "runs", train_args=TRAIN_ARGS))
        with served(tiny_checkpoint(tmp, gpt2_tokenizer), training) as (url, _), sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                yield url, browser, training
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


def test_train_watch_stop_try_and_download(app, tmp_path, shakespeare_path):
    from playwright.sync_api import expect

    _, _, training = app
    text = tmp_path / "shakespeare-100k.txt"
    text.write_text(shakespeare_path.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    page = open_train_tab(app)
    upload(page, text)
    minutes = page.locator("#train-minutes input[type=number]")
    minutes.fill(str(BUDGET_MINUTES))
    minutes.press("Enter")
    page.locator("#train-start").click()

    status = page.locator("#train-status")
    expect(status).to_contain_text(f"Training: 0 s of {BUDGET_MINUTES * 60:.0f} s", timeout=15_000)
    job = training.slot.current()
    assert job is not None
    # Mid-run: once the page has drawn a line through two points.
    page.wait_for_function(DRAWN_LINE, timeout=60_000)
    expect(status).to_contain_text("Training: ")
    if os.environ.get("SMALLGPT_SCREENSHOTS") == "1":
        page.screenshot(path=str(SCREENSHOT), full_page=True)

    page.locator("#train-stop").click()  # keeps the best weights so far, and still quantizes them
    expect(page.get_by_text("Stopping: the best weights so far are kept")).to_have_count(1, timeout=10_000)
    report = page.locator("#train-report")
    expect(report.get_by_role("row", name="int8")).to_contain_text("nats/char", timeout=120_000)
    expect(report.get_by_role("row", name="fp32")).to_contain_text("MB")
    expect(status).to_contain_text("Stopped after")
    expect(status).to_contain_text("the best weights so far were kept and quantized to int8")
    assert page.locator("#train-curve .mark-line path").count() == 2  # train and validation
    st = job.status()
    sample = page.locator("#train-sample textarea")
    assert any(r.get("sample") for r in st.records)  # the trainer logs a sample at each evaluation: the page shows it
    expect(sample).not_to_have_value("")

    with page.expect_download() as download:
        page.locator("#train-download").click()
    path = tmp_path / "model.zip"
    download.value.save_as(path)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert any(n.endswith("/int8/model.safetensors") for n in zf.namelist()), zf.namelist()

    page.get_by_role("tab", name="Generate").click()
    page.locator("#model-choice").get_by_text("yours", exact=True).click()
    expect(page.locator("#model-card")).to_contain_text("Your model", timeout=30_000)
    expect(page.locator("#model-card")).to_contain_text("gpt2-compact")  # the trained model's tokenizer, not the bundled gpt2
    page.locator("#prompt textarea").fill("ROMEO:\n")
    page.locator("#generate").click()
    for i in (1, 2, 3):
        expect(page.locator(f"#seq-{i} textarea")).not_to_have_value("", timeout=30_000)


def test_bad_upload_and_no_model_yet_get_one_message(app, tmp_path):
    """A binary file gets one warning and starts nothing; choosing "yours" before training warns and stays "bundled"."""
    from playwright.sync_api import expect

    _, _, training = app
    (tmp_path / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\xff" * 5000)
    page = open_train_tab(app)
    upload(page, tmp_path / "photo.txt")
    page.locator("#train-start").click()
    expect(page.get_by_text("This looks like a binary file, not text")).to_have_count(1, timeout=10_000)
    expect(page.locator("#train-status")).to_contain_text("No training in this session yet.")
    expect(page.locator("#train-status").get_by_text("Error", exact=True)).to_have_count(0)
    assert training.slot.current() is None

    page.get_by_role("tab", name="Generate").click()
    page.locator("#model-choice").get_by_text("yours", exact=True).click()
    expect(page.get_by_text("You have no trained model yet")).to_have_count(1, timeout=10_000)
    expect(page.locator("#model-choice input[value=bundled]")).to_be_checked()
    expect(page.locator("#model-card")).not_to_contain_text("Your model")
