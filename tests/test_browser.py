"""The app in a real browser: Debian's chromium driven by Playwright types a prompt, clicks Generate, sees the text; at a
desktop's width (1280 px) and a phone's (390 px), the next-token chart's labels and the sliders' ranges are readable,
the attention view beside the chart follows the prompt and the head chosen, and a visitor's own model offers the start
of their own text. SMALLGPT_SCREENSHOTS=1 saves the Generate tab at both widths, bundled and "yours", to
docs/generate-*.png, and the "Under the hood" panel to docs/attention-*.png."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from app_support import BROWSER_TEST, CHROMIUM, CHROMIUM_ARGS, TINY_TRAIN, served, tiny_checkpoint

from model.webapp.training_job import TrainingSlot
from model.webapp.visitors import Visitors

pytestmark = BROWSER_TEST
ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (1280, 390)  # a desktop, a phone
# A visitor's own text: a licence, on which a model writes nonsense after "ROMEO:".
LICENCE = ("MIT License\n\nCopyright (c) 2026 A Visitor\n\nPermission is hereby granted, free of charge, to any person "
           "obtaining a copy of this software and associated documentation files (the \"Software\"), to deal in the "
           "Software without restriction.\n\nTHE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.\n") * 40


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory, gpt2_tokenizer):
    """One server (its visitors train a tiny model in seconds) and one chromium for the module; each test gets a
    freshly loaded page. Yields (url, browser, visitors)."""
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("browser")
    # A 64-byte context, so that the offered prompts fit in it whole.
    visitors = Visitors(TrainingSlot(tmp / "runs", train_args=(*TINY_TRAIN, "--block-size", "64", "--max-iters", "30")))
    with served(tiny_checkpoint(tmp, gpt2_tokenizer), visitors) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield url, browser, visitors
        finally:
            browser.close()


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """The whole page, into docs/ with SMALLGPT_SCREENSHOTS=1, else into tmp_path."""
    folder = ROOT / "docs" if os.environ.get("SMALLGPT_SCREENSHOTS") == "1" else tmp_path
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def open_app(browser_page, width: int = 1280):
    from playwright.sync_api import expect

    url, browser, _ = browser_page
    page = browser.new_page(viewport={"width": width, "height": 1100})
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


def label_boxes(page, selector: str) -> list[dict]:
    """The on-screen box and font size of every text element under selector."""
    return page.evaluate("""sel => Array.from(document.querySelectorAll(sel)).map(e => {
        const r = e.getBoundingClientRect();
        return {text: e.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom,
                size: parseFloat(getComputedStyle(e).fontSize)};
    })""", selector)


def overlapping(boxes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of boxes that overlap by more than a pixel each way."""
    return [(a["text"], b["text"]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if min(a["right"], b["right"]) - max(a["left"], b["left"]) > 1
            and min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]) > 1]


@pytest.mark.parametrize("width", WIDTHS)
def test_the_chart_and_the_sliders_are_readable(browser_page, tmp_path, width):
    """At a desktop's and a phone's width: the next-token chart's 10 token labels stand apart from one another in
    readable type (at 390 px, level labels ran into one smear), and every slider shows its min and max (Gradio hides
    them up to 480 px)."""
    from playwright.sync_api import expect

    page = open_app(browser_page, width)
    page.get_by_text("Under the hood").click()
    expect(page.locator("#next-token-chart .mark-rect path")).to_have_count(10, timeout=30_000)
    labels = label_boxes(page, "#next-token-chart [aria-label^='X-axis'] .role-axis-label text")
    assert len(labels) == 10, labels
    assert not overlapping(labels), overlapping(labels)
    assert all(b["size"] >= 10 for b in labels), labels
    chart = page.locator("#next-token-chart").bounding_box()
    assert all(chart["x"] <= b["left"] and b["right"] <= chart["x"] + chart["width"] for b in labels), (chart, labels)

    ranges = {"max new tokens": ("1", "500"), "number of sequences": ("1", "5"), "temperature": ("0", "2"),
              "top-k": ("0", "200"), "top-p": ("0.05", "1")}
    for label, (low, high) in ranges.items():
        block = page.locator("#sampling .block").filter(has_text=label)
        expect(block.locator(".min_value")).to_be_visible()
        expect(block.locator(".min_value")).to_have_text(low)
        expect(block.locator(".max_value")).to_be_visible()
        expect(block.locator(".max_value")).to_have_text(high)
    screenshot(page, f"generate-{width}.png", tmp_path)


@pytest.mark.parametrize("width", WIDTHS)
def test_the_attention_view_follows_the_prompt_and_the_head_chosen(browser_page, gpt2_tokenizer, tmp_path, width):
    """Under the hood, beside the chart (below it on a phone): a row per prompt token and a column per layer, the last
    token marked as the one predicting the next; a new prompt redraws it with that prompt's tokens, a chosen head with
    that head's weights. Its type is readable and it fits the screen's width."""
    from playwright.sync_api import expect

    from model.generation.generate import prompt_tokens
    from model.webapp.generate_tab import FIRST_PROMPT

    page = open_app(browser_page, width)
    page.get_by_text("Under the hood").click()
    table = page.locator("#attention-map table")
    expect(table.locator("thead th")).to_have_count(1 + 2, timeout=30_000)  # the token column, 2 layers
    expect(table.locator("tbody tr")).to_have_count(len(prompt_tokens(gpt2_tokenizer, FIRST_PROMPT)))  # ROM, EO, :, \n
    expect(table.locator("tr.last th")).to_have_text("\\n \u2192 next")
    caption = page.locator("#attention-map .attention-caption")
    expect(caption).to_contain_text("averaged over the heads")

    prompt = "To be, or not to be, that is"
    page.locator("#prompt textarea").fill(prompt)
    expect(table.locator("tbody tr")).to_have_count(len(prompt_tokens(gpt2_tokenizer, prompt)), timeout=30_000)
    expect(table.locator("tr.last th")).to_have_text("\u00b7is \u2192 next")
    mean = table.locator("tbody").inner_text()
    page.locator("#attention-head input").click()
    page.get_by_role("option", name="head 2").click()
    expect(caption).to_contain_text("(head 2)", timeout=30_000)
    assert table.locator("tbody").inner_text() != mean  # that head's weights, not the mean's

    cells = label_boxes(page, "#attention-map td, #attention-map th")
    assert cells and all(b["size"] >= 10 for b in cells), cells
    view = page.locator("#attention-map .attention-scroll").bounding_box()
    assert 0 <= view["x"] and view["x"] + view["width"] <= width, view
    table_box, chart = table.bounding_box(), page.locator("#next-token-chart").bounding_box()
    if width >= 1000:  # beside the chart
        assert table_box["x"] >= chart["x"] + chart["width"] and table_box["y"] < chart["y"] + chart["height"], (table_box, chart)
    else:  # below it
        assert table_box["y"] >= chart["y"] + chart["height"], (table_box, chart)
    folder = ROOT / "docs" if os.environ.get("SMALLGPT_SCREENSHOTS") == "1" else tmp_path
    page.locator("#under-the-hood").screenshot(path=str(folder / f"attention-{width}.png"))
    assert (folder / f"attention-{width}.png").stat().st_size > 10_000


def owner_of(page, visitors) -> str:
    """The owner key the page's Gradio session acts for on the server (its gr.BrowserState key): the session is read off
    a request the page sends."""
    with page.expect_request(lambda r: "queue/join" in r.url) as request:
        page.locator("#prompt textarea").fill("a change the page sends to the server")
    session = request.value.post_data_json["session_hash"]
    deadline = time.monotonic() + 30
    while (owner := visitors.owner(type("Request", (), {"session_hash": session})())) == session:  # the page's load links it
        assert time.monotonic() < deadline, "the page never linked its session to an owner key"
        time.sleep(0.1)
    return owner


@pytest.mark.parametrize("width", WIDTHS)
def test_yours_offers_the_start_of_the_visitors_own_text(browser_page, tmp_path, width):
    """A visitor who trained on a licence chooses "yours": the prompt becomes the licence's first line and the examples
    its first lines, with no Shakespeare; Generate continues that prompt. Back to "bundled", the bundled prompt and
    examples return."""
    from playwright.sync_api import expect

    from model.webapp.generate_tab import EXAMPLES, FIRST_PROMPT

    _, _, visitors = browser_page
    page = open_app(browser_page, width)
    job = visitors.start(owner_of(page, visitors), LICENCE.encode(), 1)  # as the Train tab starts it, without its UI
    deadline = time.monotonic() + 180
    while job.status().state in ("running", "quantizing"):
        assert time.monotonic() < deadline, job.status()
        time.sleep(0.5)
    assert job.status().state == "done", job.status()

    examples = page.locator("#examples")
    page.locator("#model-choice").get_by_text("yours", exact=True).click()
    expect(page.locator("#model-card")).to_contain_text("Your model", timeout=30_000)
    expect(page.locator("#prompt textarea")).to_have_value("MIT License\n")
    for offered in ("MIT License", "Copyright (c) 2026 A Visitor", "Permission is hereby granted"):
        expect(examples.get_by_text(offered)).to_have_count(1)
    for bundled in ("ROMEO", "First Citizen", "KING HENRY"):
        expect(examples.get_by_text(bundled)).to_have_count(0)
    examples.get_by_text("Copyright (c) 2026 A Visitor").click()
    expect(page.locator("#prompt textarea")).to_have_value("Copyright (c) 2026 A Visitor\n")
    page.locator("#generate").click()
    for i in (1, 2, 3):  # the prompt, then what the model wrote
        expect(page.locator(f"#seq-{i} textarea")).to_have_value(re.compile(r"^Copyright \(c\) 2026 A Visitor\n.+", re.S),
                                                                 timeout=30_000)
    screenshot(page, f"generate-yours-{width}.png", tmp_path)

    page.locator("#model-choice").get_by_text("bundled", exact=True).click()
    expect(page.locator("#prompt textarea")).to_have_value(FIRST_PROMPT, timeout=30_000)
    expect(examples.get_by_text(EXAMPLES[1].strip()[:20])).to_have_count(1)
    expect(examples.get_by_text("Copyright (c) 2026 A Visitor")).to_have_count(0)
    visitors.drop(owner_of(page, visitors))
