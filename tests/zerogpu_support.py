"""ZeroGPU on 127.0.0.1, for the tests: a stand-in of the control endpoint the spaces package calls, and a start-up shim that
lets the CPU build of torch pass for a CUDA one where spaces looks.

The endpoint answers what spaces/zero/api.py's APIClient sends: POST /startup-report, /schedule, /allow and /release, each
recorded with its query parameters. /schedule answers as ControlEndpoint.schedule says: a GPU at once (a ScheduleResponse
as JSON), after a queue (an event stream of pings, then "succeeded"), or a refusal: the quota left is too small or the
duration too long (429 with QuotaInfos: wait > 0 or < 0), or no GPU (503). The shim (SHIM, run before app.py) sets
torch.version.cuda, which spaces/zero/torch/static.py reads at import, gives torch._C the _cuda_init that
spaces/zero/torch/patching.py saves at import (the CPU build has none), and turns the two CUDA calls its worker makes before
the decorated function runs (patching.py: init() moves a tensor to CUDA, move() synchronizes) into no-ops.
Everything else is the real package in its ZeroGPU mode: the fork per call, its torch emulation in the main process (which
raises on any CUDA initialisation there), the request context and the quota calls."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SHIM = """\
import os, runpy, sys, torch
torch.version.cuda = "12.8"
torch.Tensor.cuda = lambda self, *args, **kwargs: self
torch.cuda.synchronize = lambda *args, **kwargs: None
torch.cuda._is_in_bad_fork = bool  # the CPU build's is a lambda, which spaces cannot send to its fork check; bool() is False
if not hasattr(torch._C, "_cuda_init"):
    torch._C._cuda_init = lambda: None
if os.environ.get("STANDIN_GPU_MODEL"):  # the GPU spaces reads from the NVIDIA driver (its configs.json: duration_factor)
    from spaces.zero import config
    config._read_gpu_information = lambda: "Model: " + os.environ["STANDIN_GPU_MODEL"]
    config.get_config.cache_clear()  # read (as an H200's) when spaces was imported; its client reads it again
sys.argv = ["app.py"]
runpy.run_path("app.py", run_name="__main__")
"""
SCHEDULE = {"idle": False, "nvidiaIndex": 0, "nvidiaUUID": "GPU-standin", "allowToken": "standin-token"}
BLACKWELL = "NVIDIA RTX PRO 6000 Blackwell Server Edition"  # spaces/zero/configs.json: duration_factor 1.5
QUOTA_LEFT_S, QUOTA_WAIT_S = 30, 1800  # what a "quota" answer says is left, and when to try again (0:30:00)
QUEUE_PINGS, PING_S = 4, 0.5  # a "queue" answer: this many pings this far apart, then the GPU


class ControlEndpoint:
    """The recorded calls: (path, {param: value}) in arrival order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.schedule = "gpu"  # the next /schedule answers: "gpu", "queue", "quota", "illegal" or "unavailable"

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.calls]

    def params(self, path: str) -> list[dict[str, str]]:
        with self.lock:
            return [params for p, params in self.calls if p == path]


@contextmanager
def control_endpoint() -> Iterator[tuple[str, ControlEndpoint]]:
    """Serve the stand-in on a free 127.0.0.1 port: yields (its URL, for SPACES_ZERO_DEVICE_API_URL; the record)."""
    record = ControlEndpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            with record.lock:
                record.calls.append((url.path, {k: v[0] for k, v in parse_qs(url.query).items()}))
            answer = record.schedule if url.path == "/schedule" else "ok"
            if answer == "queue":
                return self.queue()
            status, body = {"gpu": (200, SCHEDULE), "ok": (200, {}),
                            "quota": (429, {"left": QUOTA_LEFT_S, "wait": QUOTA_WAIT_S}),
                            "illegal": (429, {"left": QUOTA_LEFT_S, "wait": -1}), "unavailable": (503, {})}[answer]
            self.send_response(status if url.path in ("/startup-report", "/schedule", "/allow", "/release") else 404)
            data = json.dumps(body).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def queue(self) -> None:
            """Server-sent events as spaces/zero/api.py's sse_parse reads them, one event a write."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for _ in range(QUEUE_PINGS):
                self.wfile.write(b"event: ping\n\n")
                self.wfile.flush()
                time.sleep(PING_S)
            self.wfile.write(f"event: succeeded\ndata: {json.dumps(SCHEDULE)}\n\n".encode())
            self.wfile.flush()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", record
    finally:
        server.shutdown()
        server.server_close()
