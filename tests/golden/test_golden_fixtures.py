"""Checks the golden fixtures against what `moe-serve gen-model` writes today.

Needs only numpy, safetensors and tokenizers (no torch): regenerates each fixture's model with
the recorded gen-model arguments and compares checksums (drift means: regenerate the fixtures,
see README.md), checks the fixtures' shapes and the prompt's tokenization, and round-trips text
through every generated tokenizer.json with Hugging Face `tokenizers`.
"""
import glob
import hashlib
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

ROOT = os.environ.get("MOE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
MOE_SERVE = os.environ.get("MOE_SERVE_BIN", os.path.join(ROOT, "build", "moe-serve"))
FIXTURES = sorted(glob.glob(os.path.join(ROOT, "tests", "golden", "*", "golden_*.safetensors")))
ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "deepseek_v2", "olmoe"]
TEXTS = [
    "Hello world! The experts route tokens.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Ça marche très bien — 中文 🙂 12345 3.14159 don't we'll",
    "def f(x):\n    return x * 2 + 1  # comment",
    "",
]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_every_arch_has_a_fixture():
    have = {os.path.basename(os.path.dirname(p)) for p in FIXTURES}
    assert have == set(ARCHS)


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: os.path.relpath(p, ROOT))
def test_fixture_matches_gen_model(fixture, tmp_path):
    with safe_open(fixture, "np") as f:
        md = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    args = json.loads(md["gen_model_args"])
    subprocess.run([MOE_SERVE, *args, "--out", str(tmp_path)], check=True,
                   stdout=subprocess.DEVNULL)
    assert sha256(tmp_path / "model.safetensors") == md["model_safetensors_sha256"], (
        f"{fixture}: gen-model output drifted; regenerate with scripts/setup.sh golden")
    assert sha256(tmp_path / "config.json") == md["config_json_sha256"]

    steps = int(md["decode_steps"])
    prompt = t["prompt_ids"]
    assert prompt.dtype == np.int32 and prompt.ndim == 1 and prompt.size >= 32
    vocab = json.load(open(tmp_path / "config.json"))["vocab_size"]
    assert t["prefill_logits"].shape == (prompt.size, vocab)
    assert t["decode_logits"].shape == (steps, vocab)
    assert t["greedy_tokens"].shape == (steps,)
    # The greedy chain is consistent with the stored logits.
    assert t["greedy_tokens"][0] == np.argmax(t["prefill_logits"][-1])
    for i in range(1, steps):
        assert t["greedy_tokens"][i] == np.argmax(t["decode_logits"][i - 1])
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.encode(md["prompt_text"], add_special_tokens=True).ids == prompt.tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trip(arch, tmp_path):
    subprocess.run([MOE_SERVE, "gen-model", "--arch", arch, "--out", str(tmp_path)], check=True,
                   stdout=subprocess.DEVNULL)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    config = json.load(open(tmp_path / "config.json"))
    tc = json.load(open(tmp_path / "tokenizer_config.json"))
    assert tok.get_vocab_size(with_added_tokens=True) <= config["vocab_size"]
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert all(0 <= i < config["vocab_size"] for i in ids)
    # Special tokens are single ids and match config.json.
    eos_id = config["eos_token_id"]
    assert tok.token_to_id(tc["eos_token"]) == eos_id
    assert tok.encode(tc["eos_token"], add_special_tokens=False).ids == [eos_id]
    if tc["bos_token"] is not None:
        assert tok.token_to_id(tc["bos_token"]) == config["bos_token_id"]
    if tc["add_bos_token"]:
        assert tok.encode("hi", add_special_tokens=True).ids[0] == config["bos_token_id"]
    # The chat template renders with jinja2.
    import jinja2
    rendered = jinja2.Environment().from_string(tc["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        add_generation_prompt=True, bos_token=tc["bos_token"] or "", eos_token=tc["eos_token"])
    assert "Hi" in rendered and "Hello" in rendered
