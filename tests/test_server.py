"""`minikv serve` end to end: a real uvicorn server on a free port, driven by the real `openai` client.

The tiny random Llama of tests/tiny_engine.py (every token id has text; ids >= 259 read `<wN>`) stands in
for a model: its text is noise, but stop strings, seeds, logprobs, streaming, batching, aborts, errors and
metrics behave as they would with any model. Assertions are on outputs and on the engine's counters (the
snapshot the engine thread publishes), never on timing.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from minikv import bench  # noqa: E402
from minikv.engine import Engine  # noqa: E402
from minikv.server.app import create_app  # noqa: E402

MODEL = "tiny"
BUDGET, N_SINK, WINDOW = 64, 4, 16  # per-request kv_budget may be 21..64
MAX_MODEL_LEN = 512


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a port the OS picked) on a background thread."""

    def __init__(self, app):
        self.app = app
        self.state = app.state.server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        wait_for(lambda: self._server.started, what="the server to start")

    @property
    def stats(self):
        return self.state.engine_loop.stats()

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def wait_for(condition, timeout: float = 20.0, what: str = "a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def tiny_engine(loaded, **overrides) -> Engine:
    options = dict(budget=BUDGET, policy="nexus", chunk=32, n_sink=N_SINK, window=WINDOW, max_num_seqs=32,
                   max_model_len=MAX_MODEL_LEN, seed=0)
    return Engine(loaded, **(options | overrides))


@pytest.fixture(scope="module")
def server(loaded):
    live = LiveServer(create_app(tiny_engine(loaded), model_name=MODEL, max_waiting=64))
    yield live
    live.close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def usage_extra(usage) -> dict:
    return {name: getattr(usage, name) for name in ("kv_budget", "kv_slots_held", "evicted_tokens")}


def metrics(server) -> dict[str, float]:
    """/metrics parsed by prometheus_client: sample name with its labels (sorted, model_name dropped) -> value."""
    text = httpx.get(server.url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


# --- the basic endpoints -----------------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_reports_usage_and_kv_accounting(client):
    prompt = "the quick brown fox jumps over the lazy dog " * 3  # longer than kv_budget: tokens get evicted
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                    extra_body={"kv_budget": 32, "ignore_eos": True})
    choice, usage = out.choices[0], out.usage
    assert out.object == "text_completion" and choice.finish_reason == "length" and choice.text
    assert usage.completion_tokens == 10 and usage.total_tokens == usage.prompt_tokens + 10
    assert usage.prompt_tokens > 32
    extra = usage_extra(usage)
    assert extra["kv_budget"] == 32
    assert 0 < extra["kv_slots_held"] <= 32  # the ring never outgrows the request's budget
    assert extra["evicted_tokens"] > 0


def test_chat_without_max_tokens_runs_to_max_model_len_under_ring_and_to_what_is_left_under_original(client):
    """A chat answer with no max_tokens: under "original" what max_model_len leaves after the prompt (vLLM's
    rule); under "ring" (the default), where max_model_len does not bound the request, max_model_len tokens."""
    answers = {mode: client.chat.completions.create(model=MODEL, messages=USER, temperature=0,
                                                    extra_body={"ignore_eos": True, "positions": mode})
               for mode in ("original", "ring")}
    original, ring = answers["original"].usage, answers["ring"].usage
    assert original.total_tokens == MAX_MODEL_LEN and original.completion_tokens < MAX_MODEL_LEN
    assert ring.completion_tokens == MAX_MODEL_LEN and ring.prompt_tokens == original.prompt_tokens
    assert all(a.choices[0].finish_reason == "length" for a in answers.values())


def test_default_max_tokens_stays_finite_for_a_prompt_longer_than_max_model_len(loaded):
    from minikv.sampling import SamplingParams
    from minikv.server.app import Server

    server = Server(tiny_engine(loaded), MODEL, max_waiting=None)
    assert server.default_max_tokens(SamplingParams(), 10_000) == MAX_MODEL_LEN  # ring: the prompt may be longer
    assert server.default_max_tokens(SamplingParams(), 100) == MAX_MODEL_LEN
    assert server.default_max_tokens(SamplingParams(positions="original"), 100) == MAX_MODEL_LEN - 100
    # original: at least 1, so that the engine refuses the prompt with its own "exceeds max_model_len"
    assert server.default_max_tokens(SamplingParams(positions="original"), 10_000) == 1
    full = Server(tiny_engine(loaded, policy="full"), MODEL, max_waiting=None)
    assert full.default_max_tokens(SamplingParams(), 100) == MAX_MODEL_LEN - 100
    # a session keeps the mode its first request chose: a later request that names none runs under it
    server.engine.generate([5, 6, 7], SamplingParams(max_tokens=2, positions="original"), session_id="s",
                           use_tqdm=False)
    assert server.default_max_tokens(SamplingParams(), 100, session_id="s") == MAX_MODEL_LEN - 100
    assert server.default_max_tokens(SamplingParams(positions="ring"), 100, session_id="s") == MAX_MODEL_LEN
    assert server.default_max_tokens(SamplingParams(), 100, session_id="unknown") == MAX_MODEL_LEN


def test_token_id_prompt(client):
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 3


def test_streamed_chat_concatenates_to_the_plain_answer(client):
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=24,
                   temperature=0.8, seed=7, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"] == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])
    assert plain.object == "chat.completion" and chunks[1].object == "chat.completion.chunk"


def test_seed_reproducibility(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_stop_strings(client):
    request = dict(model=MODEL, prompt="A list of words:", max_tokens=40, temperature=0.7, seed=5)
    full = client.completions.create(**request, extra_body={"ignore_eos": True}).choices[0].text
    stop = re.findall(r"<w\d+>", full)[2]  # a whole token's text: stable however the bytes around it decode
    at = full.find(stop)
    cut = client.completions.create(**request, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full[:at] and cut.finish_reason == "stop" and cut.model_extra["stop_reason"] == stop
    kept = client.completions.create(**request, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == full[: at + len(stop)]


def test_logprobs_in_openai_shapes(client):
    out = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=6, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)  # the top 3, plus the chosen token if not among them
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_vllm_extensions_in_extra_body(client):
    knobs = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 4, "ignore_eos": True,
             "skip_special_tokens": False, "kv_budget": 40}
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on."}],
                                         max_completion_tokens=12, presence_penalty=0.5, frequency_penalty=0.5,
                                         top_p=0.9, temperature=0.9, seed=1, extra_body=knobs)
    assert out.usage.completion_tokens == 12 and usage_extra(out.usage)["kv_budget"] == 40

    # stop_token_ids: the tiny vocabulary's ids >= 259 read "<wN>", so a token's text names its id.
    request = dict(model=MODEL, prompt="Count:", max_tokens=30, temperature=0, logprobs=0)
    tokens = client.completions.create(**request, extra_body={"ignore_eos": True}).choices[0].logprobs.tokens
    token_id = next(int(t[2:-1]) for t in tokens[1:] if re.fullmatch(r"<w\d+>", t))
    index = tokens.index(f"<w{token_id}>")  # its first occurrence is where generation stops
    stopped = client.completions.create(**request, extra_body={"ignore_eos": True, "stop_token_ids": [token_id]})
    assert stopped.usage.completion_tokens == index + 1
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].model_extra["stop_reason"] == token_id


# --- many clients, one engine -------------------------------------------------------------------------


def test_32_concurrent_streams_with_their_own_budgets_share_steps(server):
    before = server.stats
    budgets = [N_SINK + WINDOW + 1 + i * (BUDGET - N_SINK - WINDOW - 1) // 31 for i in range(32)]

    async def one(api, i):
        stream = await api.completions.create(
            model=MODEL, prompt="story " * (3 + i), max_tokens=8 + i % 8, temperature=0.5, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"kv_budget": budgets[i], "ignore_eos": True})
        chunks = [chunk async for chunk in stream]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage

    async def all_of_them():
        api = aclient(server)
        return await asyncio.gather(*(one(api, i) for i in range(32)))

    results = asyncio.run(all_of_them())
    for i, (text, usage) in enumerate(results):
        assert text and usage.completion_tokens == 8 + i % 8
        assert usage_extra(usage)["kv_budget"] == budgets[i]
        assert usage_extra(usage)["kv_slots_held"] <= budgets[i]
    generated = sum(usage.completion_tokens for _, usage in results)
    after = wait_for(lambda: server.stats if server.stats.generation_tokens - before.generation_tokens >= generated
                     else None, what="the engine's counters")
    assert after.peak_running > 1
    # Run one by one, the requests would need at least one step per generated token.
    assert after.num_steps - before.num_steps < generated


def test_client_disconnect_aborts_its_request_only(server):
    aborts_before = metrics(server).get("minikv:request_aborted_by_disconnect_total", 0)
    before = server.stats

    async def quitter(api):
        stream = await api.completions.create(model=MODEL, prompt="never ending", max_tokens=400, stream=True,
                                              extra_body={"ignore_eos": True})
        received = 0
        async for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].text)
            if received == 3:
                break
        await stream.close()  # the client goes away mid-stream

    async def stayer(api, i):
        stream = await api.completions.create(model=MODEL, prompt=f"stay {i}", max_tokens=24, stream=True, seed=i,
                                              stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [chunk async for chunk in stream]
        return chunks[-1].usage.completion_tokens

    async def run():
        api = aclient(server)
        return await asyncio.gather(quitter(api), *(stayer(api, i) for i in range(3)))

    _, *lengths = asyncio.run(run())
    assert lengths == [24, 24, 24]
    wait_for(lambda: metrics(server).get("minikv:request_aborted_by_disconnect_total", 0) == aborts_before + 1,
             what="the disconnect metric")
    wait_for(lambda: server.stats.finished.get("abort", 0) == before.finished.get("abort", 0) + 1,
             what="the engine to report the abort")
    stats = wait_for(lambda: server.stats if server.stats.num_running == 0 else None, what="the engine to drain")
    assert stats.kv_blocks_used == 0  # the aborted request's KV is free
    assert stats.generation_tokens - before.generation_tokens < 3 * 24 + 400  # it did not run on to its 400 tokens
    assert metrics(server)["minikv:request_success_total{finished_reason=abort}"] >= 1


# --- errors -------------------------------------------------------------------------------------------

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (endpoint, body: dict or raw text, status, param, words the message contains)
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": ', 400, None, "not valid JSON"),
    (COMPLETIONS, "[1, 2]", 400, None, "JSON object"),
    (COMPLETIONS, {"max_tokens": 5}, 400, "prompt", "required"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt", "must be one of"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
    (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400, "stream", "boolean"),
    (COMPLETIONS, {"prompt": "hi", "temperature": -1}, 400, "temperature", ">= 0"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 2}, 400, "top_p", "(0, 1]"),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty", "[-2, 2]"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 4, "min_tokens": 9}, 400, "min_tokens", "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 50}, 400, "logprobs", "[0, 20]"),
    (COMPLETIONS, {"prompt": "hi", "n": 2}, 400, "n", "one choice"),
    (COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [99999]}, 400, "stop_token_ids", "vocabulary"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "empty"),
    (COMPLETIONS, {"prompt": [1, 99999]}, 400, "prompt", "vocabulary"),
    # max_model_len bounds requests under positions "original" (under "ring", the default, the ring's memory does)
    (COMPLETIONS, {"prompt": "hi", "max_tokens": MAX_MODEL_LEN, "positions": "original"}, 400, "max_tokens",
     "max_model_len"),
    (COMPLETIONS, {"prompt": "hi", "kv_budget": 5}, 400, "kv_budget", "[21, 64]"),
    (COMPLETIONS, {"prompt": "hi", "kv_budget": 10_000}, 400, "kv_budget", "[21, 64]"),
    (COMPLETIONS, {"prompt": "hi", "kv_budget": 0}, 400, "kv_budget", "positive"),
    (COMPLETIONS, {"prompt": "hi", "kv_budget": "big"}, 400, "kv_budget", "integer"),
    (COMPLETIONS, {"prompt": ["a", "b"], "stream": True}, 400, "stream", "one prompt"),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-9"}, 404, "model", "does not exist"),
    (CHAT, {"messages": []}, 400, "messages", "at least 1"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "must be one of"),
    (CHAT, {"messages": USER, "max_completion_tokens": MAX_MODEL_LEN, "positions": "original"}, 400,
     "max_completion_tokens", "max_model_len"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs", "[0, 20]"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "logprobs=true"),
    (CHAT, {"messages": USER, "min_tokens": MAX_MODEL_LEN, "positions": "original"}, 400, "min_tokens", "max_tokens"),
    (CHAT, {"messages": USER, "min_tokens": MAX_MODEL_LEN + 1}, 400, "min_tokens", "max_tokens"),  # ring: max_model_len
    (CHAT, {"messages": USER, "model": "gpt-9"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("endpoint, body, status, param, words", BAD_REQUESTS,
                         ids=[f"{i}-{case[3]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_openai_error(server, endpoint, body, status, param, words):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + endpoint, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    if param:
        assert param.split("[")[0] in error["message"]  # the message names the field too


def test_a_good_request_succeeds_after_the_bad_ones(server, client):
    for endpoint, body, *_ in BAD_REQUESTS[:6]:
        httpx.post(server.url + endpoint, content=body if isinstance(body, str) else json.dumps(body))
    out = client.completions.create(model=MODEL, prompt="still fine", max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as caught:  # and the openai client reads our errors
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"kv_budget": 1_000_000})
    assert caught.value.body["param"] == "kv_budget"


@pytest.fixture(scope="module")
def one_ring_server(loaded):
    """A server whose engine runs one request at a time and lets one wait; requests may run for 30k tokens."""
    live = LiveServer(create_app(tiny_engine(loaded, max_num_seqs=1, max_model_len=32_768), model_name=MODEL,
                                 max_waiting=1))
    yield live
    live.close()


def test_full_waiting_queue_gets_503_with_retry_after(one_ring_server):
    live = one_ring_server
    # A holder that would run for ever (30k tokens) but for its client leaving.
    body = {"prompt": "hold the only ring", "max_tokens": 30_000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=live.url, timeout=30) as http, http.stream("POST", COMPLETIONS, json=body) as holder:
        lines = holder.iter_lines()  # kept: dropping the iterator would close the stream
        next(lines)  # the first chunk: it runs, holding the engine's one ring
        waiter = {}
        thread = threading.Thread(target=lambda: waiter.update(r=httpx.post(
            live.url + COMPLETIONS, json={"prompt": "wait", "max_tokens": 4}, timeout=30)))
        thread.start()
        wait_for(lambda: live.stats.num_waiting == 1, what="the second request to wait")
        refused = httpx.post(live.url + COMPLETIONS, json={"prompt": "one too many", "max_tokens": 4})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
    # Leaving the block closed the holder's stream: it was aborted, and the waiting request ran.
    thread.join(30)
    assert waiter["r"].status_code == 200
    assert metrics(live)["minikv:request_rejected_queue_full_total"] == 1


def test_client_leaving_a_plain_request_aborts_it(one_ring_server):
    live = one_ring_server
    before = metrics(live).get("minikv:request_aborted_by_disconnect_total", 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on a 30k-token answer and hangs up
        httpx.post(live.url + COMPLETIONS, json={"prompt": "long", "max_tokens": 30_000, "ignore_eos": True},
                   timeout=0.3)
    wait_for(lambda: metrics(live).get("minikv:request_aborted_by_disconnect_total", 0) == before + 1,
             what="the server to notice")
    stats = wait_for(lambda: live.stats if live.stats.num_running == 0 else None, what="the abort")
    assert stats.kv_blocks_used == 0 and stats.generation_tokens < 30_000


def test_engine_step_failure_fails_in_flight_requests_and_the_server_goes_on(server, client):
    engine = server.state.engine_loop.engine
    real_step = engine.step

    def failing_step():
        engine.step = real_step  # fail once
        raise RuntimeError("injected failure")

    engine.step = failing_step
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=MODEL, prompt="unlucky", max_tokens=4)
    assert "injected failure" in caught.value.body["message"]
    assert server.state.engine_loop.is_alive
    out = client.completions.create(model=MODEL, prompt="lucky", max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4


# --- metrics, load generator, command line -----------------------------------------------------------


def test_metrics_parse_and_move(server, client):
    before = metrics(server)
    for name in ("minikv:num_requests_running", "minikv:num_requests_waiting", "minikv:kv_cache_usage_perc",
                 "minikv:kv_blocks_used", "minikv:kv_blocks_total", "minikv:num_requests_running_peak",
                 "minikv:engine_steps_total", "minikv:evicted_tokens_total{policy=nexus}"):
        assert name in before, name
    out = client.completions.create(model=MODEL, prompt="count me " * 12, max_tokens=7, extra_body={
        "ignore_eos": True, "kv_budget": 24})
    expected = {
        "minikv:prompt_tokens_total": before["minikv:prompt_tokens_total"] + out.usage.prompt_tokens,
        "minikv:generation_tokens_total": before["minikv:generation_tokens_total"] + 7,
        "minikv:request_success_total{finished_reason=length}":
            before.get("minikv:request_success_total{finished_reason=length}", 0) + 1,
        "minikv:time_to_first_token_seconds_count": before["minikv:time_to_first_token_seconds_count"] + 1,
        "minikv:e2e_request_latency_seconds_count": before["minikv:e2e_request_latency_seconds_count"] + 1,
        "minikv:request_generation_tokens_sum": before["minikv:request_generation_tokens_sum"] + 7,
        "minikv:evicted_tokens_total{policy=nexus}": before["minikv:evicted_tokens_total{policy=nexus}"]
        + usage_extra(out.usage)["evicted_tokens"],
    }

    def moved():
        now = metrics(server)
        return now if all(now.get(name) == value for name, value in expected.items()) else None

    after = wait_for(moved, what="the counters to move")
    assert after["minikv:engine_steps_total"] > before["minikv:engine_steps_total"]
    assert usage_extra(out.usage)["evicted_tokens"] > 0


def test_load_generator_against_the_server(server, capsys):
    argv = ["--url", server.url, "-n", "6", "--input-len", "8:24", "--output-len", "4:8", "--kv-budget", "24:64",
            "--max-concurrency", "3", "--seed", "1"]
    assert bench.main(argv + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    drawn = bench.make_requests(6, (8, 24), (4, 8), 384, seed=1)
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_output_tokens"] == sum(r.max_tokens for r in drawn)
    assert summary["total_input_tokens"] == sum(len(r.prompt_ids) for r in drawn)
    assert summary["request_throughput"] > 0 and summary["output_throughput"] > 0
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < summary[f"p50_{name}_ms"] <= summary[f"p90_{name}_ms"] <= summary[f"p99_{name}_ms"]
    assert bench.main(["--url", server.url, "-n", "2", "--input-len", "4", "--output-len", "2",
                       "--request-rate", "50"]) == 0
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "P99 TTFT (ms):" in table


def test_serve_command_line():
    from minikv.cli import build_parser
    from minikv.server import cli as serve_cli

    args = build_parser().parse_args(["serve", "org/model", "--port", "9001", "--budget", "256", "--max-waiting", "4",
                                      "--policy", "nexus:tau=0"])
    assert args.func is serve_cli.run
    assert (args.model, args.port, args.budget, args.max_waiting, args.host) == ("org/model", 9001, 256, 4, "127.0.0.1")


def test_serve_command_builds_the_app_and_runs_uvicorn(loaded, monkeypatch):
    import minikv.cli

    ran = {}
    monkeypatch.setattr(minikv.cli, "build_engine", lambda args, model, **kw: ran.update(
        model=model, max_num_seqs=args.max_num_seqs) or tiny_engine(loaded, max_num_seqs=args.max_num_seqs))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    args = minikv.cli.build_parser().parse_args(["serve", "my/model", "--port", "9002", "--max-num-seqs", "3",
                                                 "--served-model-name", "mine"])
    assert args.func(args) == 0
    assert (ran["model"], ran["max_num_seqs"], ran["port"], ran["host"]) == ("my/model", 3, 9002, "127.0.0.1")
    assert ran["app"].state.server.model_name == "mine"
