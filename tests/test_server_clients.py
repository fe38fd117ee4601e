"""`minikv serve` for the clients people already use: completions with echo and prompt logprobs (how
lm-evaluation-harness scores), batched and token-id prompts, reasoning models, the developer role.

Same live-server harness as test_server.py (the tiny random Llama stands in for a model).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from test_server import MODEL, LiveServer, tiny_engine  # noqa: E402

from minikv.sampling import SamplingParams  # noqa: E402
from minikv.server.app import create_app  # noqa: E402

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(loaded):
    live = LiveServer(create_app(tiny_engine(loaded), model_name=MODEL, max_waiting=64))
    yield live
    live.close()


@pytest.fixture(scope="module")
def reference(loaded):
    """An engine like the server's, driven directly: what the server's numbers must equal."""
    return tiny_engine(loaded)


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def prompt_logprobs(engine, prompt, top: int = 0):
    out = engine.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=top, temperature=0),
                          use_tqdm=False)[0]
    return out.prompt_token_ids, out.prompt_logprobs


# --- echo and logprobs (/v1/completions) -------------------------------------------------------------


def test_echo_with_max_tokens_0_scores_the_prompt(server, reference):
    prompt = "the quick brown fox jumps over the lazy dog, twice over, so that the ring evicts"
    body = post(server, COMPLETIONS, {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0})
    choice = body["choices"][0]
    ids, expected = prompt_logprobs(reference, prompt, top=2)
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) == body["usage"]["prompt_tokens"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert logprobs["token_logprobs"][i] == pytest.approx(expected[i][ids[i]].logprob, abs=1e-5)
        top = logprobs["top_logprobs"][i]
        assert 2 <= len(top) <= 3 and max(top.values()) >= logprobs["token_logprobs"][i]
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"]))


def test_batched_token_id_prompts_echo_one_choice_each(server, reference):
    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]
    body = post(server, COMPLETIONS, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                                      "temperature": 0})
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 9 and body["usage"]["completion_tokens"] == 2
    for prompt, choice in zip(prompts, body["choices"]):
        ids, expected = prompt_logprobs(reference, prompt)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1  # the prompt, then the generated token
        assert lp["token_logprobs"][1:len(prompt)] == pytest.approx(
            [expected[i][ids[i]].logprob for i in range(1, len(prompt))], abs=1e-5)
        generated = reference.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
        assert choice["text"].endswith(generated.outputs[0].text)


def test_echo_without_logprobs_and_streamed_echo(server):
    plain = post(server, COMPLETIONS, {"prompt": "echo me", "echo": True, "max_tokens": 5, "temperature": 0,
                                       "ignore_eos": True})
    assert plain["choices"][0]["text"].startswith("echo me") and plain["choices"][0]["logprobs"] is None
    with httpx.stream("POST", server.url + COMPLETIONS, json={
            "prompt": "echo me", "echo": True, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"].startswith("echo me")
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == plain["usage"]["prompt_tokens"] + 5


def test_openai_client_reads_echoed_logprobs(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model=MODEL, prompt=[1, 50, 60, 70], echo=True, logprobs=0, max_tokens=0)
    assert out.choices[0].logprobs.token_logprobs[0] is None and len(out.choices[0].logprobs.tokens) == 4
    assert out.choices[0].text == "".join(out.choices[0].logprobs.tokens)  # byte tokens: text is their join
    assert out.usage.completion_tokens == 1  # the token the engine sampled (and the response dropped) counts
