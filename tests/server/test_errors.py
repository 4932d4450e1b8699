"""Malformed and refused requests over raw HTTP: each answers with the right status and an
OpenAI error body, and the server keeps serving afterwards."""
import concurrent.futures
import http.client
import json

import pytest
import requests

from conftest import Server


def check_error(r, status, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def still_serving(url):
    assert requests.get(url + "/health", timeout=10).status_code == 200
    r = requests.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2},
                      timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def post(url, path, body, **kw):
    return requests.post(url + path, json=body, timeout=30, **kw)


def test_bad_json(server):
    r = requests.post(server.url + "/v1/completions", data=b"{not json",
                      headers={"Content-Type": "application/json"}, timeout=10)
    check_error(r, 400)
    r = requests.post(server.url + "/v1/chat/completions", data=b"[1, 2]", timeout=10)
    check_error(r, 400)
    still_serving(server.url)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -5}, "top_k"),
    ({"prompt": "x", "min_p": 2}, "min_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "stop_token_ids": "a"}, "stop_token_ids"),
    ({"prompt": "x", "seed": "s"}, "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [100000]}, "prompt"),
    ({"prompt": list(range(1, 600))}, "prompt"),
])
def test_out_of_range_completions(server, body, param):
    check_error(post(server.url, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
     "max_completion_tokens"),
])
def test_out_of_range_chat(server, body, param):
    check_error(post(server.url, "/v1/chat/completions", body), 400, param)


def test_unknown_model_route_and_method(server):
    check_error(post(server.url, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404,
                "model")
    check_error(requests.get(server.url + "/v1/nothing", timeout=10), 404)
    check_error(requests.get(server.url + "/v1/completions", timeout=10), 405)
    check_error(requests.post(server.url + "/v1/models", timeout=10), 405)
    check_error(requests.delete(server.url + "/health", timeout=10), 405)
    still_serving(server.url)


def test_body_too_large(server):
    body = json.dumps({"prompt": "a" * 1_500_000}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413
    err = json.loads(resp.read())["error"]
    assert err["code"] == 413
    conn.close()
    still_serving(server.url)


def test_detokenize_bad_ids(server):
    check_error(post(server.url, "/detokenize", {"tokens": [1, -4]}), 400, "tokens")
    check_error(post(server.url, "/tokenize", {"prompt": 5}), 400, "prompt")


@pytest.fixture(scope="module")
def restricted(cache_dir):
    s = Server(cache_dir, ["--set", "server.api_key=sesame",
                           "--set", "batching.max_num_seqs=1",
                           "--set", "batching.max_waiting_requests=2"])
    yield s
    assert s.stop() == 0


def test_api_key(restricted):
    url = restricted.url
    check_error(post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1}), 401)
    check_error(post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1},
                     headers={"Authorization": "Bearer wrong"}), 401)
    ok = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1},
              headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200
    assert requests.get(url + "/health", timeout=10).status_code == 200  # no key needed


def test_queue_full_is_429(restricted):
    url = restricted.url
    auth = {"Authorization": "Bearer sesame"}

    def one(i):
        return post(url, "/v1/completions",
                    {"prompt": f"request {i}", "max_tokens": 400, "ignore_eos": True},
                    headers=auth)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    codes = sorted(r.status_code for r in results)
    assert 429 in codes, codes
    assert set(codes) <= {200, 429}, codes
    for r in results:
        if r.status_code == 429:
            check_error(r, 429)
        else:
            assert r.json()["usage"]["completion_tokens"] == 400
    ok = post(url, "/v1/completions", {"prompt": "after", "max_tokens": 2}, headers=auth)
    assert ok.status_code == 200
