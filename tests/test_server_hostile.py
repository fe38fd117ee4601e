"""Malformed and hostile requests: each gets a 4xx in OpenAI's error shape naming the field it is about, and
the server keeps serving (the cases of test_server.py's BAD_REQUESTS are the ordinary mistakes; these are
the ones a fuzzer, a broken client or an attacker sends).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from test_server import MODEL, LiveServer, tiny_engine, wait_for  # noqa: E402

from minikv.server.app import create_app  # noqa: E402
from minikv.server.protocol import MAX_PROMPTS_PER_REQUEST  # noqa: E402

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
MAX_BODY = 1 << 20  # the test server's --max-body-size


def raw(text: str) -> bytes:
    return text.encode()


HOSTILE = [
    # (case, endpoint, body: dict, or bytes sent as is, status, param, words the message contains)
    ("NaN", COMPLETIONS, raw('{"prompt": "hi", "temperature": NaN}'), 400, "temperature", "finite"),
    ("Infinity", COMPLETIONS, raw('{"prompt": "hi", "top_p": Infinity}'), 400, "top_p", "finite"),
    ("-Infinity", CHAT, raw('{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -Infinity}'),
     400, "presence_penalty", "finite"),
    ("1e999 overflows to inf", COMPLETIONS, raw('{"prompt": "hi", "min_p": 1e999}'), 400, "min_p", "finite"),
    # max_model_len bounds a request under positions "original" (under "ring", the default, the ring's memory does)
    ("huge max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 10**30, "positions": "original"}, 400,
     "max_tokens", "max_model_len"),
    ("negative max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("negative max_completion_tokens", CHAT, {"messages": USER, "max_completion_tokens": -3}, 400,
     "max_completion_tokens", ">= 1"),
    ("negative kv_budget", COMPLETIONS, {"prompt": "hi", "kv_budget": -5}, 400, "kv_budget", "positive"),
    ("enormous kv_budget", CHAT, {"messages": USER, "kv_budget": 10**20}, 400, "kv_budget", "[21, 64]"),
    ("float kv_budget", COMPLETIONS, {"prompt": "hi", "kv_budget": 32.5}, 400, "kv_budget", "integer"),
    ("10 MB body", COMPLETIONS, {"prompt": "x" * (10 * 2**20)}, 413, None, "at most"),
    ("invalid UTF-8", COMPLETIONS, b'{"prompt": "\xff\xfe\xfd"}', 400, None, "UTF-8"),
    ("lone surrogate escape", COMPLETIONS, raw('{"prompt": "a\\ud800b"}'), 400, "prompt", "surrogate"),
    ("nesting bomb", COMPLETIONS, raw("[" * 100_000 + "]" * 100_000), 400, None, "JSON"),
    ("JSON null body", COMPLETIONS, raw("null"), 400, None, "JSON object"),
    ("JSON string body", CHAT, raw('"hi"'), 400, None, "JSON object"),
    ("unknown stream option", COMPLETIONS, {"prompt": "hi", "stream": True,
                                            "stream_options": {"include_usage": True, "bogus": 1}},
     400, "stream_options.bogus", "not permitted"),
    ("stream_options without stream", CHAT, {"messages": USER, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream=true"),
    ("n > 1", CHAT, {"messages": USER, "n": 3}, 400, "n", "one choice"),
    ("best_of > 1", COMPLETIONS, {"prompt": "hi", "best_of": 2}, 400, "best_of", "one choice"),
    ("max_tokens 0 without echo", COMPLETIONS, {"prompt": "hi", "max_tokens": 0, "logprobs": 1}, 400,
     "max_tokens", "echo"),
    ("echo as a string", COMPLETIONS, {"prompt": "hi", "echo": "true"}, 400, "echo", "boolean"),
    ("negative token id", COMPLETIONS, {"prompt": [5, -1]}, 400, "prompt", "vocabulary"),
    ("token id out of range in a batch", COMPLETIONS, {"prompt": [[5, 6], [7, 10**12]]}, 400, "prompt",
     "prompt[1]"),
    ("float token id", COMPLETIONS, {"prompt": [5, 1.5]}, 400, "prompt", "must be one of"),
    ("mixed prompt list", COMPLETIONS, {"prompt": ["a", 1]}, 400, "prompt", "must be one of"),
    ("empty prompt list", COMPLETIONS, {"prompt": []}, 400, "prompt", "empty"),
    ("empty token list in a batch", COMPLETIONS, {"prompt": [[1, 2], []]}, 400, "prompt", "empty"),
    ("too many prompts", COMPLETIONS, {"prompt": [[5]] * (MAX_PROMPTS_PER_REQUEST + 1)}, 400, "prompt",
     "at most"),
    ("prompt as a boolean", COMPLETIONS, {"prompt": True}, 400, "prompt", "must be one of"),
    ("negative logprobs", COMPLETIONS, {"prompt": "hi", "logprobs": -1}, 400, "logprobs", "[0, 20]"),
    ("echo logprobs over 20", COMPLETIONS, {"prompt": "hi", "echo": True, "logprobs": 21, "max_tokens": 0}, 400,
     "logprobs", "[0, 20]"),
    ("seed as a string", COMPLETIONS, {"prompt": "hi", "seed": "42"}, 400, "seed", "integer"),
    ("seed as a float", CHAT, {"messages": USER, "seed": 1.5}, 400, "seed", "integer"),
    ("stop as numbers", COMPLETIONS, {"prompt": "hi", "stop": [1, 2]}, 400, "stop", "must be one of"),
    ("negative stop token id", COMPLETIONS, {"prompt": "hi", "stop_token_ids": [-1]}, 400, "stop_token_ids",
     "stop_token_ids"),
    ("top_k below -1", COMPLETIONS, {"prompt": "hi", "top_k": -5}, 400, "top_k", ">= 1"),
    ("repetition_penalty 0", CHAT, {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ("min_p over 1", COMPLETIONS, {"prompt": "hi", "min_p": 2}, 400, "min_p", "[0, 1]"),
    ("messages as a string", CHAT, {"messages": "hi"}, 400, "messages", "list"),
    ("message without role", CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role", "required"),
    ("empty role", CHAT, {"messages": [{"role": "", "content": "hi"}]}, 400, "messages", "role"),
    ("image content part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]}, 400, "messages[0].content[0]",
     "text only"),
    ("chat_template_kwargs not an object", CHAT, {"messages": USER, "chat_template_kwargs": [1]}, 400,
     "chat_template_kwargs", "dictionary"),
    ("chat_template_kwargs overriding messages", CHAT, {"messages": USER, "chat_template_kwargs": {
        "messages": []}}, 400, "chat_template_kwargs", "messages"),
    ("model as a number", COMPLETIONS, {"prompt": "hi", "model": 5}, 400, "model", "string"),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
]


@pytest.fixture(scope="module")
def server(loaded):
    live = LiveServer(create_app(tiny_engine(loaded), model_name=MODEL, max_waiting=64, max_body_bytes=MAX_BODY))
    yield live
    live.close()


def test_the_table_holds_at_least_30_cases():
    assert len(HOSTILE) >= 30 and len({case[0] for case in HOSTILE}) == len(HOSTILE)


@pytest.mark.parametrize("case, endpoint, body, status, param, words", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_request_gets_a_4xx_naming_the_field(server, case, endpoint, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + endpoint, content=content, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error
    if param:
        assert param.split("[")[0].split(".")[0] in error["message"]  # the message names the field too


def test_the_server_serves_on_after_every_hostile_request(server):
    for _, endpoint, body, *_ in HOSTILE:
        httpx.post(server.url + endpoint, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                   headers={"Content-Type": "application/json"}, timeout=60)
    out = httpx.post(server.url + COMPLETIONS, json={"prompt": "still here", "max_tokens": 3, "ignore_eos": True})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    assert server.state.engine_loop.is_alive
    # (the snapshot is published just after the step that answered: wait for it)
    stats = wait_for(lambda: server.stats if server.stats.num_running == 0 else None, what="the engine to drain")
    assert stats.num_waiting == 0 and stats.kv_blocks_used == 0  # nothing refused holds memory
