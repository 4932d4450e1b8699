"""Fixtures of the black-box server tests: a real `moe-serve serve` process on the tiny model.

Each server binds 127.0.0.1 on ports the kernel picks (--port 0 --grpc-port 0); the fixture
reads them from the log line "serving ... on http://HOST:PORT grpc_port=PORT", waits for
/health, and stops the process (SIGTERM, then SIGKILL) at the end. Every test runs under a
SIGALRM timeout.
"""
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
TEST_TIMEOUT_S = 180


def moe_serve_bin() -> str:
    env = os.environ.get("MOE_SERVE_BIN")
    if env:
        return env
    for build in ("build-server", "build"):
        path = REPO / build / "moe-serve"
        if path.exists():
            return str(path)
    pytest.skip("moe-serve binary not found (set MOE_SERVE_BIN)")


class Server:
    """A running `moe-serve serve` process."""

    def __init__(self, cache_dir: Path, extra_args=()):
        self.log_lines = []
        self.port = None
        self.grpc_port = None
        self._ready = threading.Event()
        args = [moe_serve_bin(), "serve", "--port", "0", "--grpc-port", "0",
                "--cache-dir", str(cache_dir),
                "--set", "kv_cache.num_blocks=2048", "--set", "model.dtype=f32",
                "--set", "threads=2", *extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._ready.wait(60):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log_lines))
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server never became healthy:\n" + "".join(self.log_lines))

    def _read_log(self):
        for line in self.proc.stderr:
            self.log_lines.append(line)
            m = re.search(r"serving \S+ on http://[\d.]+:(\d+)", line)
            if m:
                g = re.search(r"grpc_port=(\d+)", line)
                self.grpc_port = int(g.group(1)) if g else None
                self.port = int(m.group(1))
                self._ready.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-serve-cache")


@pytest.fixture(scope="session")
def server(cache_dir):
    s = Server(cache_dir, ["--set", "server.max_body_bytes=1000000"])
    yield s
    assert s.stop() == 0, "".join(s.log_lines[-20:])


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(autouse=True)
def _timeout():
    def expired(signum, frame):
        raise TimeoutError(f"test exceeded {TEST_TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
