#!/usr/bin/env python3
"""Expert parallelism across processes against one process: the `small` qwen2_moe model (bf16)
served by `moe-serve serve` and by `moe-serve serve --local-cluster` (1 attention worker, 2
expert ranks), driven by `moe-serve bench` at concurrency 1 and 32.

For the cluster it also reads the frontend's /metrics before and after each run:
  moe_worker_forward_seconds            the attention worker's model forward per step
  moe_worker_dispatch_combine_seconds   the part of it spent in dispatch + combine (sending
                                        rows, waiting for the expert ranks, summing combines)
  moe_worker_dispatch_bytes_total       dispatch + combine frame bytes
  moe_iteration_tokens                  tokens computed per step
and reports dispatch+combine as a share of forward time and bytes per token per MoE layer.

  python3 bench/cluster_bench.py [--bin build-cluster/moe-serve] [--model DIR]
      [--out bench/results/cluster-<date>.json]

Everything binds 127.0.0.1, every server runs in a session of its own and is stopped (SIGTERM,
then SIGKILL of the session) when a run ends; every bench run is bounded by --num-prompts and
--max-duration-s.
"""
import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def metrics(url):
    """name{labels} -> value, summed over labels."""
    out = {}
    for line in get(url + "/metrics")[1].splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        name = key.split("{", 1)[0]
        if name.endswith("_bucket"):
            continue
        out[name] = out.get(name, 0.0) + float(value)
    return out


class Server:
    def __init__(self, args, ready_line, timeout=600):
        self.lines = []
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.lines[-30:]))
            if self.port and any(re.search(ready_line, l) for l in list(self.lines)):
                try:
                    if get(f"http://127.0.0.1:{self.port}/health")[0] == 200:
                        break
                except OSError:
                    pass
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError("server not ready:\n" + "".join(self.lines[-30:]))
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"serving \S+ on http://[\d.]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))

    def rss(self):
        """Resident memory of the server's processes (RssAnon, RssFile), by role."""
        out = {}
        pids = {"serve": self.proc.pid}
        for line in self.lines:
            m = re.search(r"started (\S+) pid=(\d+)", line)
            if m:
                pids[m.group(1)] = int(m.group(2))
        for name, pid in pids.items():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = dict(re.findall(r"^(RssAnon|RssFile):\s+(\d+) kB", status, re.M))
            out[name] = {k: int(v) * 1024 for k, v in fields.items()}
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)


RT_SERVER, RT_CLIENT = [], []


def run_bench(binary, url, concurrency, num_prompts, input_len, output_len, workdir):
    out = workdir / f"bench-{concurrency}.json"
    log = workdir / f"bench-{concurrency}.log"
    with open(log, "w") as f:
        rc = subprocess.run([*RT_CLIENT, binary, "bench", "--url", url, "--concurrency",
                             str(concurrency), "--num-prompts", str(num_prompts), "--input-len",
                             str(input_len), "--output-len", str(output_len),
                             "--max-duration-s", "900", "--json", str(out)],
                            stdout=f, stderr=subprocess.STDOUT, timeout=1000).returncode
    if not out.exists():
        raise RuntimeError(f"bench failed (exit {rc}):\n{log.read_text()[-3000:]}")
    result = json.loads(out.read_text())
    result["exit_status"] = rc
    return result


def summarize(bench):
    """The load generator's numbers we report (whatever its JSON calls them)."""
    keep = {}
    for key in ("output_throughput", "request_throughput", "total_token_throughput",
                "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "completed", "failed", "duration_s"):
        for section in (bench, bench.get("results", {}), bench.get("summary", {})):
            if isinstance(section, dict) and key in section:
                keep[key] = section[key]
                break
    keep["raw"] = bench
    return keep


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", default=str(REPO / "build-cluster/moe-serve"))
    p.add_argument("--model", default="/tmp/moe-bench-models/qwen2_moe-small-bf16")
    p.add_argument("--out", default=str(REPO / "bench/results" /
                                        f"cluster-{datetime.date.today().isoformat()}.json"))
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the single process")
    p.add_argument("--cluster-threads", type=int, default=1,
                   help="CPU threads of each cluster process (attention worker, expert ranks)")
    p.add_argument("--concurrencies", default="1,32")
    p.add_argument("--realtime", action="store_true",
                   help="servers under chrt -f 10 and the load generator under chrt -f 11. Not "
                        "for the cluster on 2 cores: FIFO threads of three compute processes "
                        "that spin between loops starve each other")
    a = p.parse_args()
    if a.realtime:
        RT_SERVER.extend(["chrt", "-f", "10"])
        RT_CLIENT.extend(["chrt", "-f", "11"])
    model = Path(a.model)
    if not (model / "config.json").exists():
        subprocess.run([a.bin, "gen-model", "--arch", "qwen2_moe", "--preset", "small", "--dtype",
                        "bf16", "--out", str(model)], check=True, timeout=600)
    config = json.loads((model / "config.json").read_text())
    num_layers = config["num_hidden_layers"]
    sparse_step = config.get("decoder_sparse_step", 1) or 1
    mlp_only = set(config.get("mlp_only_layers", []))
    moe_layers = sum(1 for l in range(num_layers)
                     if l not in mlp_only and (l + 1) % sparse_step == 0)
    workdir = Path(f"/tmp/cluster_bench.{os.getpid()}")
    workdir.mkdir(exist_ok=True)
    common = ["--model", str(model), "--port", "0", "--grpc-port", "0",
              "--set", "model.dtype=bf16", "--set", "kv_cache.num_blocks=1024", "--set", "model.max_model_len=512",
              "--set", "batching.max_num_seqs=64"]
    concurrencies = [int(c) for c in a.concurrencies.split(",")]
    results = {"model": str(model), "arch": "qwen2_moe", "preset": "small", "dtype": "bf16",
               "moe_layers": moe_layers, "hidden_size": config["hidden_size"],
               "top_k": config["num_experts_per_tok"], "input_len": a.input_len,
               "output_len": a.output_len, "threads_per_process": a.threads,
               "cpus": os.cpu_count(), "date": datetime.datetime.now().isoformat(),
               "load_average_1m_before": os.getloadavg()[0], "runs": []}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results["commit"] = commit
    results["realtime"] = a.realtime
    results["cluster_threads_per_process"] = a.cluster_threads
    setups = [("single-process",
               [*RT_SERVER, a.bin, "serve", *common, "--set", f"threads={a.threads}"],
               r"serving \S+ on"),
              ("local-cluster 1 attention + 2 expert ranks",
               [*RT_SERVER, a.bin, "serve", *common, "--set", f"threads={a.cluster_threads}",
                "--local-cluster", "--attention-workers", "1", "--expert-ranks", "2"],
               r"local cluster ready on")]
    for name, args, ready in setups:
        server = Server(args, ready)
        try:
            # Warm up (first-touch of weights and scratch buffers).
            run_bench(a.bin, server.url, 4, 4, a.input_len, 8, workdir)
            for c in concurrencies:
                before = metrics(server.url)
                bench = run_bench(a.bin, server.url, c, max(8, 2 * c), a.input_len,
                                  a.output_len, workdir)
                after = metrics(server.url)
                d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                run = {"setup": name, "concurrency": c, "load_average_1m": os.getloadavg()[0],
                       "bench": summarize(bench),
                       "server_step_seconds_mean": d.get("moe_step_duration_seconds_sum", 0) /
                       max(1, d.get("moe_step_duration_seconds_count", 0)),
                       "tokens_computed": d.get("moe_iteration_tokens_sum", 0),
                       "steps": d.get("moe_step_duration_seconds_count", 0)}
                fwd = d.get("moe_worker_forward_seconds_sum", 0.0)
                if fwd > 0:
                    dc = d.get("moe_worker_dispatch_combine_seconds_sum", 0.0)
                    nbytes = d.get("moe_worker_dispatch_bytes_total", 0.0)
                    tokens = max(1.0, run["tokens_computed"])
                    run.update({
                        "worker_forward_seconds_mean": fwd / max(1, d.get(
                            "moe_worker_forward_seconds_count", 0)),
                        "dispatch_combine_seconds_mean": dc / max(1, d.get(
                            "moe_worker_dispatch_combine_seconds_count", 0)),
                        "dispatch_combine_share_of_forward": dc / fwd,
                        "bytes_per_token_per_layer": nbytes / tokens / moe_layers,
                    })
                results["runs"].append(run)
                print(json.dumps({k: v for k, v in run.items() if k != "bench"}), flush=True)
                print("   bench:", json.dumps({k: v for k, v in run["bench"].items()
                                               if k != "raw"}), flush=True)
            results.setdefault("rss_bytes", {})[name] = server.rss()
        finally:
            server.stop()
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    sys.exit(main())
