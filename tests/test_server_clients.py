"""`minikv serve` for the clients people already use: completions with echo and prompt logprobs (how
lm-evaluation-harness scores), batched and token-id prompts, reasoning models, the developer role.

Same live-server harness as test_server.py (the tiny random Llama stands in for a model).
"""

from __future__ import annotations

import dataclasses
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
        prompt_text = reference.tokenizer.decode(prompt, skip_special_tokens=False)
        assert choice["text"] == prompt_text + generated.outputs[0].text
        assert lp["text_offset"][-1] == len(prompt_text)  # the completion's token starts where the prompt ends


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


def test_streamed_echo_with_max_tokens_0(server, reference):
    prompt = "score me, do not answer"
    with httpx.stream("POST", server.url + COMPLETIONS, json={
            "prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 0, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in choices) == prompt and choices[-1]["finish_reason"] == "length"
    ids, expected = prompt_logprobs(reference, prompt)
    token_logprobs = [lp for c in choices if c["logprobs"] for lp in c["logprobs"]["token_logprobs"]]
    assert token_logprobs[0] is None and len(token_logprobs) == len(ids)  # the prompt's, nothing generated
    assert token_logprobs[1:] == pytest.approx([expected[i][ids[i]].logprob for i in range(1, len(ids))], abs=1e-5)


def test_openai_client_reads_echoed_logprobs(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model=MODEL, prompt=[1, 50, 60, 70], echo=True, logprobs=0, max_tokens=0)
    assert out.choices[0].logprobs.token_logprobs[0] is None and len(out.choices[0].logprobs.tokens) == 4
    assert out.choices[0].text == "".join(out.choices[0].logprobs.tokens)  # byte tokens: text is their join
    assert out.usage.completion_tokens == 1  # the token the engine sampled (and the response dropped) counts


# --- reasoning models, chat template kwargs, the developer role ------------------------------------------

# Qwen3's chat template, cut to what matters here: ChatML, and with enable_thinking=false an empty think
# block closed in the prompt.
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{%- endif %}")
THOUGHT, ANSWER = "Two and two. Add them: four.", "It is 4."


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory, one_torch_thread):
    """A server with a Qwen3-style chat template and `--reasoning-parser qwen3`, whose model is made to
    say `<think>THOUGHT</think>ANSWER` (forced tokens: the tiny model's own text is noise)."""
    from tiny_engine import tiny_checkpoint

    from minikv.loader import load_model

    path = tiny_checkpoint(tmp_path_factory.mktemp("qwen3") / "tiny")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN3_STYLE_TEMPLATE}))
    engine = tiny_engine(load_model(path, device="cpu", dtype="float32"))
    forced = engine.tokenizer.encode(f"<think>{THOUGHT}</think>\n\n{ANSWER}", add_special_tokens=False)
    add_request = engine.add_request

    def add_forced(prompt, params, request_id=None, **session):
        params = dataclasses.replace(params, forced_token_ids=forced, max_tokens=len(forced), ignore_eos=True)
        return add_request(prompt, params, request_id, **session)

    engine.add_request = add_forced
    live = LiveServer(create_app(engine, model_name=MODEL, reasoning_parser="qwen3"))
    yield live
    live.close()


def test_reasoning_content_plain_and_streamed(qwen3_server):
    client = openai.OpenAI(base_url=qwen3_server.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages)
    message = plain.choices[0].message
    assert message.model_extra["reasoning_content"] == THOUGHT and message.content == "\n\n" + ANSWER
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    reasoning, content = [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
        content.append(delta.content or "")
        assert "<" not in reasoning[-1] + content[-1]  # no piece of a tag leaks, though tags arrive split
    assert "".join(reasoning) == THOUGHT and "".join(content) == "\n\n" + ANSWER
    assert sum(1 for part in reasoning if part) > 5  # it streamed, token by token


def test_chat_template_kwargs_and_the_developer_role(qwen3_server):
    def prompt_tokens(body):
        return post(qwen3_server, CHAT, {"messages": [{"role": "user", "content": "hi"}], **body})["usage"][
            "prompt_tokens"]

    thinking, not_thinking = prompt_tokens({}), prompt_tokens({"chat_template_kwargs": {"enable_thinking": False}})
    assert not_thinking - thinking == len("<think>\n\n</think>\n\n")  # byte tokens: one per character

    def with_first(role):
        return post(qwen3_server, CHAT, {"messages": [{"role": role, "content": "be brief"},
                                                      {"role": "user", "content": "hi"}]})["usage"]["prompt_tokens"]

    assert with_first("developer") == with_first("system")  # "developer" is rendered as "system"


@pytest.mark.parametrize("parser, text, reasoning, content", [
    ("qwen3", "<think>a</think>b", "a", "b"),
    ("qwen3", "no thinking here", None, "no thinking here"),
    ("qwen3", "<think>cut off by max_tokens", "cut off by max_tokens", None),
    ("deepseek_r1", "thinking from the prompt's <think></think>answer", "thinking from the prompt's <think>",
     "answer"),
    ("deepseek_r1", "<think>x</think>y", "x", "y"),
    ("deepseek_r1", "all reasoning, cut off", "all reasoning, cut off", None),
])
def test_reasoning_parsers_split_whole_and_in_any_deltas(parser, text, reasoning, content):
    from minikv.server.reasoning import ReasoningStream, make_reasoning_parser

    assert make_reasoning_parser(parser).split(text) == (reasoning, content)
    for cut in range(1, 5):  # deltas of every size up to 4 characters: tags split anywhere
        stream = ReasoningStream(make_reasoning_parser(parser))
        parts = [stream.feed(text[i: i + cut]) for i in range(0, len(text), cut)] + [stream.finish()]
        assert "".join(r for r, _ in parts) == (reasoning or "") and "".join(c for _, c in parts) == (content or "")
