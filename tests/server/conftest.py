"""Fixtures of the black-box server tests: a real `moe-serve serve` process on the tiny model
(harness/serve.py runs it).

Each server binds 127.0.0.1 on ports the kernel picks (--port 0 --grpc-port 0); the fixture
reads them from the log line "serving ... on http://HOST:PORT grpc_port=PORT", waits for
/health, and stops the process (SIGTERM, then SIGKILL) at the end. Every test runs under a
SIGALRM timeout.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.serve import REPO, Server, alarm_timeout, moe_serve_bin  # noqa: E402,F401

TEST_TIMEOUT_S = 180


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
    with alarm_timeout(TEST_TIMEOUT_S):
        yield
