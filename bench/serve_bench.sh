#!/usr/bin/env bash
# Serving benchmark: `moe-serve serve` on the qwen2_moe `small` model (bf16) driven by
# `moe-serve bench` at several concurrencies, reported against the targets of bench/README.md
# ("Serving benchmark"). Stores bench/results/serve_bench.json (and serve_bench-<date>.json).
#
#   bench/serve_bench.sh                      # build-load/moe-serve, concurrency 1 8 32 64
#   BIN=build/moe-serve CONCURRENCIES="1 32" bench/serve_bench.sh
#
# Environment: BIN (moe-serve binary), SOURCE_COMMIT (recorded as the commit; default HEAD),
# MODEL_DIR (generated once when missing), OUT (result
# file), CONCURRENCIES, INPUT_LEN (128), OUTPUT_LEN (64), PROMPTS_PER_SLOT (3: num-prompts =
# 3 x concurrency, at least 4), MAX_DURATION_S (per run, 300), REALTIME (1, the default: the
# server under `chrt -f 10` as bench/run_machine_limits.sh does on a shared machine, and the
# load generator one priority above it, `chrt -f 11`, so that it stands for clients on other
# machines and is never starved by the server's compute threads, and the server's HTTP threads
# at `chrt -f 12` (HTTP_PRIORITY=0 leaves them at 10); 0: normal scheduling).
#
# Everything runs on 127.0.0.1 and stops by itself: the server gets SIGTERM when the script
# exits and runs under `timeout` (SERVER_TIMEOUT_S, default 1800) in any case; every bench run
# is bounded by --num-prompts and --max-duration-s.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${BIN:-$repo/build-load/moe-serve}"
model_dir="${MODEL_DIR:-$repo/build-load/serve_bench/qwen2_moe-small-bf16}"
out="${OUT:-$repo/bench/results/serve_bench.json}"
concurrencies="${CONCURRENCIES:-1 8 32 64}"
input_len="${INPUT_LEN:-128}"
output_len="${OUTPUT_LEN:-64}"
prompts_per_slot="${PROMPTS_PER_SLOT:-3}"
max_duration="${MAX_DURATION_S:-300}"
server_timeout="${SERVER_TIMEOUT_S:-1800}"
python="${PYTHON:-python3}"
rt=()
rt_client=()
if [ "${REALTIME:-1}" = 1 ]; then rt=(chrt "-${RT_POLICY:-f}" 10); rt_client=(chrt -f 11); fi

work="$(mktemp -d /tmp/serve_bench.XXXXXX)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

[ -x "$bin" ] || { echo "no moe-serve binary at $bin (set BIN)" >&2; exit 1; }
if [ ! -f "$model_dir/config.json" ]; then
  echo "generating the qwen2_moe small bf16 model in $model_dir"
  "$bin" gen-model --arch qwen2_moe --preset small --dtype bf16 --out "$model_dir"
fi

# 64 sequences of 128 + 64 tokens need 64 x 12 = 768 blocks of 16; 1024 leave headroom.
server_args=(serve --model "$model_dir" --port 0
  --set model.dtype=bf16 --set model.max_model_len=1024 --set threads=0
  --set batching.max_num_seqs=64 --set kv_cache.block_size=16 --set kv_cache.num_blocks=1024)
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); starting ${rt[*]} $bin ${server_args[*]}"
"${rt[@]}" timeout --signal=TERM "$server_timeout" "$bin" "${server_args[@]}" \
  2> "$work/server.log" &
server_pid=$!  # the `timeout` process; moe-serve is its child (below)

port=""
for _ in $(seq 1 600); do
  port="$(sed -n 's/.*serving .* on http:\/\/[0-9.]*:\([0-9]*\).*/\1/p' "$work/server.log" | head -1)"
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.2
done
[ -n "$port" ] || { echo "server did not start in 120 s" >&2; cat "$work/server.log" >&2; exit 1; }
url="http://127.0.0.1:$port"
for _ in $(seq 1 300); do
  curl -sf "$url/health" > /dev/null && break
  sleep 0.2
done
moe_pid="$(pgrep -P "$server_pid" | head -1)"
echo "server on $url (pid $moe_pid)"

# CPU time in jiffies: the whole machine's busy time, then each thread of the server.
snapshot() {
  awk '/^cpu / { print "machine", $2+$3+$4+$7+$8+$9 }' /proc/stat
  for f in /proc/"$moe_pid"/task/*/stat; do
    awk -v tid="$(basename "$(dirname "$f")")" '{ print tid, $14+$15 }' "$f" 2>/dev/null || true
  done
}

# Warm-up: first-touch of the weights and the kernels' scratch; not recorded.
"${rt_client[@]}" "$bin" bench --url "$url" --num-prompts 4 --concurrency 4 --input-len "$input_len" \
  --output-len 8 --max-duration-s 120 > "$work/warmup.txt"

# Under SCHED_FIFO the compute threads (the engine thread and the thread pool's worker) never
# yield a core during a step, so cpp-httplib's listener and handler threads at the same priority
# would wait for seconds: tokens reach the client in bursts and the listen queue (backlog 5)
# overflows, which resets connections (see bench/README.md, "Serving benchmark"). The HTTP
# threads are light, so they go one priority above the compute threads, as an idle machine's
# scheduler would favour them. Compute threads: the two busiest after the warm-up.
if [ "${REALTIME:-1}" = 1 ] && [ "${HTTP_PRIORITY:-1}" = 1 ]; then
  compute_tids="$(for f in /proc/"$moe_pid"/task/*/stat; do
      awk -v tid="$(basename "$(dirname "$f")")" '{ print $14+$15, tid }' "$f"; done |
    sort -rn | head -2 | awk '{ print $2 }')"
  raised=0
  for t in /proc/"$moe_pid"/task/*; do
    tid="$(basename "$t")"
    if ! grep -qx "$tid" <<< "$compute_tids"; then
      chrt -f -p 12 "$tid" > /dev/null && raised=$((raised + 1))
    fi
  done
  echo "compute threads $(echo $compute_tids) stay at FIFO 10; $raised other threads at FIFO 12"
fi

runs=()
for c in $concurrencies; do
  n=$((c * prompts_per_slot)); [ "$n" -lt 4 ] && n=4
  snapshot > "$work/c$c.cpu_before"
  t0="$(date +%s.%N)"
  load="$(cut -d' ' -f1 /proc/loadavg)"
  echo "concurrency $c: $n prompts (load $load)"
  # Exit status 1 means some request failed; the JSON records it and the summary reports it.
  "${rt_client[@]}" "$bin" bench --url "$url" --num-prompts "$n" --concurrency "$c" \
    --input-len "$input_len" --output-len "$output_len" --seed "$c" \
    --max-duration-s "$max_duration" --json "$work/c$c.json" > "$work/c$c.txt" || true
  cat "$work/c$c.txt"
  t1="$(date +%s.%N)"
  snapshot > "$work/c$c.cpu_after"
  echo "$load $t0 $t1 $(getconf CLK_TCK)" > "$work/c$c.cpu_meta"
  runs+=("$c")
done

kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=""

"$python" - "$work" "$model_dir" "$out" "$repo" "${REALTIME:-1}" "${runs[@]}" <<'EOF'
import glob, json, os, struct, sys, datetime, subprocess
work, model_dir, out, repo, realtime, *cs = sys.argv[1:]
cs = [int(c) for c in cs]

def weight_bytes(d):
    total = 0
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with open(os.path.join(d, f), "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            total += sum(v["data_offsets"][1] - v["data_offsets"][0]
                         for k, v in header.items() if k != "__metadata__")
    return total

limits = json.load(open(os.path.join(repo, "bench/results/machine_limits.json")))["limits"]
bw = limits["read_bw_all_cores_gbs"] * 1e9
wbytes = weight_bytes(model_dir)
runs = {}
def read_ticks(path):
    return {k: int(v) for k, v in (line.split() for line in open(path))}

for c in cs:
    r = json.load(open(os.path.join(work, f"c{c}.json")))
    load, t0, t1, hz = open(os.path.join(work, f"c{c}.cpu_meta")).read().split()
    wall = float(t1) - float(t0)
    before = read_ticks(os.path.join(work, f"c{c}.cpu_before"))
    after = read_ticks(os.path.join(work, f"c{c}.cpu_after"))
    threads = sorted(((after[t] - before.get(t, 0)) / float(hz) for t in after
                      if t != "machine"), reverse=True)
    # The two busiest threads are the compute threads (the engine thread, which runs the
    # forward pass, and the thread pool's worker); the rest are cpp-httplib's listener and
    # handlers (HTTP, JSON, SSE writes).
    compute = sum(threads[:2])
    other = sum(threads[2:])
    r["cpu"] = {"load_1m_before": float(load), "wall_s": wall,
                "machine_busy_cpus": (after["machine"] - before["machine"]) / float(hz) / wall,
                "server_cpus": (compute + other) / wall, "compute_threads_cpu_s": compute,
                "other_threads_cpu_s": other,
                "other_processes_cpus": ((after["machine"] - before["machine"]) / float(hz)
                                         - compute - other) / wall}
    runs[c] = r

# The forward pass alone at the same batch (moe-bench-model decode, same machine), if stored.
model_bench = {}
for path in sorted(glob.glob(os.path.join(repo, "bench/results/model_bench-*.json")))[-1:]:
    for d in json.load(open(path))["results"].get("decode", []):
        model_bench[d["batch"]] = {"file": os.path.basename(path),
                                   "ms_per_step_median": d["ms_per_step_median"],
                                   "tokens_per_s": d["tokens_per_s"]}

def run_summary(c):
    r = runs[c]
    m = r.get("server_metrics") or {}
    s = {"concurrency": c, "num_prompts": r["config"]["num_prompts"],
         "completed": r["completed"], "failed": r["failed"], "duration_s": r["duration_s"],
         "output_tok_s": r["output_throughput"], "total_tok_s": r["total_token_throughput"],
         "ttft_p50_ms": r["ttft_ms"]["p50"], "ttft_p99_ms": r["ttft_ms"]["p99"],
         "tpot_mean_ms": r["tpot_ms"]["mean"], "tpot_p50_ms": r["tpot_ms"]["p50"],
         "tpot_p99_ms": r["tpot_ms"]["p99"], "itl_p50_ms": r["itl_ms"]["p50"],
         "itl_p99_ms": r["itl_ms"]["p99"], "e2el_p50_ms": r["e2el_ms"]["p50"],
         # Decode-phase throughput: c sequences advance one token per TPOT.
         "decode_tok_s": c / (r["tpot_ms"]["mean"] / 1e3) if r["tpot_ms"]["mean"] else None,
         "load_1m_before": r["cpu"]["load_1m_before"],
         "other_processes_cpus": r["cpu"]["other_processes_cpus"],
         "server_cpus": r["cpu"]["server_cpus"]}
    if "step_mean_s" in m:
        s["server_steps"] = m["steps"]
        s["server_step_mean_ms"] = m["step_mean_s"] * 1e3
        s["server_step_p50_ms"] = m.get("step_p50_s", 0) * 1e3
        s["server_seqs_per_step"] = m.get("seqs_per_step")
        # Server overhead, two parts. (1) The engine thread outside worker steps (scheduling,
        # detokenizing, stop checks, handing tokens to the streams): wall time of the run not
        # covered by moe_step_duration_seconds. (2) CPU the HTTP threads (JSON, SSE writes)
        # took from the two cores the forward pass runs on, relative to the compute threads.
        busy = m["step_busy_s"] / r["duration_s"] if r["duration_s"] else 1.0
        s["engine_idle_fraction"] = max(0.0, 1 - busy)
        s["http_cpu_fraction"] = (r["cpu"]["other_threads_cpu_s"] /
                                  r["cpu"]["compute_threads_cpu_s"])
        s["overhead_fraction"] = s["engine_idle_fraction"] + s["http_cpu_fraction"]
    if c in model_bench:
        mb = model_bench[c]
        s["model_bench_step_ms"] = mb["ms_per_step_median"]
        s["model_bench_tok_s"] = mb["tokens_per_s"]
        # Client TPOT against the bare forward pass at the same batch (a different process and
        # time, so only a cross-check; prefill chunks of new requests also land in TPOT).
        s["tpot_p50_over_model_step"] = r["tpot_ms"]["p50"] / mb["ms_per_step_median"]
    return s

summary = [run_summary(c) for c in cs]
by_c = {s["concurrency"]: s for s in summary}
targets = {}
if 32 in by_c:
    limit32 = 32 * bw / wbytes
    targets["c32_fraction_of_bandwidth_limit"] = {
        "computation": (f"limit = 32 tokens/step x {bw/1e9:.1f} GB/s / {wbytes/1e9:.3f} GB "
                        f"(all weights read once per step) = {limit32:.0f} tok/s"),
        "limit_tok_s": limit32, "measured_tok_s": by_c[32]["output_tok_s"],
        "fraction": by_c[32]["output_tok_s"] / limit32, "target": 0.45,
        "met": by_c[32]["output_tok_s"] / limit32 >= 0.45}
    if 1 in by_c:
        ratio = by_c[32]["output_tok_s"] / by_c[1]["output_tok_s"]
        targets["c32_over_c1"] = {"ratio": ratio, "target": 4.0, "met": ratio >= 4.0}
for s in summary:
    c = s["concurrency"]
    ratio = s["tpot_p99_ms"] / s["tpot_p50_ms"] if s["tpot_p50_ms"] else None
    targets[f"c{c}_tpot_p99_over_p50"] = {"ratio": ratio, "target": "< 2",
                                           "met": ratio is not None and ratio < 2}
    if "overhead_fraction" in s:
        targets[f"c{c}_server_overhead"] = {"fraction": s["overhead_fraction"], "target": "< 0.05",
                                            "met": s["overhead_fraction"] < 0.05}
# The commit the binary was built from: SOURCE_COMMIT when the binary is not built from this
# checkout's HEAD (e.g. from `git archive` of a commit while the tree has other work in it).
commit = os.environ.get("SOURCE_COMMIT") or subprocess.run(
    ["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
record = {"name": "serve_bench", "date": datetime.datetime.utcnow().strftime("%Y-%m-%d"),
          "commit": commit, "machine": runs[cs[0]].get("machine"),
          "scheduling": (("SCHED_FIFO 10 (server compute threads), 11 (load generator), "
                          + ("12 (server HTTP threads)" if os.environ.get("HTTP_PRIORITY", "1") == "1"
                             else "10 (server HTTP threads)"))
                         if realtime == "1" else "normal"),
          "model": {"dir": os.path.basename(model_dir.rstrip("/")), "arch": "qwen2_moe",
                    "preset": "small", "dtype": "bf16", "weight_bytes": wbytes},
          "limits": {"read_bw_all_cores_gbs": limits["read_bw_all_cores_gbs"]},
          "summary": summary, "targets": targets, "runs": {str(c): runs[c] for c in cs}}
os.makedirs(os.path.dirname(out), exist_ok=True)
for path in (out, out.replace(".json", f"-{record['date']}.json")):
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
print(f"stored {out}")
print(f"{'conc':>4} {'ok':>4} {'out tok/s':>9} {'decode':>7} {'TTFT p50/p99 ms':>17} "
      f"{'TPOT p50/p99 ms':>17} {'step ms':>8} {'seqs':>5} {'idle':>6} {'http':>6} {'others':>6}")
for s in summary:
    print(f"{s['concurrency']:>4} {s['completed']:>4} {s['output_tok_s']:>9.1f} "
          f"{s['decode_tok_s'] or 0:>7.1f} {s['ttft_p50_ms']:>8.0f}/{s['ttft_p99_ms']:<8.0f} "
          f"{s['tpot_p50_ms']:>8.1f}/{s['tpot_p99_ms']:<8.1f} "
          f"{s.get('server_step_mean_ms', 0):>8.1f} {s.get('server_seqs_per_step') or 0:>5.1f} "
          f"{100 * s.get('engine_idle_fraction', 0):>5.1f}% {100 * s.get('http_cpu_fraction', 0):>5.1f}% "
          f"{s['other_processes_cpus']:>6.2f}")
for k, v in targets.items():
    print(f"{k}: {'met' if v['met'] else 'NOT met'} "
          f"{ {kk: vv for kk, vv in v.items() if kk not in ('met', 'computation')} }")
if "c32_fraction_of_bandwidth_limit" in targets:
    print(targets["c32_fraction_of_bandwidth_limit"]["computation"])
EOF
