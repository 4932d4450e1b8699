"""Running `moe-serve` processes in black-box tests.

Server starts `moe-serve serve` (or any other argument list, e.g. `serve --local-cluster`)
in a session of its own on ports the kernel picks (--port 0 --grpc-port 0), reads the ports
from the frontend's log line "serving ... on http://HOST:PORT grpc_port=PORT", waits for
/health, and stop() ends the whole process group (SIGTERM, then SIGKILL). alarm_timeout
bounds a test with SIGALRM.
"""
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]


def moe_serve_bin() -> str:
    env = os.environ.get("MOE_SERVE_BIN")
    if env:
        return env
    for build in ("build-server", "build-cluster", "build"):
        path = REPO / build / "moe-serve"
        if path.exists():
            return str(path)
    pytest.skip("moe-serve binary not found (set MOE_SERVE_BIN)")


class Server:
    """A running `moe-serve serve` process (with --local-cluster: the supervisor and its roles)."""

    def __init__(self, cache_dir: Path, extra_args=(), base_args=None, start_timeout=60,
                 health_timeout=60, wait_healthy=True, ready_line=None):
        """ready_line: a regex; once healthy, also wait for a log line matching it (the local
        cluster's supervisor logs "local cluster ready" after its own /health check)."""
        self.log_lines = []
        self.port = None
        self.grpc_port = None
        self._ready = threading.Event()
        if base_args is None:
            base_args = ["--set", "kv_cache.num_blocks=2048", "--set", "model.dtype=f32",
                         "--set", "threads=2"]
        args = [moe_serve_bin(), "serve", "--port", "0", "--grpc-port", "0",
                "--cache-dir", str(cache_dir), *base_args, *extra_args]
        # A session of its own: stop() reaches every process the server started.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._ready.wait(start_timeout):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log_lines))
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        if not wait_healthy:
            return
        deadline = time.time() + health_timeout
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200 and (
                        ready_line is None or
                        any(re.search(ready_line, line) for line in list(self.log_lines))):
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server never became healthy:\n" + "".join(self.log_lines))

    def _read_log(self):
        for line in self.proc.stderr:
            self.log_lines.append(line)
            m = re.search(r"serving \S+ on http://[\d.]+:(\d+)", line)
            if m and not self._ready.is_set():
                g = re.search(r"grpc_port=(\d+)", line)
                self.grpc_port = int(g.group(1)) if g else None
                self.port = int(m.group(1))
                self._ready.set()

    def log(self) -> str:
        return "".join(self.log_lines)

    def stop(self, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the session (roles of a local cluster, if any).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def alarm_timeout(seconds: int):
    """Raises TimeoutError in the test when it runs longer than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"test exceeded {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
