"""Concurrency, batch invariance, metrics format and graceful shutdown."""
import concurrent.futures
import json
import re
import signal
import shutil
import socket
import subprocess
import threading
import time

import pytest
import requests

from conftest import Server

MODEL = "tiny"


def metric_value(text, name, labels=""):
    m = re.search(r"^" + re.escape(name + labels) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_64_concurrent_streams(client, server):
    lengths = [4 + (i * 7) % 41 for i in range(64)]  # 4..44 tokens
    barrier = threading.Barrier(64, timeout=60)

    def one(i):
        barrier.wait()
        stream = client.completions.create(
            model=MODEL, prompt=f"Request number {i}: " + "word " * (i % 9), max_tokens=lengths[i],
            temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        token_chunks, finish, usage = 0, None, None
        for chunk in stream:
            if chunk.choices:
                token_chunks += 1
                if chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            if chunk.usage:
                usage = chunk.usage
        return token_chunks, finish, usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for i, (chunks, finish, completion) in enumerate(results):
        assert finish == "length", i
        assert completion == lengths[i], i
        assert chunks == lengths[i], i  # one chunk per token
    text = requests.get(server.url + "/metrics", timeout=10).text
    count = metric_value(text, "moe_iteration_num_seqs_count")
    le16 = metric_value(text, "moe_iteration_num_seqs_bucket", '{le="16"}')
    assert count is not None and le16 is not None
    assert count - le16 > 0, "no step batched more than 16 sequences"


def test_batch_invariance(client):
    prompt = "The batch must not change me"
    alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    barrier = threading.Barrier(32, timeout=60)

    def one(i):
        barrier.wait()
        p = prompt if i == 0 else f"Another prompt {i} " + "x " * i
        return client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(one, range(32)))
    assert texts[0] == alone


def test_seeded_sampling_is_batch_invariant(client):
    kw = dict(model=MODEL, prompt="Seeded in a crowd", max_tokens=16, temperature=1.0,
              seed=77, extra_body={"ignore_eos": True})
    alone = client.completions.create(**kw).choices[0].text
    barrier = threading.Barrier(16, timeout=60)

    def one(i):
        barrier.wait()
        if i == 0:
            return client.completions.create(**kw).choices[0].text
        return client.completions.create(model=MODEL, prompt=f"noise {i}", max_tokens=16,
                                         temperature=1.0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts[0] == alone


def test_promtool_accepts_metrics(server):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    text = requests.get(server.url + "/metrics", timeout=10).text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_graceful_shutdown_aborts_after_drain_timeout(cache_dir):
    s = Server(cache_dir, ["--set", "server.drain_timeout_s=0.2",
                           "--set", "batching.max_num_seqs=2"])
    try:
        started = threading.Barrier(9, timeout=60)
        finishes = []

        def one(i):
            r = requests.post(s.url + "/v1/completions", stream=True, timeout=60,
                              json={"prompt": f"long {i}", "max_tokens": 480,
                                    "ignore_eos": True, "stream": True})
            assert r.status_code == 200
            started.wait()  # every request is admitted (headers came back)
            finish = None
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                        finish = chunk["choices"][0]["finish_reason"]
            finishes.append(finish)

        # 8 long streams on 2 running slots: the later ones wait, so the drain timeout cuts them.
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        started.wait()
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        # Once draining (/health says 503), new work is refused with 503, or the listener is
        # already closed.
        try:
            deadline = time.time() + 5
            while requests.get(s.url + "/health", timeout=5).status_code != 503:
                assert time.time() < deadline, "/health never turned 503 while draining"
                time.sleep(0.01)
            r = requests.post(s.url + "/v1/completions", json={"prompt": "late"}, timeout=5)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == 503
        except requests.ConnectionError:
            pass
        for t in threads:
            t.join(60)
        assert s.proc.wait(30) == 0
        assert time.time() - t0 < 20
        assert len(finishes) == 8
        assert "abort" in finishes, finishes
        assert set(finishes) <= {"abort", "length"}, finishes
    finally:
        s.stop()


def test_client_disconnect_cancels_stream(server):
    def aborted():
        text = requests.get(server.url + "/metrics", timeout=10).text
        return metric_value(text, "moe_request_success_total", '{finished_reason="abort"}') or 0

    before = aborted()
    for i in range(3):
        body = json.dumps({"prompt": f"gone {i}", "max_tokens": 480, "ignore_eos": True,
                           "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            got += sock.recv(4096)
        sock.close()  # the client goes away mid-stream
    deadline = time.time() + 10
    while aborted() < before + 1 and time.time() < deadline:
        time.sleep(0.05)
    assert aborted() >= before + 1
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
