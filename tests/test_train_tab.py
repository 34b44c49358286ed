"""The Train tab through gradio_client, as an API client uses it: start, poll, stop, zip, generate from your own model;
bad input; one training per server; models go with their session and after their hour. A tiny trainer (1 layer over
bytes, 30 steps) keeps each training to seconds."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from app_support import TINY_TRAIN, served, tiny_checkpoint
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from site_support import check_site_folder
from train_support import TEXT

from model.webapp import train_tab
from model.webapp.pool import TRAIN_THREADS
from model.webapp.server import build_demo
from model.webapp.training_job import MIN_CHARS, TEXT_FILE, TrainingSlot
from model.webapp.visitors import OWNER_KEY, Visitors

LONG = TEXT * (MIN_CHARS // len(TEXT) + 1)  # just above the shortest text accepted
ACTIVE = ("running", "quantizing")


@pytest.fixture(scope="module")
def server(tmp_path_factory, gpt2_tokenizer):
    """The app with a Train tab whose trainings are tiny: yields (url, training, runs folder)."""
    tmp = tmp_path_factory.mktemp("train-tab")
    runs = tmp / "runs"
    training = Visitors(TrainingSlot(runs, train_args=(*TINY_TRAIN, "--max-iters", "30")))
    with served(tiny_checkpoint(tmp, gpt2_tokenizer), training) as (url, _):
        yield url, training, runs


@pytest.fixture(scope="module")
def api(server):
    """One API client (one session) for the module."""
    c = Client(server[0], verbose=False)
    yield c
    c.close()


@pytest.fixture
def client(server, api):
    """The module's client; after each test its model, if any, is deleted, the slot is free and it chose "bundled"."""
    _, training, _ = server
    yield api
    training.forget(type("Request", (), {"session_hash": api.session_hash})())
    wait_until(lambda: training.slot.current() is None, 30)


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def poll(client: Client, timeout: float = 120) -> dict:
    """/train_status until the job is over; its last answer."""
    deadline = time.monotonic() + timeout
    while (st := client.predict(api_name="/train_status"))["state"] in ACTIVE:
        assert time.monotonic() < deadline, st
        time.sleep(0.3)
    return st


def folders(runs: Path) -> list[Path]:
    return sorted(runs.iterdir()) if runs.is_dir() else []


@pytest.mark.slow
def test_train_poll_generate_and_download_through_the_api(server, client, tmp_path):
    url, training, runs = server
    st = client.predict(source="paste", text=LONG, minutes=1, api_name="/train_start")
    assert st["state"] == "running" and st["budget_s"] == 60 and "Training: " in st["message"], st
    st = poll(client)
    assert st["state"] == "done" and st["error"] is None and st["message"].startswith("Done: trained for"), st
    assert [s for s, _ in st["val_curve"]] == [0, 10, 20, 30] and len(st["train_curve"]) == 6
    report = st["report"]
    assert report["size_int8_bytes"] < report["size_fp32_bytes"] and report["val_nats_per_char_int8"] > 0
    # Names relative to the model's folder, not the server's folders.
    assert (report["fp32_checkpoint"], report["int8_checkpoint"], report["val_data"]) == ("model", "model/int8", "input.txt")
    assert isinstance(st["sample"], str) and st["sample"]  # the trainer logs a sample at each evaluation

    card = client.predict(model="yours", api_name="/use_model")
    assert card.startswith("**Your model**") and "bytes (" in card and "context 16 tokens" in card
    texts = client.predict(prompt="First Citizen:", max_new_tokens=8, num_sequences=2, seed=1, api_name="/generate")
    assert all(texts[:2]) and texts[2:] == ("", "", "")
    other = Client(url, verbose=False)  # another visitor still gets the bundled model (gpt2 tokens, not bytes)
    assert other.predict(prompt="First Citizen:", max_new_tokens=8, num_sequences=2, seed=1, api_name="/generate") != texts
    other.close()

    path = client.predict(api_name="/train_zip")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert zf.testzip() is None
        texts = {name: zf.read(name).decode() for name in names if name.endswith((".json", ".jsonl"))}
    top = names[0].split("/")[0]
    assert {f"{top}/model.safetensors", f"{top}/config.json", f"{top}/int8/model.safetensors",
            f"{top}/int8/report.json"} <= set(names), names
    assert all(str(runs) not in text and "smallgpt-train-" not in text for text in texts.values()), texts
    assert json.loads(texts[f"{top}/int8/report.json"])["val_data"] == "input.txt"

    # The zip's link serves Gradio's copy to anyone who has it (no cookie needed), until the model is deleted.
    r = httpx.post(f"{url}gradio_api/call/train_zip", json={"data": [], "session_hash": client.session_hash})
    stream = httpx.get(f"{url}gradio_api/call/train_zip/{r.json()['event_id']}", timeout=30).text
    link = json.loads(stream.strip().split("\n\n")[-1].splitlines()[1].removeprefix("data: "))[0]["url"]
    assert link.endswith(f"{top}.zip") and httpx.get(link).status_code == 200

    # The web site's zip: the same owner check, the same link, and deleted with the model too.
    assert st["site_ready"] is True and st["site_error"] is None
    site_path = client.predict(api_name="/train_site_zip")
    with zipfile.ZipFile(site_path) as zf:
        assert zf.testzip() is None
        assert {n.split("/")[0] for n in zf.namelist()} == {f"{top}-site"}
        texts = {name: zf.read(name).decode() for name in zf.namelist() if name.endswith((".json", ".md"))}
        zf.extractall(tmp_path / "site")
    assert texts and all(str(runs) not in text and "smallgpt-train-" not in text for text in texts.values()), texts
    check_site_folder(tmp_path / "site" / f"{top}-site")
    other = Client(url, verbose=False)  # another visitor cannot reach it
    with pytest.raises(AppError, match="You have no trained model in this session"):
        other.predict(api_name="/train_site_zip")
    other.close()
    r = httpx.post(f"{url}gradio_api/call/train_site_zip", json={"data": [], "session_hash": client.session_hash})
    stream = httpx.get(f"{url}gradio_api/call/train_site_zip/{r.json()['event_id']}", timeout=30).text
    site_link = json.loads(stream.strip().split("\n\n")[-1].splitlines()[1].removeprefix("data: "))[0]["url"]
    assert site_link.endswith(f"{top}-site.zip") and httpx.get(site_link).status_code == 200

    training.drop(client.session_hash)  # as after an hour: Generate falls back to the bundled model
    for each in (link, site_link):
        assert httpx.get(each).status_code != 200  # the served copies went with the model (Gradio: 403)
        assert not Path(each.split("file=", 1)[1]).exists()
    assert all(client.predict(prompt="First Citizen:", max_new_tokens=8, num_sequences=2, seed=1, api_name="/generate")[:2])
    with pytest.raises(AppError, match="You have no trained model yet"):
        client.predict(model="yours", api_name="/use_model")
    assert "**Parameters** 3.30 M" in client.predict(model="bundled", api_name="/use_model")


@pytest.mark.parametrize("kw, message", [
    (dict(source="upload"), "Choose a .txt file to upload first."),
    (dict(source="paste", text=""), "The text is empty"),
    (dict(source="paste", text=" \n\t "), "The text is empty"),
    (dict(source="paste", text="To be, or not to be"), f"19 characters, too few to train on: add {MIN_CHARS - 19:,} more characters"),
    (dict(source="paste", text="a" * (10 * 2**20 + 1)), "The text is 10.0 MB, over the limit of 10 MB"),
    (dict(source="paste", text="\x01\x02\x1babc" * 1000), "The text looks like a binary file"),
    (dict(source="paste", text=LONG, minutes=0), "Choose between 1 and 10 minutes of training, not 0."),
    (dict(source="paste", text=LONG, minutes=11), "Choose between 1 and 10 minutes of training, not 11."),
    (dict(source="paste", text=LONG, minutes="3"), 'minutes must be a number from 1 to 10, got "3".'),
    (dict(source="paste", text=5), "The text must be a string, got 5."),
    (dict(source="mine", text=LONG), "source must be one of 'upload', 'paste', 'shakespeare', got \"mine\"."),
])
def test_bad_input_gets_one_clear_message_and_starts_nothing(server, client, kw, message):
    _, training, runs = server
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        client.predict(api_name="/train_start", **kw)
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)
    assert training.slot.current() is None and training.get(client.session_hash) is None and not folders(runs)


@pytest.mark.parametrize("name, data, message", [
    ("binary.txt", b"\x89PNG\r\n\x1a\n" + b"\x00\xff" * 500, r"The text looks like a binary file, not text \(it holds NUL bytes\)"),
    ("latin1.txt", "café ".encode("latin-1") * 1000, "The text is not valid UTF-8: byte 0xe9 at offset 3"),
    ("empty.txt", b"", "The text is empty"),
])
def test_bad_uploads_get_one_clear_message(server, client, tmp_path, name, data, message):
    _, training, runs = server
    (tmp_path / name).write_bytes(data)
    with pytest.raises(AppError, match=message):
        client.predict(source="upload", file=handle_file(str(tmp_path / name)), api_name="/train_start")
    assert training.slot.current() is None and not folders(runs)


def test_uploads_over_10_mb_are_refused_by_the_server(server, client, tmp_path):
    (tmp_path / "big.txt").write_bytes(b"a" * (10 * 2**20 + 1))
    with pytest.raises(Exception, match="(?i)too large|exceeds|413"):
        client.predict(source="upload", file=handle_file(str(tmp_path / "big.txt")), api_name="/train_start")


def test_a_second_start_from_another_session_is_refused_while_one_trains(server, client, monkeypatch):
    url, training, runs = server
    monkeypatch.setattr(training.slot, "train_args", (*TINY_TRAIN, "--max-iters", "1000000"))  # trains until stopped
    first = client.predict(source="paste", text=LONG, minutes=1, api_name="/train_start")
    assert first["state"] == "running"
    other = Client(url, verbose=False)
    try:
        with pytest.raises(AppError, match=r"^Another model is training on this server; try again in about 2 minutes\.$"):
            other.predict(source="paste", text=LONG, minutes=1, api_name="/train_start")
        assert other.predict(api_name="/train_status") == {"state": "none", "message": "No training in this session yet."}
        with pytest.raises(AppError, match="Nothing of yours is training"):
            other.predict(api_name="/train_stop")
    finally:
        other.close()
    # A raw REST call names its session in the body: it sees the same training.
    r = httpx.post(f"{url}gradio_api/call/train_status", json={"data": [], "session_hash": client.session_hash})
    assert '"state": "running"' in httpx.get(f"{url}gradio_api/call/train_status/{r.json()['event_id']}", timeout=30).text
    with pytest.raises(AppError, match="Your model is still training: press Stop"):
        client.predict(source="paste", text=LONG, minutes=1, api_name="/train_start")
    with pytest.raises(AppError, match="Your model is still training: choose it once"):
        client.predict(model="yours", api_name="/use_model")
    assert client.predict(api_name="/train_stop")["state"] in ACTIVE
    assert poll(client)["state"] == "stopped"
    assert len(folders(runs)) <= 1  # the stopped model, if its first weights were saved


def test_closing_the_session_deletes_its_model(server, monkeypatch):
    """gradio_client's close() ends its heartbeat; Gradio notices at its next beat (every 15 s; 1 s here)."""
    url, training, runs = server
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "1")  # read by the server (this process) as the session connects
    c = Client(url, verbose=False)
    c.predict(source="paste", text=LONG, minutes=1, api_name="/train_start")
    owner = c.session_hash
    assert training.get(owner) is not None
    c.close()  # ends its heartbeat: Gradio runs the page's unload event, which drops the model and kills its training
    wait_until(lambda: training.get(owner) is None and training.slot.current() is None, 30)
    wait_until(lambda: not folders(runs), 30)


def test_models_past_their_hour_are_swept_and_let_go(tmp_path, gpt2_tokenizer):
    """sweep() deletes old models and the copies loaded for Generate; the visitor then gets the bundled model."""
    now = [0.0]
    ckpt = tiny_checkpoint(tmp_path, gpt2_tokenizer)

    class Finished:  # a finished job, as far as the Train tab looks
        active, discarded = False, False

        def status(self):
            return type("S", (), {"model_dir": ckpt})()

        def discard(self):
            self.discarded = True

    training = Visitors(TrainingSlot(tmp_path / "runs"), clock=lambda: now[0])
    job = Finished()
    training.add("visitor", job)
    bundled = object()
    request = type("R", (), {"session_hash": "visitor"})()
    assert "**Your model**" in training.chooser(bundled)("yours", request)
    pool = training.pool_for(bundled)(request)
    assert pool is not bundled and pool.ckpt == ckpt and training.own_pool("visitor") is pool  # loaded once
    now[0] += 1800
    training.sweep()
    assert training.pool_for(bundled)(request) is pool
    now[0] += 1801
    training.sweep()
    assert job.discarded and training.loaded_models() == 0
    with pytest.warns(UserWarning, match="Your model is not ready, or was deleted .*: the bundled model answered"):
        assert training.pool_for(bundled)(request) is bundled  # a warning toast on the page
    training.close()


def test_sessions_without_a_model_leave_nothing_in_the_store(tmp_path, gpt2_tokenizer):
    """Choosing "bundled" (any session id an API client makes up) or being swept keeps no state for an owner."""
    from model.webapp.pool import ModelPool

    bundled = ModelPool(tiny_checkpoint(tmp_path, gpt2_tokenizer), copies=1)
    visitors = Visitors(TrainingSlot(tmp_path / "runs"), clock=lambda: 0.0, max_age_s=-1)
    use_model = visitors.chooser(bundled)
    for i in range(20):
        assert "**Parameters**" in use_model("bundled", type("R", (), {"session_hash": f"made-up-{i}"})())
    assert len(visitors) == 0

    class Finished:
        active = False

        def discard(self):
            pass

    visitors.add("visitor", Finished())
    assert len(visitors) == 1 and visitors.sweep() == 1 and len(visitors) == 0
    visitors.close()


def test_the_split_and_the_tab_switch(tmp_path, gpt2_tokenizer, monkeypatch):
    """Trainings use TRAIN_THREADS (1); the Tiny Shakespeare choice shows only where the file is; without training
    the page has no Train tab and no train endpoints."""
    from model.webapp.pool import ModelPool

    default = Visitors()
    assert default.slot.threads == TRAIN_THREADS == 1
    default.close()
    assert not default.slot.root.exists()
    assert train_tab.sources() == ["upload", "paste", "shakespeare"]
    monkeypatch.setattr(train_tab, "SHAKESPEARE", tmp_path / "missing.txt")
    assert train_tab.sources() == ["upload", "paste"]
    with pytest.raises(train_tab.JobError, match="source must be one of 'upload', 'paste', got \"shakespeare\""):
        train_tab._text_bytes("shakespeare", None, None)
    pool = ModelPool(tiny_checkpoint(tmp_path, gpt2_tokenizer), copies=1)
    apis = {fn.api_name for fn in build_demo(pool).fns.values()}
    assert "generate" in apis and not {"train_start", "use_model"} & apis
    training = Visitors(TrainingSlot(tmp_path / "runs"))
    demo = build_demo(pool, training)
    assert {"generate", "train_start", "train_status", "train_stop", "train_zip", "train_site_zip", "use_model"} <= {
        fn.api_name for fn in demo.fns.values()}
    assert any(target[1] == "unload" for fn in demo.fns.values() for target in fn.targets)  # a closed page drops its model
    assert any("Or train your own model" in str(getattr(b, "value", "")) for b in demo.blocks.values())  # the header says so


def test_status_sentences():
    from model.webapp.training_job import Status

    def status(**kw):
        base = dict(state="running", elapsed_s=73.2, budget_s=180.0, seconds_left=137.0, records=[], train_curve=[],
                    val_curve=[], sample=None, error=None, report=None, model_dir=None)
        return Status(**{**base, **kw})

    assert train_tab.status_text(status()) == "Training: 73 s of 180 s; the model is ready in about 3 minutes."
    assert 'value="73"' in train_tab.status_html(status())
    assert train_tab.status_text(status(state="stopped", report={})) == \
        "Stopped after 73 s: the best weights so far were kept and quantized to int8."
    assert train_tab.status_text(status(state="failed", error="Training stopped unexpectedly.")) == \
        "Failed: Training stopped unexpectedly."
    assert "&lt;b&gt;" in train_tab.status_html(status(state="failed", error="<b>"))  # escaped
    report = {"params": 4.6e6, "size_fp32_bytes": 18.4e6, "size_int8_bytes": 4.7e6, "val_nats_per_char_fp32": 1.51,
              "val_nats_per_char_int8": 1.523}
    md = train_tab.report_markdown(status(state="done", report=report, records=[{"step": 900}]))
    assert "4.60 M parameters, 900 steps" in md and "| int8 | 4.7 MB | 1.523 nats/char |" in md
    assert "| fp32 | 18.4 MB | 1.510 nats/char |" in md
    md = train_tab.report_markdown(status(state="done", report=report, zip_folder="smallgpt-model-abc"))
    assert "the zip unpacks to `smallgpt-model-abc` (DIR below)" in md and "`python generate.py --ckpt DIR/int8`" in md
    # The clock stops at the budget while the trainer saves; the int8 step counts down.
    over = train_tab.status_text(status(elapsed_s=63.4, seconds_left=30.0, budget_s=60.0))
    assert over.startswith("Training: 60 s of 60 s, time is up") and "63" not in over and "ready in" not in over
    assert 'value="60"' in train_tab.status_html(status(elapsed_s=63.4, budget_s=60.0))
    assert train_tab.status_text(status(state="quantizing", elapsed_s=60.0, seconds_left=21.0)) == (
        "Trained for 60 s; now making the int8 copy and scoring it on the validation text (about 21 s left).")
    assert "(a few more seconds)" in train_tab.status_text(status(state="quantizing", seconds_left=0.0))
    assert train_tab.curve_figure(status()) is None


def test_the_curve_draws_every_point_of_both_splits_with_a_legend_inside_the_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from model.webapp.training_job import Status

    def figure(train, val):
        return train_tab.curve_figure(Status(state="running", elapsed_s=1.0, budget_s=60.0, seconds_left=59.0, records=[],
                                             train_curve=train, val_curve=val, sample=None, error=None, report=None,
                                             model_dir=None))

    val = [(step, 5.0 - step / 100) for step in range(0, 200, 20)]  # validation ~10 times in a short run
    fig = figure([(5, 4.0), (10, 3.8), (15, 3.7)], val)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
    assert [line.get_xydata().tolist() for line in ax.get_lines()] == [[[5, 4.0], [10, 3.8], [15, 3.7]],
                                                                       [list(p) for p in val]]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    legend, whole = ax.get_legend().get_window_extent(), fig.bbox
    assert whole.x0 <= legend.x0 and legend.x1 <= whole.x1 and whole.y0 <= legend.y0 and legend.y1 <= whole.y1
    assert [t.get_text() for t in figure([], [(0, 5.0)]).axes[0].get_legend().get_texts()] == ["validation"]


def test_closing_the_server_during_a_training_leaves_no_folder(tmp_path):
    """At shutdown (atexit) a running training is killed and every job folder goes at once, not in a thread that
    the exiting interpreter may never run."""
    training = Visitors(TrainingSlot(tmp_path / "runs", train_args=(*TINY_TRAIN, "--max-iters", "1000000")))
    job = training.start("someone", LONG.encode(), 1)
    assert job.state == "running" and job.run_dir.exists()
    training.close()
    assert not (tmp_path / "runs").exists()


def _status(**kw):
    from model.webapp.training_job import Status

    base = dict(state="running", elapsed_s=1.0, budget_s=60.0, seconds_left=59.0, records=[], train_curve=[], val_curve=[],
                sample=None, error=None, report=None, model_dir=None)
    return Status(**{**base, **kw})


def test_the_first_frame_spans_the_expected_steps():
    """One point at step 0: the step axis already runs to the steps the run is expected to reach, not -0.04 to 0.04."""
    ax = train_tab.curve_figure(_status(val_curve=[(0, 5.0)], expected_steps=1026)).axes[0]
    assert ax.get_xlim() == (0, 1026)
    ax = train_tab.curve_figure(_status(train_curve=[(0, 5.5)], val_curve=[(0, 5.0)])).axes[0]  # not known yet
    assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 0
    assert train_tab.curve_figure(_status(train_curve=[(5, 4.0), (900, 2.0)], expected_steps=800)).axes[0].get_xlim() == (0, 900)


def test_the_curves_text_stays_readable_at_a_phones_width():
    """At 390 px the page shows the picture about 326 px wide (measured in tests/test_browser_train.py): its smallest
    text, the tick labels and the legend, is still 10 px or more there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = train_tab.curve_figure(_status(train_curve=[(5, 4.0), (10, 3.8)], val_curve=[(0, 5.0), (10, 3.9)], expected_steps=100))
    FigureCanvasAgg(fig).draw()
    width_px = fig.get_size_inches()[0] * fig.dpi
    ax = fig.axes[0]
    texts = [*ax.get_xticklabels(), *ax.get_yticklabels(), *ax.get_legend().get_texts(), ax.xaxis.label, ax.yaxis.label]
    smallest_px = min(t.get_fontsize() for t in texts) * fig.dpi / 72
    assert width_px >= 500 and smallest_px * 326 / width_px >= 10, (width_px, smallest_px)


def test_waiting_and_time_limit_sentences_and_when_a_model_goes():
    assert train_tab.status_text(_status(state="waiting", elapsed_s=0.0, gpu_request_s=75)) == (
        "Waiting for a ZeroGPU GPU: this run asks for 75 s of GPU time; training starts as soon as ZeroGPU gives it one.")
    assert train_tab.status_text(_status(state="stopped", report={}, at_limit=True, elapsed_s=58.2)) == (
        "Stopped at the GPU time limit after 58 s: the best weights saved by then were kept and quantized to int8.")
    assert "<progress></progress>" in train_tab.status_html(_status(state="waiting"))  # busy, no value yet
    noon = 1_800_000_000 - 1_800_000_000 % 86400 + 12 * 3600  # 12:00 UTC
    assert train_tab.deletion_text(3480.0, now=noon) == (
        "Your model and its zip are deleted at 12:58 UTC, in 58 minutes (an hour after its training started; reloading "
        "this page keeps them until then).")
    md = train_tab.report_markdown(_status(state="done", report={}), expires_in=3480.0)
    assert "Your model and its zip are deleted at " in md and "in 58 minutes" in md
    assert train_tab.deletion_text(None) == ""


def test_the_report_offers_the_web_site_or_says_why_not_and_when_it_goes():
    md = train_tab.report_markdown(_status(state="done", report={}, site_folder="smallgpt-model-abc-site"), expires_in=3480.0)
    assert "its zip unpacks to `smallgpt-model-abc-site`" in md
    assert "`python -m http.server --directory smallgpt-model-abc-site 8000`" in md
    assert "Your model, its zip and its web site's zip are deleted at " in md and "in 58 minutes" in md
    why = "There is no web-site download: this server lacks the page's runtime files (npm ci --prefix web installs them)."
    md = train_tab.report_markdown(_status(state="done", report={}, site_error=why), expires_in=3480.0)
    assert why in md and "Your model and its zip are deleted at " in md and "http.server" not in md
    assert train_tab.status_text(_status(state="quantizing", elapsed_s=60.0, seconds_left=12.0, writing_site=True)) == (
        "Trained for 60 s and quantized to int8; now writing its web site (about 12 s left).")
    api = train_tab.status_dict(_status(state="done", report={}, site_folder="smallgpt-model-abc-site"))
    assert api["site_ready"] is True and api["site_error"] is None


def test_the_gpu_time_start_asks_for_is_shown_before_start():
    from model.webapp import zerogpu

    request = zerogpu.request_seconds(zerogpu.train_tokens(LONG), 0.75)
    note = train_tab.gpu_note("paste", LONG, None, 0.75)
    assert note.startswith(f"Start asks ZeroGPU for {request} s of GPU time (")
    assert f"up to {zerogpu.charged(request, 1.5)} s against your quota" in note
    assert train_tab.gpu_note("upload", None, None, 0.75).startswith(
        f"Start asks ZeroGPU for at most {zerogpu.request_seconds(0, 0.75)} s of GPU time")


def test_a_pages_owner_key_keeps_its_model_across_a_reload(tmp_path, gpt2_tokenizer):
    """The page links each new session to the key its browser keeps (gr.BrowserState): closing or reloading the page
    lets go of the session, not of the model; "yours" works from the new session; an API client's session is its owner
    and takes its model with it. A key that is not one the server makes (an API client's session id, say) is replaced."""
    ckpt = tiny_checkpoint(tmp_path, gpt2_tokenizer)

    class Finished:
        active, discarded, run_dir = False, False, tmp_path

        def status(self):
            return type("S", (), {"model_dir": ckpt})()

        def discard(self):
            self.discarded = True

    now = [100.0]
    visitors = Visitors(TrainingSlot(tmp_path / "runs"), clock=lambda: now[0])
    first, second, api = (type("R", (), {"session_hash": name})() for name in ("page-1", "page-2", "api-session"))
    key = visitors.link(first, None)
    assert OWNER_KEY.fullmatch(key) and visitors.owner(first) == key
    visitors.add(visitors.owner(first), job := Finished())
    now[0] += 120
    visitors.forget(first)  # the reload's unload event
    assert visitors.get(key) is job and not job.discarded
    assert visitors.link(second, key) == key and visitors.owner(second) == key
    assert "**Your model**" in visitors.chooser(object())("yours", second)
    (tmp_path / TEXT_FILE).write_text("Licensed under the terms below.", encoding="utf-8")
    assert visitors.text_start(second, 8) == "Licensed"  # the Generate tab's offered prompt, from the new session
    assert visitors.expires_in(key) == pytest.approx(3600 - 120)
    visitors.add("api-session", api_job := Finished())
    assert visitors.link(type("R", (), {"session_hash": "page-3"})(), "api-session") != "api-session"  # not adopted
    visitors.forget(api)
    assert api_job.discarded and visitors.get("api-session") is None
    assert visitors.link(first, "k-short") != "k-short"
    visitors.close()
