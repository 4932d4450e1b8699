"""Failures of a cluster: an expert rank killed under a running cluster, and a rank that never
registers. The frontend stays up and says what is wrong."""
import os
import signal
import subprocess
import time

import requests

from conftest import (Server, complete, gen_model, moe_serve_bin, role_pids, start_cluster,
                      wait_for)

DISPATCH_TIMEOUT_S = 3.0  # timeouts.dispatch_timeout_ms of conftest.CLUSTER_SETS


def test_killed_expert_rank_fails_requests_clearly_and_frontend_stays_up(cache_dir, models_dir):
    model = gen_model(models_dir / "qwen3_moe", "qwen3_moe")
    cluster = start_cluster(cache_dir, model, attention=1, experts=2)
    try:
        assert complete(cluster.url, "warm up").status_code == 200
        pid = role_pids(cluster)["expert[1]"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)

        t0 = time.time()
        r = complete(cluster.url, "The quick brown fox")
        elapsed = time.time() - t0
        print(f"request after the kill failed in {elapsed:.3f} s: {r.status_code} {r.text}")
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "expert rank 1" in message, message
        assert elapsed < DISPATCH_TIMEOUT_S, f"took {elapsed:.2f} s"

        # Streaming: the error arrives in the stream.
        s = requests.post(cluster.url + "/v1/completions",
                          json={"prompt": "abc", "max_tokens": 4, "stream": True}, timeout=30)
        assert "expert rank 1" in s.text, s.text

        # The frontend is up: models, metrics; health and /v1/cluster tell why not ready.
        assert requests.get(cluster.url + "/v1/models", timeout=10).status_code == 200
        m = requests.get(cluster.url + "/metrics", timeout=10)
        assert m.status_code == 200 and "moe_engine_step_errors_total" in m.text
        status = wait_for(lambda: (lambda j: j if 1 in j["dead_expert_ranks"] else None)(
            requests.get(cluster.url + "/v1/cluster", timeout=10).json()), timeout=10)
        assert status, "expert rank 1 was never reported dead"
        assert not status["ready"], status
        dead = [x for x in status["ranks"] if x["role"] == "expert" and x["rank"] == 1]
        assert dead and dead[0]["state"] == "dead", status["ranks"]
        assert status["reason"], status
        assert wait_for(lambda: requests.get(cluster.url + "/health", timeout=10).status_code == 503,
                        timeout=10)
        # Still failing clearly, never hanging.
        r = complete(cluster.url, "again")
        assert r.status_code == 503, r.text
        # The supervisor keeps the rest of the cluster running.
        assert cluster.proc.poll() is None
    finally:
        cluster.stop()


def test_rank_that_never_registers_keeps_cluster_not_ready(cache_dir, models_dir, tmp_path):
    """The roles started one by one from a deployment file; expert rank 1 never comes."""
    model = gen_model(models_dir / "qwen3_moe", "qwen3_moe")
    import socket

    def free_port(pair=False):
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if not pair:
                return port
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue

    http, sched, attn = free_port(), free_port(), free_port()
    e0, e1 = free_port(True), free_port(True)
    config = tmp_path / "cluster.yaml"
    config.write_text(f"""
model: {{path: "{model}", dtype: f32, max_model_len: 256}}
threads: 1
server: {{host: 127.0.0.1, http_port: {http}, grpc_port: 0}}
kv_cache: {{num_blocks: 128}}
roles:
  scheduler: {{address: "127.0.0.1:{sched}"}}
  attention_workers: [{{rank: 0, address: "127.0.0.1:{attn}"}}]
  expert_workers:
    - {{rank: 0, address: "127.0.0.1:{e0}"}}
    - {{rank: 1, address: "127.0.0.1:{e1}"}}
timeouts: {{heartbeat_ms: 200, lease_ms: 1500}}
""")
    procs = []
    try:
        for args in (["scheduler", "--startup-timeout-ms", "1000"],
                     ["expert", "--rank", "0"], ["attention", "--rank", "0"], ["frontend"]):
            procs.append(subprocess.Popen([moe_serve_bin(), *args, "--config", str(config)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        url = f"http://127.0.0.1:{http}"

        def cluster_status():
            try:
                j = requests.get(url + "/v1/cluster", timeout=5).json()
            except (requests.ConnectionError, ValueError):
                return None
            return j if "did not register" in j.get("reason", "") else None

        status = wait_for(cluster_status, timeout=30, interval=0.2)
        assert status, "the frontend never reported the missing rank"
        assert status["ready"] is False
        assert status["missing_expert_ranks"] == [1], status
        assert "expert ranks [1]" in status["reason"], status["reason"]
        states = {(x["role"], x["rank"]): x["state"] for x in status["ranks"]}
        assert states[("expert", 0)] == "alive"
        assert states[("expert", 1)] == "missing"
        assert states[("attention", 0)] == "alive"
        assert requests.get(url + "/health", timeout=5).status_code == 503
        r = complete(url, "hello", timeout=30)
        assert r.status_code == 503, r.text
        assert "placement" in r.json()["error"]["message"], r.text
        for p in procs:
            assert p.poll() is None, "a role exited"
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def test_cluster_serves_again_after_replacement_of_a_dead_rank(cache_dir, models_dir):
    """With spare slots the scheduler re-places a dead rank's experts on the survivors; the
    attention worker follows the new epoch and greedy output is what it was."""
    model = gen_model(models_dir / "qwen3_moe", "qwen3_moe")
    cluster = start_cluster(cache_dir, model, attention=1, experts=4, redundant=4)
    try:
        before = complete(cluster.url, "The quick brown fox")
        assert before.status_code == 200, before.text
        epoch = requests.get(cluster.url + "/v1/cluster", timeout=10).json()["placement_epoch"]
        os.kill(role_pids(cluster)["expert[3]"], signal.SIGKILL)

        def replaced():
            j = requests.get(cluster.url + "/v1/cluster", timeout=10).json()
            return j if j["ready"] and j["placement_epoch"] > epoch else None

        status = wait_for(replaced, timeout=20, interval=0.2)
        assert status, "no new placement without the dead rank"
        assert status["dead_expert_ranks"] == [3]
        assert status["placement"]["rank_slots"][3] == 0, status["placement"]
        after = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
            complete(cluster.url, "The quick brown fox")), timeout=10, interval=0.2)
        assert after, "requests kept failing after the re-placement"
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        assert requests.get(cluster.url + "/health", timeout=10).status_code == 200
    finally:
        cluster.stop()
