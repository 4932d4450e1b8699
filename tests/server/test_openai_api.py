"""The OpenAI-compatible API driven by the official `openai` client."""
import math

import requests

MODEL = "tiny"


def greedy(client, prompt, max_tokens=16, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, **kw)


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_completion_shape_and_usage(client):
    r = greedy(client, "Hello world", max_tokens=5, extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.model == MODEL
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and isinstance(c.text, str)
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_prompt_forms_and_n(client):
    r = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=3, n=2,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 5
    assert r.usage.completion_tokens == 12
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1]  # greedy: both samples of prompt 0 agree
    r = client.completions.create(model=MODEL, prompt=["a b", "c d"], max_tokens=2,
                                  temperature=0)
    assert len(r.choices) == 2
    r = client.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == 3


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt="The", temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_stream_matches_non_stream(client):
    full = greedy(client, "Once upon a time", max_tokens=12, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].choices == []


def test_completion_logprobs(client):
    r = greedy(client, "Hello", max_tokens=6, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.token_logprobs) == 6 and len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0
        assert 1 <= len(top) <= 4
        # Greedy over raw logits: the chosen token is the most likely one.
        assert math.isclose(chosen, max(top.values()), rel_tol=1e-5, abs_tol=1e-6)
    assert lp.text_offset[0] == 0


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=MODEL, prompt="Seeds", max_tokens=16, temperature=1.0, top_p=0.95,
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def test_sampling_parameters_accepted(client):
    r = client.completions.create(
        model=MODEL, prompt="Params", max_tokens=8, temperature=0.8, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, seed=3,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 8,
                    "ignore_eos": False})
    assert r.usage.completion_tokens == 8


def test_stop_string_not_returned(client):
    base = greedy(client, "Stop strings", max_tokens=24, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    # A stop string from the middle of the greedy text, not present earlier.
    stop = None
    for start in range(4, len(text) - 3):
        cand = text[start:start + 3]
        if cand.strip() and text.find(cand) == start:
            stop = cand
            break
    assert stop is not None, text
    expected = text[:text.index(stop)]
    r = greedy(client, "Stop strings", max_tokens=24, stop=[stop],
               extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Stop strings", max_tokens=24,
                                         temperature=0, stop=stop, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client):
    # Every id is a stop id: the first sampled token stops, and its text is not returned.
    r = greedy(client, "Stop ids", max_tokens=8,
               extra_body={"ignore_eos": True, "stop_token_ids": list(range(512))})
    c = r.choices[0]
    assert c.finish_reason == "stop"
    assert c.text == ""
    assert r.usage.completion_tokens == 1
    assert isinstance(c.model_extra.get("stop_reason"), int)


def test_echo(client):
    r = greedy(client, "Echo this", max_tokens=3, echo=True)
    assert r.choices[0].text.startswith("Echo this")


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi there"}])
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    m = r.choices[0].message
    assert m.role == "assistant" and isinstance(m.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 4
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_role_first_and_logprobs(client):
    kw = dict(model=MODEL, max_tokens=8, temperature=0, max_completion_tokens=8,
              messages=[{"role": "user", "content": "Tell me"}], logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert isinstance(entry.bytes, list)
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_tokenize_detokenize(server):
    r = requests.post(server.url + "/tokenize", json={"prompt": "Hello world"}, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0
    d = requests.post(server.url + "/detokenize", json={"tokens": body["tokens"]}, timeout=10)
    assert d.status_code == 200
    assert "Hello world" in d.json()["prompt"]
    chat = requests.post(server.url + "/tokenize",
                         json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert chat.status_code == 200 and chat.json()["count"] > 2


def test_health_and_metrics(server):
    h = requests.get(server.url + "/health", timeout=10)
    assert h.status_code == 200 and h.content == b""
    m = requests.get(server.url + "/metrics", timeout=10)
    assert m.status_code == 200
    assert m.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for name in ("moe_num_requests_running", "moe_num_requests_waiting",
                 "moe_kv_cache_usage_perc", "moe_request_success_total",
                 "moe_prompt_tokens_total", "moe_generation_tokens_total",
                 "moe_time_to_first_token_seconds_bucket", "moe_inter_token_latency_seconds",
                 "moe_e2e_request_latency_seconds", "moe_request_queue_time_seconds",
                 "moe_step_duration_seconds", "moe_iteration_num_seqs",
                 "moe_num_preemptions_total"):
        assert name in m.text, name
