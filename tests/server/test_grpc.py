"""The gRPC API of a real `moe-serve serve` (moe.v1.MoeServe, grpc.health.v1, reflection).

Python stubs are generated from proto/moe/v1/serving.proto at test time with
grpc_tools.protoc. Greedy output must equal the HTTP API's; every refusal carries the right
status code and a message naming the field; the server keeps serving after errors. Every
RPC has a deadline, so no test can hang.
"""
import concurrent.futures
import importlib
import signal
import sys
import time

import pytest
import requests

from conftest import REPO, Server

grpc = pytest.importorskip("grpc")
RPC_TIMEOUT_S = 60
PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """serving_pb2 and serving_pb2_grpc, generated into a temporary directory."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path_factory.mktemp("moe-grpc-stubs")
    rc = protoc.main(["grpc_tools.protoc", f"-I{REPO / 'proto'}", f"--python_out={out}",
                      f"--grpc_python_out={out}", str(REPO / "proto/moe/v1/serving.proto")])
    assert rc == 0, "grpc_tools.protoc failed"
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("moe.v1.serving_pb2")
        pb2_grpc = importlib.import_module("moe.v1.serving_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, pb2_grpc


def make_stub(pb, target):
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=30)
    return pb[1].MoeServeStub(channel), channel


@pytest.fixture(scope="module")
def stub(pb, server):
    s, channel = make_stub(pb, server.grpc_target)
    yield s
    channel.close()


def generate(stub, request, metadata=None):
    """Runs a Generate call to its end: (responses, text, token ids)."""
    responses = list(stub.Generate(request, timeout=RPC_TIMEOUT_S, metadata=metadata))
    text = "".join(t.text for r in responses for t in r.tokens)
    ids = [t.token_id for r in responses for t in r.tokens]
    return responses, text, ids


def http_completion(server, prompt, max_tokens, **extra):
    r = requests.post(server.url + "/v1/completions",
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            **extra}, timeout=RPC_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return r.json()


def expect_error(code, field, fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    if field is not None:
        assert err.details().startswith(field + ":"), err.details()
    return err


def still_serving(pb, stub):
    responses, _, ids = generate(stub, pb[0].GenerateRequest(
        text="ok", sampling=pb[0].SamplingParams(max_tokens=2)))
    assert len(ids) >= 1 and responses[-1].finish_reason in ("stop", "length")


# ---- Generate ----

def test_generate_greedy_matches_http(pb, stub, server):
    req = pb[0].GenerateRequest(request_id="greedy-1", text=PROMPT,
                                sampling=pb[0].SamplingParams(max_tokens=12, ignore_eos=True))
    responses, text, ids = generate(stub, req)
    http = http_completion(server, PROMPT, 12, ignore_eos=True)
    assert text == http["choices"][0]["text"]
    assert len(ids) == 12
    # One response per token; only the last carries finish_reason and usage.
    assert len(responses) == 12
    assert all(r.request_id == "greedy-1" for r in responses)
    assert all(r.finish_reason == "" and not r.HasField("usage") for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == "length" == http["choices"][0]["finish_reason"]
    assert last.usage.prompt_tokens == http["usage"]["prompt_tokens"]
    assert last.usage.completion_tokens == 12
    assert last.usage.total_tokens == http["usage"]["total_tokens"]


def test_token_id_prompt(pb, stub, server):
    tok = stub.Tokenize(pb[0].TokenizeRequest(text=PROMPT, add_special_tokens=True),
                        timeout=RPC_TIMEOUT_S)
    sampling = pb[0].SamplingParams(max_tokens=8, ignore_eos=True)
    _, text_a, ids_a = generate(stub, pb[0].GenerateRequest(text=PROMPT, sampling=sampling))
    _, text_b, ids_b = generate(stub, pb[0].GenerateRequest(
        token_ids=pb[0].TokenIds(ids=list(tok.token_ids)), sampling=sampling))
    assert (text_b, ids_b) == (text_a, ids_a)
    http = http_completion(server, list(tok.token_ids), 8, ignore_eos=True)
    assert text_b == http["choices"][0]["text"]


def test_logprobs(pb, stub, server):
    req = pb[0].GenerateRequest(text=PROMPT, sampling=pb[0].SamplingParams(
        max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=3))
    responses, _, ids = generate(stub, req)
    http = http_completion(server, PROMPT, 4, ignore_eos=True, logprobs=3)
    http_lps = http["choices"][0]["logprobs"]["token_logprobs"]
    tokens = [t for r in responses for t in r.tokens]
    assert len(tokens) == 4
    for t, want in zip(tokens, http_lps):
        assert t.logprob <= 0 and t.logprob == pytest.approx(want, abs=1e-4)
        assert len(t.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one.
        assert t.top_logprobs[0].token_id == t.token_id
        assert [c.logprob for c in t.top_logprobs] == sorted(
            [c.logprob for c in t.top_logprobs], reverse=True)
    # Without logprobs, none are sent.
    responses, _, _ = generate(stub, pb[0].GenerateRequest(
        text=PROMPT, sampling=pb[0].SamplingParams(max_tokens=2)))
    assert all(t.logprob == 0 and not t.top_logprobs for r in responses for t in r.tokens)


def test_seeded_sampling_is_reproducible(pb, stub):
    sampling = pb[0].SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=1234,
                                    ignore_eos=True)
    _, _, a = generate(stub, pb[0].GenerateRequest(text=PROMPT, sampling=sampling))
    _, _, b = generate(stub, pb[0].GenerateRequest(text=PROMPT, sampling=sampling))
    assert a == b and len(a) == 8


def test_stop_string(pb, stub):
    _, text, _ = generate(stub, pb[0].GenerateRequest(
        text=PROMPT, sampling=pb[0].SamplingParams(max_tokens=16, ignore_eos=True)))
    assert len(text) >= 4
    stop = text[2:4]
    responses, cut, _ = generate(stub, pb[0].GenerateRequest(
        text=PROMPT, sampling=pb[0].SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop])))
    assert responses[-1].finish_reason == "stop"
    assert cut == text[:text.index(stop)]


# ---- Errors ----

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("sampling,field", [
    ({"temperature": -1}, "sampling.temperature"),
    ({"temperature": 1000}, "sampling.temperature"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"top_p": -0.5}, "sampling.top_p"),
    ({"top_k": -5}, "sampling.top_k"),
    ({"min_p": 2}, "sampling.min_p"),
    ({"presence_penalty": 3}, "sampling.presence_penalty"),
    ({"frequency_penalty": -3}, "sampling.frequency_penalty"),
    ({"repetition_penalty": -1}, "sampling.repetition_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "sampling.top_logprobs"),
    ({"top_logprobs": 2}, "sampling.top_logprobs"),
    ({"stop": [""]}, "sampling.stop"),
    ({"max_tokens": 100000000}, "sampling.max_tokens"),
    ({"max_tokens": 4, "min_tokens": 8}, "sampling.min_tokens"),
])
def test_out_of_range_sampling(pb, stub, sampling, field):
    req = pb[0].GenerateRequest(text="x", sampling=pb[0].SamplingParams(**sampling))
    expect_error(INVALID, field, lambda: generate(stub, req))
    still_serving(pb, stub)


def test_bad_prompts(pb, stub):
    P = pb[0]
    expect_error(INVALID, "prompt", lambda: generate(stub, P.GenerateRequest()))
    expect_error(INVALID, "prompt", lambda: generate(stub, P.GenerateRequest(
        token_ids=P.TokenIds(ids=[]))))
    expect_error(INVALID, "prompt", lambda: generate(stub, P.GenerateRequest(
        token_ids=P.TokenIds(ids=[1, -4]))))
    expect_error(INVALID, "prompt", lambda: generate(stub, P.GenerateRequest(
        token_ids=P.TokenIds(ids=[1, 10_000_000]))))
    expect_error(INVALID, "token_ids", lambda: stub.Detokenize(
        P.DetokenizeRequest(token_ids=[1, -4]), timeout=RPC_TIMEOUT_S))
    still_serving(pb, stub)


def test_unknown_model(pb, stub):
    P = pb[0]
    nf = grpc.StatusCode.NOT_FOUND
    expect_error(nf, "model", lambda: generate(stub, P.GenerateRequest(model="gpt-17", text="x")))
    expect_error(nf, "model", lambda: stub.Tokenize(P.TokenizeRequest(model="gpt-17", text="x"),
                                                    timeout=RPC_TIMEOUT_S))
    expect_error(nf, "model", lambda: stub.Detokenize(
        P.DetokenizeRequest(model="gpt-17", token_ids=[1]), timeout=RPC_TIMEOUT_S))
    still_serving(pb, stub)


# ---- Abort and cancellation ----

def long_request(pb, request_id="", max_tokens=100000):
    return pb[0].GenerateRequest(request_id=request_id, text=PROMPT,
                                 sampling=pb[0].SamplingParams(max_tokens=max_tokens,
                                                               ignore_eos=True))


def max_model_len(pb, stub):
    return stub.ListModels(pb[0].ListModelsRequest(), timeout=RPC_TIMEOUT_S).models[0].max_model_len


def test_abort(pb, stub):
    n = max_model_len(pb, stub) - 16
    call = stub.Generate(long_request(pb, "to-abort", n), timeout=RPC_TIMEOUT_S)
    first = next(call)
    assert first.request_id == "to-abort"
    # The id is taken while it runs.
    expect_error(grpc.StatusCode.ALREADY_EXISTS, "request_id",
                 lambda: generate(stub, long_request(pb, "to-abort", 2)))
    stub.Abort(pb[0].AbortRequest(request_id="to-abort"), timeout=RPC_TIMEOUT_S)
    rest = list(call)
    assert rest[-1].finish_reason == "abort"
    assert 0 < rest[-1].usage.completion_tokens < n
    assert call.code() == grpc.StatusCode.OK
    expect_error(grpc.StatusCode.NOT_FOUND, "request_id", lambda: stub.Abort(
        pb[0].AbortRequest(request_id="to-abort"), timeout=RPC_TIMEOUT_S))
    expect_error(grpc.StatusCode.NOT_FOUND, "request_id", lambda: stub.Abort(
        pb[0].AbortRequest(request_id="never-was"), timeout=RPC_TIMEOUT_S))
    still_serving(pb, stub)


def running_requests(server):
    text = requests.get(server.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("moe_num_requests_running"):
            return float(line.split()[-1])
    return 0.0


def test_client_cancel_and_deadline_cancel_the_request(pb, stub, server):
    n = max_model_len(pb, stub) - 16
    call = stub.Generate(long_request(pb, "", n), timeout=RPC_TIMEOUT_S)
    next(call)
    call.cancel()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # The tiny model makes its ~500 tokens in about 0.1 s here: a deadline well below that.
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(long_request(pb, "", n), timeout=0.01))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.time() + 30
    while running_requests(server) > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert running_requests(server) == 0
    still_serving(pb, stub)


# ---- Tokenize, Detokenize, ListModels ----

def test_tokenize_detokenize_list_models(pb, stub, server):
    P = pb[0]
    tok = stub.Tokenize(P.TokenizeRequest(text=PROMPT), timeout=RPC_TIMEOUT_S)
    http_tok = requests.post(server.url + "/tokenize",
                             json={"prompt": PROMPT, "add_special_tokens": False}, timeout=10)
    assert list(tok.token_ids) == http_tok.json()["tokens"]
    assert tok.max_model_len == http_tok.json()["max_model_len"]
    detok = stub.Detokenize(P.DetokenizeRequest(token_ids=tok.token_ids), timeout=RPC_TIMEOUT_S)
    assert detok.text == PROMPT
    http_detok = requests.post(server.url + "/detokenize", json={"tokens": list(tok.token_ids)},
                               timeout=10)
    assert detok.text == http_detok.json()["prompt"]
    models = stub.ListModels(P.ListModelsRequest(), timeout=RPC_TIMEOUT_S).models
    http_models = requests.get(server.url + "/v1/models", timeout=10).json()["data"]
    assert [m.id for m in models] == [m["id"] for m in http_models]
    assert models[0].max_model_len == http_models[0]["max_model_len"]
    assert models[0].architecture.endswith("ForCausalLM")


# ---- Health and reflection ----

def test_health_serving(server):
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "moe.v1.MoeServe"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service),
                             timeout=RPC_TIMEOUT_S)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(server):
    db_mod = pytest.importorskip("grpc_reflection.v1alpha.proto_reflection_descriptor_database")
    with grpc.insecure_channel(server.grpc_target) as channel:
        db = db_mod.ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"moe.v1.MoeServe", "grpc.health.v1.Health"} <= services, services
        desc = db.FindFileContainingSymbol("moe.v1.MoeServe")
        assert desc.package == "moe.v1"


# ---- A server with an API key and a small queue ----

@pytest.fixture(scope="module")
def restricted(cache_dir):
    s = Server(cache_dir, ["--set", "server.api_key=sesame",
                           "--set", "batching.max_num_seqs=1",
                           "--set", "batching.max_waiting_requests=2"])
    yield s
    assert s.stop() == 0, "".join(s.log_lines[-20:])


AUTH = [("authorization", "Bearer sesame")]


def test_api_key(pb, restricted):
    stub, channel = make_stub(pb, restricted.grpc_target)
    P = pb[0]
    req = P.GenerateRequest(text="x", sampling=P.SamplingParams(max_tokens=1))
    unauth = grpc.StatusCode.UNAUTHENTICATED
    expect_error(unauth, None, lambda: generate(stub, req))
    expect_error(unauth, None, lambda: generate(stub, req, [("authorization", "Bearer wrong")]))
    expect_error(unauth, None, lambda: stub.ListModels(P.ListModelsRequest(),
                                                       timeout=RPC_TIMEOUT_S))
    assert generate(stub, req, AUTH)[2]
    # Health needs no key.
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                  timeout=RPC_TIMEOUT_S)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_queue_full_is_resource_exhausted(pb, restricted):
    stub, channel = make_stub(pb, restricted.grpc_target)
    n = stub.ListModels(pb[0].ListModelsRequest(), timeout=RPC_TIMEOUT_S,
                        metadata=AUTH).models[0].max_model_len - 16
    running = stub.Generate(long_request(pb, "", n), timeout=RPC_TIMEOUT_S, metadata=AUTH)
    next(running)  # running; max_num_seqs is 1, so the next ones wait
    calls = [stub.Generate(long_request(pb, "", n), timeout=RPC_TIMEOUT_S, metadata=AUTH)
             for _ in range(6)]
    # Refused calls end at once; the two queued ones wait behind `running`.
    deadline = time.time() + 30
    while sum(c.done() for c in calls) < 4 and time.time() < deadline:
        time.sleep(0.05)
    done = [c for c in calls if c.done()]
    refused = [c for c in done if c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused, [(c.code(), c.details()) for c in done]
    for c in done:
        assert c.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK), c.code()
    for c in refused:
        assert "queue" in c.details(), c.details()
    for c in [running, *calls]:
        c.cancel()
    # Still serving once the cancelled ones are gone (the waiting count follows within an
    # engine iteration).
    req = pb[0].GenerateRequest(text="x", sampling=pb[0].SamplingParams(max_tokens=2))
    deadline = time.time() + 30
    while True:
        try:
            assert generate(stub, req, AUTH)[2]
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.time() > deadline:
                raise
            time.sleep(0.05)
    channel.close()


# ---- Draining ----

def test_drain_refuses_new_calls_and_finishes_running_ones(pb, cache_dir):
    s = Server(cache_dir, ["--set", "server.drain_timeout_s=1"])
    try:
        stub, channel = make_stub(pb, s.grpc_target)
        n = max_model_len(pb, stub) - 16
        call = stub.Generate(long_request(pb, "drained", n), timeout=RPC_TIMEOUT_S)
        next(call)
        s.proc.send_signal(signal.SIGTERM)
        # New calls are refused while the running one drains.
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                stub.Tokenize(pb[0].TokenizeRequest(text="x"), timeout=RPC_TIMEOUT_S)
                time.sleep(0.02)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
                break
        else:
            pytest.fail("Tokenize kept succeeding after SIGTERM")
        # The running stream ends (cut at the drain deadline, or done) with its usage.
        rest = list(call)
        assert rest[-1].finish_reason in ("abort", "length")
        assert rest[-1].usage.completion_tokens > 0
        channel.close()
        assert s.proc.wait(30) == 0, "".join(s.log_lines[-20:])
    finally:
        s.stop()
