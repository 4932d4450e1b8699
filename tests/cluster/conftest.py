"""Fixtures of the cluster tests: `moe-serve serve --local-cluster` (and single roles) on the
tiny models of every architecture, against the single-process `moe-serve serve`.

Every process runs in a session of its own and is stopped by its fixture (SIGTERM to the
supervisor, then SIGKILL to the whole group); every test runs under a SIGALRM timeout.
"""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.serve import Server, alarm_timeout, moe_serve_bin  # noqa: E402

TEST_TIMEOUT_S = 150
ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "deepseek_v2", "olmoe"]

# One step per request at a time would hide batching effects; several prompts, sent at once,
# so both attention workers get sequences.
PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "In a hole in the ground there lived",
    "0 1 2 3 4 5",
    "def main():",
    "Hello, my name is",
]
MAX_TOKENS = 12

# Small cluster timeouts: a dead rank is noticed within a second.
CLUSTER_SETS = ["--set", "timeouts.heartbeat_ms=200", "--set", "timeouts.lease_ms=1500",
                "--set", "timeouts.dispatch_timeout_ms=3000",
                "--set", "timeouts.connect_timeout_ms=1000"]


def base_args():
    return ["--set", "kv_cache.num_blocks=512", "--set", "model.dtype=f32",
            "--set", "threads=1", "--set", "model.max_model_len=256"]


def gen_model(out: Path, arch: str, preset="tiny", dtype="f32") -> Path:
    if not (out / "config.json").exists():
        subprocess.run([moe_serve_bin(), "gen-model", "--arch", arch, "--preset", preset,
                        "--dtype", dtype, "--out", str(out)], check=True, timeout=300,
                       stdout=subprocess.DEVNULL)
    return out


def start_reference(cache_dir: Path, model: Path) -> Server:
    return Server(cache_dir, ["--model", str(model)], base_args=base_args())


def start_cluster(cache_dir: Path, model: Path, attention=2, experts=4, redundant=0,
                  extra=()) -> Server:
    return Server(cache_dir,
                  ["--model", str(model), "--local-cluster", "--attention-workers", str(attention),
                   "--expert-ranks", str(experts), "--redundant-slots", str(redundant),
                   *CLUSTER_SETS, *extra],
                  base_args=base_args(), start_timeout=60, health_timeout=90,
                  ready_line=r"local cluster ready on")


def role_pids(server: Server) -> dict:
    """Role name -> pid, from the supervisor's "started expert[1] pid=123" lines."""
    pids = {}
    for line in server.log_lines:
        m = re.search(r"started (\S+) pid=(\d+)", line)
        if m:
            pids[m.group(1)] = int(m.group(2))
    return pids


def complete(url: str, prompt: str, max_tokens=MAX_TOKENS, timeout=60):
    r = requests.post(url + "/v1/completions",
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "logprobs": 1, "ignore_eos": True},
                      timeout=timeout)
    return r


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout: float, interval=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-cluster-cache")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-cluster-models")


@pytest.fixture(autouse=True)
def _timeout():
    with alarm_timeout(TEST_TIMEOUT_S):
        yield
