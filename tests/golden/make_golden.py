#!/usr/bin/env python3
"""Regenerates the golden fixtures under tests/golden/<arch>/ from Hugging Face transformers.

For each architecture: `moe-serve gen-model` writes the tiny seeded model into a temporary
directory; transformers loads it (eager attention, CPU) and must find every weight (no key
missing, unexpected or mismatched, nothing left randomly initialised; the fused expert tensors
transformers builds on load are compared with the per-expert checkpoint tensors); the model runs
a fixed prompt and 16 greedy decode steps with a KV cache; the results are stored as safetensors
files that the C++ tests read with moe::model::SafetensorsReader.

Files (see README.md for the tensors and metadata):
  tests/golden/<arch>/golden_f32.safetensors    f32 weights, f32 compute
  tests/golden/<arch>/golden_bf16.safetensors   bf16 weights: f32 compute and bf16 compute

Run through `scripts/setup.sh golden`, or directly:
  .venv/bin/python tests/golden/make_golden.py --moe-serve build/moe-serve [--arch qwen3_moe]
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "deepseek_v2", "olmoe"]
BF16_ARCHS = ["qwen3_moe", "deepseek_v3"]
SEED = 1234
DECODE_STEPS = 16
PROMPT_TEXT = (
    "The router scores every expert and keeps the best few; "
    "def f(x): return x * 2 + 1  # Ça marche!"
)
HERE = os.path.dirname(os.path.abspath(__file__))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gen_model(moe_serve, arch, dtype, out_dir):
    args = ["gen-model", "--arch", arch, "--preset", "tiny", "--dtype", dtype,
            "--seed", str(SEED)]
    subprocess.run([moe_serve, *args, "--out", out_dir], check=True, stdout=subprocess.DEVNULL)
    return args


def load_model(model_dir, dtype):
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"{model_dir}: transformers did not load every weight: {problems}")
    model.eval()
    return model


def check_weights(model, model_dir):
    """Every checkpoint tensor must be in the model, as is or fused into the expert tensors."""
    ckpt = {k: v.float().numpy()
            for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    used = set()
    # Fused experts: "<prefix>.experts.gate_up_proj" [E, 2F, H] and ".experts.down_proj" [E, H, F]
    # (or transposed); the checkpoint has per-expert gate/up/down (Mixtral: w1/w3/w2).
    for key, value in state.items():
        if key.endswith(".experts.gate_up_proj") or key.endswith(".experts.down_proj"):
            prefix = key.rsplit(".experts.", 1)[0]
            candidates = [prefix, prefix.replace(".mlp", ".block_sparse_moe")]
            names = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
            experts = []
            e = 0
            while True:
                found = None
                for p in candidates:
                    for i in range(2):
                        parts = [f"{p}.experts.{e}.{names[w][i]}.weight" for w in ("gate", "up", "down")]
                        if all(n in ckpt for n in parts):
                            found = parts
                if not found:
                    break
                experts.append(found)
                e += 1
            if not experts:
                raise SystemExit(f"{key}: no per-expert checkpoint tensors for it")
            if key.endswith("gate_up_proj"):
                want = np.stack([np.concatenate([ckpt[g], ckpt[u]], axis=0) for g, u, _ in experts])
            else:
                want = np.stack([ckpt[d] for _, _, d in experts])
            if value.shape != want.shape:
                want = want.transpose(0, 2, 1)
            if value.shape != want.shape or not np.array_equal(value, want.astype(np.float32)):
                raise SystemExit(f"{key}: differs from the checkpoint's per-expert tensors")
            for parts in experts:
                used.update(parts)
            continue
        for name in (key, key.replace(".mlp.", ".block_sparse_moe.")):
            if name in ckpt:
                if not np.array_equal(value, ckpt[name].astype(np.float32)):
                    raise SystemExit(f"{key}: differs from checkpoint tensor {name}")
                used.add(name)
                break
    unused = sorted(set(ckpt) - used)
    if unused:
        raise SystemExit(f"{model_dir}: checkpoint tensors not found in the model: {unused[:8]}")


@torch.no_grad()
def run(model, prompt_ids, forced_tokens=None):
    """Prefill, then DECODE_STEPS greedy steps (or the forced tokens) with the KV cache.

    Returns prefill logits [T, V], the generated tokens [S] (token i is the argmax of the
    logits before it: tokens[0] from the prefill's last position), and decode logits [S, V]
    (row i: the logits after feeding tokens[i])."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    prefill = out.logits[0].float()
    cache = out.past_key_values
    tokens, decode = [], []
    next_logits = prefill[-1]
    for i in range(DECODE_STEPS):
        tok = int(forced_tokens[i]) if forced_tokens is not None else int(torch.argmax(next_logits))
        tokens.append(tok)
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_logits = out.logits[0, -1].float()
        decode.append(next_logits)
    return prefill.numpy(), np.array(tokens, dtype=np.int32), torch.stack(decode).numpy()


def prompt_for(model_dir):
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    ids = tok.encode(PROMPT_TEXT, add_special_tokens=True).ids
    if len(ids) < 32:
        raise SystemExit(f"{model_dir}: prompt has only {len(ids)} tokens")
    if tok.decode(ids, skip_special_tokens=True) != PROMPT_TEXT:
        raise SystemExit(f"{model_dir}: tokenizer does not round-trip the prompt")
    return ids


def metadata(arch, args, model_dir, extra):
    md = {
        "arch": arch,
        "gen_model_args": json.dumps(args),
        "model_safetensors_sha256": sha256(os.path.join(model_dir, "model.safetensors")),
        "config_json_sha256": sha256(os.path.join(model_dir, "config.json")),
        "prompt_text": PROMPT_TEXT,
        "decode_steps": str(DECODE_STEPS),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "attn_implementation": "eager",
    }
    md.update(extra)
    return md


def make_f32(moe_serve, arch, tmp):
    model_dir = os.path.join(tmp, arch + "_f32")
    args = gen_model(moe_serve, arch, "f32", model_dir)
    model = load_model(model_dir, torch.float32)
    check_weights(model, model_dir)
    prompt = prompt_for(model_dir)
    prefill, tokens, decode = run(model, prompt)
    tensors = {
        "prompt_ids": np.array(prompt, dtype=np.int32),
        "prefill_logits": prefill.astype(np.float32),
        "greedy_tokens": tokens,
        "decode_logits": decode.astype(np.float32),
    }
    md = metadata(arch, args, model_dir, {"compute_dtype": "float32"})
    out = os.path.join(HERE, arch, "golden_f32.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata=md)
    print(f"{out}: {len(prompt)} prompt tokens, greedy {tokens.tolist()}, "
          f"{os.path.getsize(out)} bytes")


def make_bf16(moe_serve, arch, tmp):
    model_dir = os.path.join(tmp, arch + "_bf16")
    args = gen_model(moe_serve, arch, "bf16", model_dir)
    prompt = prompt_for(model_dir)
    # f32 compute on the bf16 weights (upcast exactly): the reference a bf16-weight engine
    # that accumulates in f32 should track closely.
    model32 = load_model(model_dir, torch.float32)
    check_weights(model32, model_dir)
    prefill32, tokens, decode32 = run(model32, prompt)
    del model32
    # bf16 compute, teacher-forced on the same tokens, to size a bf16 tolerance.
    model16 = load_model(model_dir, torch.bfloat16)
    prefill16, _, decode16 = run(model16, prompt, forced_tokens=tokens)
    diff = max(np.abs(prefill16 - prefill32).max(), np.abs(decode16 - decode32).max())
    tensors = {
        "prompt_ids": np.array(prompt, dtype=np.int32),
        "prefill_logits": prefill32.astype(np.float32),
        "greedy_tokens": tokens,
        "decode_logits": decode32.astype(np.float32),
        "prefill_logits_bf16_compute": prefill16.astype(np.float32),
        "decode_logits_bf16_compute": decode16.astype(np.float32),
    }
    md = metadata(arch, args, model_dir, {
        "compute_dtype": "float32 (prefill_logits, decode_logits); bfloat16 (*_bf16_compute)",
        "max_abs_diff_bf16_vs_f32_compute": f"{diff:.6g}",
    })
    out = os.path.join(HERE, arch, "golden_bf16.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata=md)
    print(f"{out}: greedy {tokens.tolist()}, bf16-vs-f32 compute max |diff| {diff:.4g}, "
          f"{os.path.getsize(out)} bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--moe-serve", required=True, help="path to the moe-serve binary")
    parser.add_argument("--arch", action="append", help="only these architectures")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    archs = args.arch or ARCHS
    for arch in archs:
        if arch not in ARCHS:
            raise SystemExit(f"unknown arch {arch}; known: {ARCHS}")
    with tempfile.TemporaryDirectory(prefix="moe-golden-") as tmp:
        for arch in archs:
            make_f32(args.moe_serve, arch, tmp)
            if arch in BF16_ARCHS:
                make_bf16(args.moe_serve, arch, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
