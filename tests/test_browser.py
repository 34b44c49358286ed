"""The app in a real browser: Debian's chromium driven by Playwright types a prompt, clicks Generate, sees the text."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from app_support import BROWSER_TEST, CHROMIUM, CHROMIUM_ARGS, served, tiny_checkpoint

pytestmark = BROWSER_TEST


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory, gpt2_tokenizer):
    """One server and one chromium for the module; each test gets a freshly loaded page."""
    from playwright.sync_api import sync_playwright

    with served(tiny_checkpoint(tmp_path_factory.mktemp("browser"), gpt2_tokenizer)) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield url, browser
        finally:
            browser.close()


def open_app(browser_page):
    from playwright.sync_api import expect

    url, browser = browser_page
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(url)
    expect(page.locator("#model-card")).to_contain_text("nats/char", timeout=30_000)
    expect(page.get_by_role("tab", name="Generate")).to_have_attribute("aria-selected", "true")
    return page


def generate(page, prompt: str) -> list[str]:
    """Type prompt, click Generate, wait for the default 3 x 200 tokens to finish; the texts of the 3 boxes."""
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate").click()
    boxes = [page.locator(f"#seq-{i} textarea") for i in (1, 2, 3)]
    for box in boxes:
        expect(box).not_to_have_value("", timeout=30_000)
    page.wait_for_timeout(1500)  # let the 200-token default finish streaming
    return [box.input_value() for box in boxes]


def test_type_prompt_click_generate_see_sequences(browser_page, tmp_path):
    from playwright.sync_api import expect

    shot = Path(os.environ.get("SMALLGPT_SCREENSHOT") or tmp_path / "app.png")
    page = open_app(browser_page)
    texts = generate(page, "ROMEO:\nWhat light through yonder window")
    expect(page.locator("#seq-4")).to_be_hidden()
    assert all(len(t) > 10 for t in texts) and len(set(texts)) == 3, texts
    page.get_by_text("Under the hood").click()
    expect(page.locator("#next-token-chart")).to_contain_text("probability", timeout=30_000)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


X_AXIS = "#next-token-chart [aria-label^='X-axis']"  # Vega describes each axis: its values, the tokens shown
Y_AXIS = "#next-token-chart [aria-label^='Y-axis']"


def test_the_page_starts_with_a_prompt_and_the_chart_follows_it(browser_page):
    """The prompt box starts with a prompt that Generate takes as it is; "Under the hood" opens on that prompt's bars,
    from 0, and redraws them as the prompt changes, so no bars of an older prompt stay."""
    from playwright.sync_api import expect

    from model.webapp.generate_tab import FIRST_PROMPT

    page = open_app(browser_page)
    assert page.locator("#prompt textarea").input_value() == FIRST_PROMPT == "ROMEO:\n"
    page.locator("#generate").click()
    for i in (1, 2, 3):
        expect(page.locator(f"#seq-{i} textarea")).not_to_have_value("", timeout=30_000)
    expect(page.get_by_text("The prompt is empty")).to_have_count(0)

    page.get_by_text("Under the hood").click()  # no button to press: the bars are there
    expect(page.locator("#next-token-chart .mark-rect path")).to_have_count(10, timeout=30_000)
    expect(page.locator(Y_AXIS)).to_have_attribute("aria-label", re.compile(r"values from 0\.0* to "))
    first = page.locator(X_AXIS).get_attribute("aria-label")
    page.locator("#prompt textarea").fill("To be, or not to be, that is")
    expect(page.locator(X_AXIS)).not_to_have_attribute("aria-label", first, timeout=30_000)
    expect(page.locator("#next-token-chart .mark-rect path")).to_have_count(10)


def test_empty_prompt_warns_once_and_keeps_the_text(browser_page, tmp_path):
    """Generate, clear the prompt, Generate again: one message says the prompt is empty; the boxes keep their text
    and show no red "Error" badge over it. The next-token chart empties (it shows the prompt's bars, and there is none)."""
    from playwright.sync_api import expect

    page = open_app(browser_page)
    texts = generate(page, "KING HENRY:\nOnce more unto the")
    page.get_by_text("Under the hood").click()
    chart = page.locator("#next-token-chart")
    expect(chart.locator(".mark-rect path")).to_have_count(10, timeout=30_000)
    page.locator("#prompt textarea").fill("")
    page.locator("#generate").click()
    expect(page.get_by_text("The prompt is empty: type some text for the model")).to_have_count(1, timeout=10_000)
    expect(chart.locator(".mark-rect path")).to_have_count(0, timeout=10_000)
    page.wait_for_timeout(1000)  # a reply that cleared the boxes would have arrived by now
    page.screenshot(path=str(tmp_path / "empty-prompt.png"), full_page=True)
    for i, text in enumerate(texts, 1):
        expect(page.locator(f"#seq-{i} textarea")).to_have_value(text)
        expect(page.locator(f"#seq-{i}").get_by_text("Error", exact=True)).to_have_count(0)
    expect(chart.get_by_text("Error", exact=True)).to_have_count(0)
