"""Each role holds only its own weights: an expert rank's resident memory follows its slot
count, and an attention worker holds no routed expert. The tiny models are too small to show
it in /proc/<pid>/status (RssAnon), so this runs the `small` qwen2_moe preset (bf16, ~1.9 GB)."""
import re

from conftest import Server, base_args, complete, gen_model, role_pids, CLUSTER_SETS


def rss_bytes(pid: int, field: str) -> int:
    """VmRSS, RssAnon or RssFile of /proc/<pid>/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def test_expert_rank_rss_follows_slots_and_attention_holds_no_experts(cache_dir, models_dir):
    model = gen_model(models_dir / "small-qwen2_moe", "qwen2_moe", preset="small", dtype="bf16")
    args = [a if a != "model.dtype=f32" else "model.dtype=bf16" for a in base_args()]
    args = [a if a != "kv_cache.num_blocks=512" else "kv_cache.num_blocks=64" for a in args]
    cluster = Server(cache_dir,
                     ["--model", str(model), "--local-cluster", "--attention-workers", "1",
                      "--expert-ranks", "2", *CLUSTER_SETS],
                     base_args=args, start_timeout=120, health_timeout=180,
                     ready_line=r"local cluster ready on")
    try:
        assert complete(cluster.url, "Hello", max_tokens=2, timeout=120).status_code == 200
        pids = role_pids(cluster)
        log = cluster.log()
        # Attention worker: no routed expert loaded, and its weights are a small part.
        m = re.search(r"attention\[0\] .*routed_experts_loaded=(\d+) weight_bytes=(\d+) "
                      r"kv_cache_bytes=(\d+)", log)
        assert m, log[-3000:]
        assert int(m.group(1)) == 0
        attention_weights, kv_bytes = int(m.group(2)), int(m.group(3))
        slots = {}
        for rank in (0, 1):
            e = re.search(rf"expert\[{rank}\] .*placement prepared epoch=\d+ slots=(\d+) "
                          rf"bytes=(\d+)", log)
            assert e, log[-3000:]
            slots[rank] = (int(e.group(1)), int(e.group(2)))
        expert_total = sum(b for _, b in slots.values())
        # Slot bytes are the same per slot on both ranks; they hold every expert between them.
        assert slots[0][1] / slots[0][0] == slots[1][1] / slots[1][0]
        assert attention_weights < expert_total / 2, (attention_weights, expert_total)

        # Private memory (RssAnon): what the role owns. The checkpoint's pages the role has
        # mapped and read (RssFile) are the kernel's page cache, shared between the processes
        # reading the file and dropped under memory pressure; they are printed, not bounded.
        mib = 1 << 20
        roles = [name for name in pids if name.startswith(("expert", "attention"))]
        rss = {name: rss_bytes(pids[name], "RssAnon") for name in roles}
        print({k: f"RssAnon {v / mib:.0f} MiB, RssFile "
                  f"{rss_bytes(pids[k], 'RssFile') / mib:.0f} MiB" for k, v in rss.items()},
              {f"expert[{r}] slot bytes": f"{b / mib:.0f} MiB" for r, (_, b) in slots.items()},
              f"attention weights {attention_weights / mib:.0f} MiB")
        for rank, (_, nbytes) in slots.items():
            got = rss[f"expert[{rank}]"]
            # Resident: its slots, plus the process (threads, gRPC, allocator), nothing more.
            assert got >= 0.9 * nbytes, f"expert[{rank}] RSS {got} < slots {nbytes}"
            assert got <= nbytes + 400 * mib, f"expert[{rank}] RSS {got} >> slots {nbytes}"
        got = rss["attention[0]"]
        assert got <= attention_weights + kv_bytes + 400 * mib, (got, attention_weights)
        assert got < expert_total / 2, f"attention RSS {got} vs routed experts {expert_total}"
    finally:
        assert cluster.stop() == 0, cluster.log()[-3000:]
