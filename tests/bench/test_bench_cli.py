"""End-to-end test of `moe-serve bench` against a real `moe-serve serve` on the tiny model.

Checks counts, not timings: exit status, completed requests, the exact number of output
tokens (ignore_eos), the concurrency bound, the hard duration bound and the loopback rule.
The server fixture (tests/server/conftest.py) binds 127.0.0.1 on a free port and stops the
process at the end.
"""
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("server_fixtures",
                                               REPO / "tests" / "server" / "conftest.py")
server_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(server_fixtures)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = server_fixtures.Server(tmp_path_factory.mktemp("moe-serve-cache"))
    yield s
    assert s.stop() == 0, "".join(s.log_lines[-20:])


def run_bench(args, timeout=120):
    return subprocess.run([server_fixtures.moe_serve_bin(), "bench", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_fixed_concurrency_exact_counts(server, tmp_path):
    out = tmp_path / "bench.json"
    p = run_bench(["--url", server.url, "--num-prompts", "8", "--concurrency", "4",
                   "--input-len", "16", "--output-len", "8", "--seed", "1",
                   "--max-duration-s", "100", "--json", str(out)])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Successful requests:" in p.stdout and "Mean TPOT (ms):" in p.stdout, p.stdout
    r = json.loads(out.read_text())
    assert r["completed"] == 8, r
    assert r["failed"] == 0 and r["cancelled"] == 0 and r["not_sent"] == 0, r
    assert r["total_output_tokens"] == 8 * 8, r
    assert r["total_input_tokens"] == 8 * 16, r  # token-id prompts: exact input length
    assert 1 <= r["max_in_flight"] <= 4, r
    assert r["ttft_ms"]["count"] == 8 and r["tpot_ms"]["count"] == 8, r
    assert r["ttft_ms"]["p50"] > 0 and r["e2el_ms"]["p99"] >= r["e2el_ms"]["p50"], r
    assert r["output_throughput"] > 0, r
    # The server's own step times, from /metrics before and after the run.
    assert r["server_metrics"]["steps"] > 0, r["server_metrics"]
    assert r["server_metrics"]["generation_tokens"] >= 64, r["server_metrics"]


def test_poisson_text_prompts_with_range(server, tmp_path):
    out = tmp_path / "bench.json"
    p = run_bench(["--url", server.url, "--num-prompts", "6", "--request-rate", "50",
                   "--prompt-kind", "text", "--input-len", "12", "--output-len", "6",
                   "--range-ratio", "0.5", "--seed", "2", "--json", str(out)])
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["completed"] == 6 and r["failed"] == 0, r
    assert 6 * 3 <= r["total_output_tokens"] <= 6 * 9, r


def test_chat_endpoint(server, tmp_path):
    out = tmp_path / "bench.json"
    p = run_bench(["--url", server.url, "--endpoint", "/v1/chat/completions",
                   "--num-prompts", "2", "--concurrency", "2", "--input-len", "8",
                   "--output-len", "5", "--json", str(out)])
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["completed"] == 2 and r["total_output_tokens"] == 10, r


def test_max_duration_cancels_and_stops(server, tmp_path):
    out = tmp_path / "bench.json"
    start = time.monotonic()
    p = run_bench(["--url", server.url, "--num-prompts", "64", "--concurrency", "4",
                   "--input-len", "16", "--output-len", "300", "--max-duration-s", "0.5",
                   "--json", str(out)])
    elapsed = time.monotonic() - start
    assert elapsed < 30, f"bench took {elapsed:.1f} s with --max-duration-s 0.5"
    r = json.loads(out.read_text())
    # Cut requests are not failures; a run that completed nothing exits 1 (nothing measured).
    assert p.returncode == (0 if r["completed"] > 0 else 1), p.stdout + p.stderr
    assert r["hit_max_duration"] is True, r
    assert r["completed"] < 64 and r["cancelled"] + r["not_sent"] > 0, r
    assert r["completed"] + r["cancelled"] + r["not_sent"] + r["failed"] == 64, r
    assert "max-duration-s" in p.stderr
    # The cut connections cancelled their requests; the server drains and stays healthy.
    deadline = time.time() + 30
    while time.time() < deadline:
        m = requests.get(server.url + "/metrics", timeout=5).text
        running = [l for l in m.splitlines() if l.startswith("moe_num_requests_running ")]
        if running and float(running[0].split()[1]) == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("requests still running 30 s after the bench was cut:\n" + m)
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


def test_refuses_non_loopback_without_allow_remote():
    p = run_bench(["--url", "http://192.0.2.1:8000", "--num-prompts", "1"])
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--allow-remote" in p.stderr and "loopback" in p.stderr


def test_refuses_bad_flags():
    p = run_bench(["--concurrency", "1000"])
    assert p.returncode == 2 and "--concurrency" in p.stderr, p.stderr
