"""The app in a real browser: Debian's chromium driven by Playwright types a prompt, clicks Generate, sees the text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from app_support import served, tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)"),
]


def test_type_prompt_click_generate_see_sequences(tmp_path, gpt2_tokenizer):
    from playwright.sync_api import expect, sync_playwright

    shot = Path(os.environ.get("SMALLGPT_SCREENSHOT") or tmp_path / "app.png")
    with served(tiny_checkpoint(tmp_path, gpt2_tokenizer)) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(url)
            expect(page.locator("#model-card")).to_contain_text("nats/char", timeout=30_000)
            page.locator("#prompt textarea").fill("ROMEO:\nWhat light through yonder window")
            page.locator("#generate").click()
            boxes = [page.locator(f"#seq-{i} textarea") for i in (1, 2, 3)]
            for box in boxes:
                expect(box).not_to_have_value("", timeout=30_000)
            expect(page.locator("#seq-4")).to_be_hidden()
            page.wait_for_timeout(1500)  # let the 200-token default finish streaming before the picture
            texts = [box.input_value() for box in boxes]
            assert all(len(t) > 10 for t in texts) and len(set(texts)) == 3, texts
            page.get_by_text("Under the hood").click()
            page.get_by_role("button", name="Show next-token probabilities").click()
            expect(page.locator("#next-token-chart")).to_contain_text("probability", timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
