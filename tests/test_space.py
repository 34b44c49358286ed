"""The Space export, for both targets (zero-gpu, the default, and cpu-basic): a self-contained folder whose app.py boots
with no flags and answers gradio_client requests, Generate and Train; the zero-gpu folder also under the real spaces package
in its ZeroGPU mode, against a stand-in of ZeroGPU's control endpoint on 127.0.0.1 (tests/zerogpu_support.py)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import gradio
import pytest
from app_support import free_port, stop, tiny_checkpoint
from gradio_client import Client
from site_support import check_site_folder
from train_support import TEXT
from zerogpu_support import BLACKWELL, QUOTA_LEFT_S, SHIM, control_endpoint

from model.formats import site
from model.formats.checkpoint import CheckpointError
from model.webapp import zerogpu
from model.webapp.space import (
    DEFAULT_HARDWARE,
    LOWEST_TORCH,
    MARKER,
    PACKAGE,
    SPACES_PACKAGE,
    export_space,
    site_note,
    torch_version,
)

ROOT = Path(__file__).resolve().parents[1]
FRONT_MATTER = {"zero-gpu": ["suggested_hardware: zero-a10g", 'python_version: "3.12"'],
                "cpu-basic": ["suggested_hardware: cpu-basic", 'python_version: "3.11"']}
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt2_tokenizer) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), gpt2_tokenizer)


@pytest.fixture(scope="module", params=["zero-gpu", "cpu-basic"])
def space(request, tmp_path_factory, checkpoint) -> Path:
    out = tmp_path_factory.mktemp(request.param) / "space"
    return export_space(checkpoint, out, app_file=ROOT / "app.py", hardware=request.param)


def _hardware(space: Path) -> str:
    return space.parent.name.rstrip("0123456789")  # the fixture's folder: zero-gpu0, cpu-basic0


def test_bundle_holds_everything_it_needs(space):
    names = {p.relative_to(space).as_posix() for p in space.rglob("*") if p.is_file()}
    assert {"app.py", "README.md", "requirements.txt", "model/gpt2.tiktoken",  # GPT-2's vocabulary: the Space starts offline
            "train.py", "quantize.py", "input.txt",  # what the Train tab runs, and its bundled text
            "export_web.py", "web/index.html", "web/app.js", "web/style.css",  # the visitor's model as a static site
            *(f"web/node_modules/{package}/{file}" for package, file, _ in site.VENDOR),
            "out/int8/config.json", "out/int8/model.safetensors", "out/int8/report.json"} <= names
    assert {f"model/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")} <= names  # the whole package
    assert not any("__pycache__" in n for n in names)
    readme = (space / "README.md").read_text(encoding="utf-8")
    front = readme.split("---")[1]
    for line in ["sdk: gradio", f"sdk_version: {gradio.__version__}", "app_file: app.py", "title: smallgpt", "emoji: ",
                 *FRONT_MATTER[_hardware(space)]]:
        assert line in front, line
    reqs = (space / "requirements.txt").read_text(encoding="utf-8").splitlines()
    assert f"gradio=={gradio.__version__}" in reqs
    assert {f"{name}=={version(name)}" for name in ("onnx", "onnxruntime", "onnxscript")} <= set(reqs)  # export_web.py's
    if _hardware(space) == "zero-gpu":  # torch's CUDA build as ZeroGPU chooses it (no exact pin), and its own spaces
        assert CPU_INDEX not in reqs and "ZeroGPU" in readme
        torch_lines = [r for r in reqs if r.startswith("torch")]
        assert torch_lines == [f"torch>={LOWEST_TORCH}"] and "==" not in torch_lines[0]
        assert [r for r in reqs if r.startswith("spaces")] == [SPACES_PACKAGE] == ["spaces"]  # no bound to break pip
    else:
        assert CPU_INDEX in reqs and f"torch=={torch_version()}" in reqs and not any(r.startswith("spaces") for r in reqs)


@pytest.mark.slow
def test_the_bundles_export_web_writes_a_whole_site(space, checkpoint, tmp_path):
    """The Space's own export_web.py, run in its folder (its model/ package, its web/), writes a site that passes the
    site checks: the Train tab's web-site download needs nothing else from the project."""
    done = subprocess.run([sys.executable, "export_web.py", "--ckpt", str(checkpoint.parent / "fp32"), "--out",
                           str(tmp_path / "site")], cwd=space, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check_site_folder(tmp_path / "site")


def test_without_the_runtime_files_the_space_says_it_has_no_site_download(checkpoint, tmp_path, monkeypatch):
    assert site_note() is None  # this checkout ran npm ci --prefix web
    monkeypatch.setattr(site, "WEB", tmp_path / "web")
    assert site_note().startswith("the Space's Train tab will offer no web-site download: the page's runtime files are "
                                  "missing (")
    assert site_note().endswith("install them once with: npm ci --prefix web, then export again.")
    out = export_space(checkpoint, tmp_path / "space", app_file=ROOT / "app.py")
    assert (out / "export_web.py").is_file() and not (out / "web").exists()  # its Train tab then says why, per model


def test_zero_gpu_is_the_default(checkpoint, tmp_path):
    assert DEFAULT_HARDWARE == "zero-gpu"
    out = export_space(checkpoint, tmp_path / "space", app_file=ROOT / "app.py")
    assert "suggested_hardware: zero-a10g" in (out / "README.md").read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="zero-gpu, cpu-basic"):
        export_space(checkpoint, tmp_path / "other", app_file=ROOT / "app.py", hardware="t4-small")
    assert not (tmp_path / "other").exists()


def _top_level_imports(tree: ast.Module) -> list[tuple[str, ast.stmt]]:
    """(module, statement) for each import at module level, those inside a top-level `if` included, in order."""
    found = []
    for stmt in tree.body:
        for node in ast.walk(stmt) if isinstance(stmt, ast.If | ast.Try) else [stmt]:
            if isinstance(node, ast.Import):
                found += [(alias.name, stmt) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.append((node.module, stmt))
    return found


def test_exported_zero_gpu_app_follows_zerogpu_rules(tmp_path, checkpoint):
    """Read from the exported source: app.py imports spaces, under SPACES_ZERO_GPU, before anything that loads torch or
    gradio; a module-level @spaces.GPU function exists (in a module the server imports at start-up); and no module of the
    app calls CUDA at import time (module level)."""
    space = export_space(checkpoint, tmp_path / "space", app_file=ROOT / "app.py", hardware="zero-gpu")
    imports = _top_level_imports(ast.parse((space / "app.py").read_text(encoding="utf-8")))
    first_heavy = next((i for i, (name, _) in enumerate(imports)
                        if name not in ("__future__", "argparse", "os", "signal", "sys", "pathlib")), None)
    assert first_heavy is not None, "app.py does not import spaces at module level"
    name, stmt = imports[first_heavy]
    assert name == "spaces" and isinstance(stmt, ast.If) and "SPACES_ZERO_GPU" in ast.unparse(stmt.test), ast.unparse(stmt)
    assert not any(n.split(".")[0] in ("torch", "gradio", "model") for n, s in imports[:first_heavy])

    zero = (space / "model/webapp/zerogpu.py").read_text(encoding="utf-8")
    gpu_calls = [node for node in ast.walk(ast.parse(zero)) if isinstance(node, ast.Call)
                 and ast.unparse(node.func).startswith("spaces.GPU")]
    assert gpu_calls, "no @spaces.GPU function"
    chain = {"model/webapp/server.py": "model.webapp.train_tab", "model/webapp/train_tab.py": "model.webapp.training_job",
             "model/webapp/training_job.py": "model.webapp"}  # server -> train_tab -> training_job -> zerogpu
    for path, module in chain.items():
        assert any(n == module for n, _ in _top_level_imports(ast.parse((space / path).read_text(encoding="utf-8")))), path

    for path in sorted(space.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for stmt in tree.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue  # runs when called, not at import
            text = ast.unparse(stmt)
            assert ".cuda" not in text and "cuda.init" not in text, f"{path.relative_to(space)}: {text[:200]}"


def test_export_replaces_an_earlier_export_but_no_other_folder(space, tmp_path):
    (space / "stale.txt").write_text("old", encoding="utf-8")
    export_space(space / "out" / "int8", tmp_path / "again", app_file=ROOT / "app.py")  # from a bundled checkpoint
    assert export_space(tmp_path / "again" / "out" / "int8", space, app_file=ROOT / "app.py") == space
    assert (space / MARKER).is_file() and not (space / "stale.txt").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not an earlier Space export"):
        export_space(space / "out" / "int8", other, app_file=ROOT / "app.py")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    with pytest.raises(CheckpointError, match="python train.py then python quantize.py"):
        export_space(tmp_path / "missing", tmp_path / "new", app_file=ROOT / "app.py")
    assert not (tmp_path / "new").exists()


def _serve(space: Path, env_extra: dict[str, str], argv: list[str]) -> tuple[subprocess.Popen, Client]:
    """Start the exported app (argv) in its folder and connect a client once it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "SMALLGPT_CKPT", "PYTHONPATH", "SPACES_ZERO_GPU")}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False", **env_extra)
    proc = subprocess.Popen(argv, cwd=space, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180  # a busy 2-core machine
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            return proc, Client(url, verbose=False)
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.5)


def _generate_then_train(client: Client) -> None:
    """A Generate request; then the Train tab: train on the bundled text until a first sample, stop, get the int8 model, use it."""
    out = client.predict(prompt="Hello from the Space", max_new_tokens=5, seed=1, api_name="/generate")
    assert sum(bool(s) for s in out) == 3
    st = client.predict(source="shakespeare", minutes=1, api_name="/train_start")
    while st["state"] in ("waiting", "running") and not st.get("sample"):
        time.sleep(1)
        st = client.predict(api_name="/train_status")
    client.predict(api_name="/train_stop")
    while (st := client.predict(api_name="/train_status"))["state"] in ("running", "quantizing"):
        time.sleep(1)
    assert st["state"] == "stopped" and st["report"], st
    assert st["site_ready"] is True and st["site_error"] is None, st  # the web site was written in the Space too
    assert "Parameters" in client.predict(model="yours", api_name="/use_model")
    out = client.predict(prompt="ROMEO:", max_new_tokens=5, seed=1, api_name="/generate")
    assert sum(bool(s) for s in out) == 3


@pytest.mark.slow
def test_exported_folder_boots_and_answers(space):
    """Both folders, as run locally or on a CPU Space: no SPACES_ZERO_GPU, so training is train.py in a child process (for
    zero-gpu, with the real spaces package installed: off ZeroGPU its decorator changes nothing)."""
    proc, client = _serve(space, {}, [sys.executable, "app.py"])
    try:
        _generate_then_train(client)
    finally:
        stop(proc)


@pytest.mark.slow
def test_zero_gpu_folder_trains_inside_a_gpu_call(tmp_path, checkpoint):
    """The zero-gpu folder under the real spaces package in ZeroGPU mode (SPACES_ZERO_GPU=true, its control endpoint a
    stand-in on 127.0.0.1): it boots (spaces' CUDA emulation would raise on any CUDA use in the main process), generates
    without asking for a GPU, and trains inside one @spaces.GPU call, in the forked worker that /allow names, for the
    chosen minutes plus the overhead; Stop reaches the trainer there, and the model comes back quantized."""
    space = export_space(checkpoint, tmp_path / "space", app_file=ROOT / "app.py", hardware="zero-gpu")
    with control_endpoint() as (url, record):
        proc, client = _serve(space, {"SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": url},
                              [sys.executable, "-c", SHIM])
        try:
            assert record.paths() == ["/startup-report"]  # spaces saw a decorated function at launch
            out = client.predict(prompt="Hello from ZeroGPU", max_new_tokens=5, seed=1, api_name="/generate")
            assert sum(bool(s) for s in out) == 3
            assert record.paths() == ["/startup-report"]  # generating costs no GPU
            _generate_then_train(client)
            assert record.paths() == ["/startup-report", "/schedule", "/allow", "/release"]
            shakespeare = zerogpu.train_tokens((space / "input.txt").read_text(encoding="utf-8"))
            assert record.params("/schedule")[0]["durationSeconds"] == str(zerogpu.request_seconds(shakespeare, 1))
            assert int(record.params("/allow")[0]["pid"]) not in (proc.pid, 1)  # a forked worker, not the app
            assert record.params("/release")[0]["fail"] == "false"  # the call ended well
        finally:
            stop(proc)
        log = proc.stdout.read()
        assert "Traceback" not in log, log[-4000:]


def _until(client: Client, done, timeout: float = 120) -> dict:
    """/train_status until done(status); that status."""
    deadline = time.monotonic() + timeout
    while not done(st := client.predict(api_name="/train_status")):
        assert time.monotonic() < deadline, st
        time.sleep(0.3)
    return st


@pytest.mark.slow
def test_zero_gpu_refusals_the_queue_and_the_time_limit_against_the_stand_in(tmp_path, checkpoint):
    """The zero-gpu folder on a Blackwell card (spaces' duration_factor 1.5), a logged-in visitor (an X-IP-Token, as the
    hub sends): the default asks for at most 120 s after the factor; ZeroGPU's refusals (quota, illegal duration, no GPU)
    reach the visitor as one sentence each; a call queued for a GPU is "waiting" with its clock at 0; a worker killed at
    its duration after saving weights leaves a model that is quantized and served."""
    space = export_space(checkpoint, tmp_path / "space", app_file=ROOT / "app.py", hardware="zero-gpu")
    text = TEXT * 60  # no cap at this size: the visitor's minutes bound the run; an evaluation (and save) every 25 steps
    with control_endpoint() as (url, record):
        proc, anonymous = _serve(space, {"SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": url,
                                         "STANDIN_GPU_MODEL": BLACKWELL}, [sys.executable, "-c", SHIM])
        visitor = Client(anonymous.src, headers={"X-IP-Token": "standin.e30.token"}, verbose=False)  # payload {}
        try:
            sent = []
            refusals = {"quota": "ZeroGPU refused: this run asks for {s} s of GPU time and your daily quota has "
                                 f"{QUOTA_LEFT_S} s left; choose fewer minutes, log in to Hugging Face for a larger quota, "
                                 "or try again in 0:30:00.",
                        "illegal": "ZeroGPU refused: {s} s is more GPU time than it allows you in one run; choose fewer "
                                   "minutes, or log in to Hugging Face, which allows longer runs.",
                        "unavailable": "ZeroGPU had no GPU free (it waits up to a minute for one); try again in a few minutes."}
            for answer, sentence in refusals.items():
                record.schedule = answer
                visitor.predict(source="paste", text=text, api_name="/train_start")  # the default minutes
                st = _until(visitor, lambda st: st["state"] not in ("waiting", "running"))
                sent.append(int(record.params("/schedule")[-1]["durationSeconds"]))
                assert st["state"] == "failed" and st["message"] == sentence.format(s=sent[-1]), st
            assert sent[0] == round(zerogpu.request_seconds(0, zerogpu.DEFAULT_MINUTES) * 1.5) <= zerogpu.ANONYMOUS_QUOTA_S

            record.schedule = "queue"
            st = visitor.predict(source="paste", text=text, api_name="/train_start")
            assert st["state"] == "waiting" and st["elapsed_s"] == 0 and "Waiting for a ZeroGPU GPU" in st["message"], st
            st = _until(visitor, lambda st: len(st.get("val_curve", [])) >= 3)  # saved weights by then
            assert st["state"] == "running", st
            os.kill(int(record.params("/allow")[-1]["pid"]), signal.SIGKILL)  # as ZeroGPU does at the end of the duration
            st = _until(visitor, lambda st: st["state"] not in ("waiting", "running", "quantizing"))
            assert st["state"] == "stopped" and st["report"] and st["message"].startswith("Stopped at the GPU time limit"), st
            assert "Parameters" in visitor.predict(model="yours", api_name="/use_model")
            out = visitor.predict(prompt="The ", max_new_tokens=5, seed=1, api_name="/generate")
            assert sum(bool(s) for s in out) == 3
            assert record.params("/release")[-1]["fail"] == "true"
        finally:
            visitor.close()
            stop(proc)
        log = proc.stdout.read()
        assert "Traceback" not in log, log[-4000:]


def test_without_torch_optim_muon_training_falls_back_to_adamw_and_says_so(monkeypatch, capsys):
    """ZeroGPU may give a torch older than 2.9, which has no torch.optim.Muon: the default (muon) optimizer becomes AdamW,
    and the training log says so."""
    import torch

    from model.training.optim import make_optimizer

    model = torch.nn.Module()
    model.h = torch.nn.ModuleList([torch.nn.Linear(4, 4)])  # a block's matrix ("h.0.weight"): Muon's, where there is Muon
    assert type(make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), kind="muon")) is not torch.optim.AdamW
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), kind="muon")
    assert type(optimizer) is torch.optim.AdamW
    assert "has no torch.optim.Muon" in capsys.readouterr().out
