"""A real Prometheus server (Debian package `prometheus`) scrapes /metrics of a running
moe-serve and stores its series: the target is up and the engine's counters arrive with the
values the server reports.

Prometheus binds a free 127.0.0.1 port, keeps its data in the test's temp dir, scrapes every
second, and is stopped at the end of the test.
"""
import shutil
import socket
import subprocess
import time

import pytest
import requests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(prom_url: str, expr: str):
    r = requests.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_metrics(server, tmp_path):
    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    # Traffic first, so the token counters have values to compare.
    r = requests.post(server.url + "/v1/completions",
                      json={"prompt": [1, 2, 3, 4], "max_tokens": 5, "ignore_eos": True},
                      timeout=60)
    assert r.status_code == 200, r.text
    target = server.url.split("//", 1)[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: moe\n    static_configs:\n"
        f"      - targets: ['{target}']\n")
    port = _free_port()
    prom_url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [prom, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        up = generated = None
        deadline = time.time() + 60
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                up = _query(prom_url, 'up{job="moe"}')
                generated = _query(prom_url, 'moe_generation_tokens_total{job="moe"}')
            except requests.RequestException:
                up = generated = None  # still starting
            if up and up[0]["value"][1] == "1" and generated:
                break
            time.sleep(0.5)
        assert up and up[0]["value"][1] == "1", f"target not up: {up}"
        assert generated, "moe_generation_tokens_total was not scraped"
        assert float(generated[0]["value"][1]) >= 5.0
        # The scrape itself found nothing to complain about.
        targets = requests.get(prom_url + "/api/v1/targets", timeout=5).json()
        active = targets["data"]["activeTargets"]
        assert active and active[0]["health"] == "up", active
        assert active[0]["lastError"] == "", active[0]["lastError"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
