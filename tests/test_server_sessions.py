"""The Responses API and session reuse of `minikv serve`, driven by the real `openai` client."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import LiveServer, metrics  # noqa: E402

from minikv.engine import Engine  # noqa: E402
from minikv.loader import load_model  # noqa: E402
from minikv.server.app import create_app  # noqa: E402

MODEL = "tiny-chat"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, one_torch_thread):
    """The tiny model of tests/tiny_engine.py with a chat template (so that a conversation re-rendered whole
    extends what the model read)."""
    from tiny_engine import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory.mktemp("chat") / "tiny")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return load_model(path, device="cpu", dtype="float32")


def engine(model) -> Engine:
    return Engine(model, budget=256, policy="nexus", chunk=64, window=16, max_num_seqs=4, max_model_len=4096)


@pytest.fixture(scope="module")
def server(chat_model):
    live = LiveServer(create_app(engine(chat_model), model_name=MODEL))
    yield live
    live.close()


def client_of(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def chain(client, turns: int, stream: bool, every: dict | None = None) -> list:
    """`turns` chained responses; each after the first continues the one before. `every`: more fields of
    every request (instructions are not carried over from the previous response: they are resent)."""
    responses, previous = [], None
    for turn in range(turns):
        kwargs = dict(model=MODEL, input=f"question number {turn}?", max_output_tokens=6, temperature=0)
        if previous is not None:
            kwargs["previous_response_id"] = previous.id
        kwargs.update(every or {})
        if stream:
            events = list(client.responses.create(stream=True, **kwargs))
            kinds = [e.type for e in events]
            assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                                 "response.content_part.added"]
            assert kinds[-1] in ("response.completed", "response.incomplete")
            assert [e.sequence_number for e in events] == list(range(len(events)))
            previous = events[-1].response
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert deltas == previous.output_text
        else:
            previous = client.responses.create(**kwargs)
        responses.append(previous)
    return responses


@pytest.mark.parametrize("stream", [False, True])
def test_five_chained_responses_prefill_only_each_new_turn(server, stream):
    client = client_of(server)
    responses = chain(client, 5, stream, every={"instructions": "Be brief."})
    for before, after in zip(responses, responses[1:]):
        assert after.previous_response_id == before.id
        assert after.status in ("completed", "incomplete")
        # The ring read the whole conversation up to the previous reply: only the new turn was prefilled.
        cached = after.usage.input_tokens_details.cached_tokens
        assert before.usage.input_tokens <= cached < after.usage.input_tokens
    assert responses[0].usage.input_tokens_details.cached_tokens == 0
    stored = client.responses.retrieve(responses[2].id)
    assert stored.id == responses[2].id and stored.output_text == responses[2].output_text
    assert responses[4].instructions == "Be brief."
    # Without instructions the system message is gone: the conversation diverges from the ring early on.
    plain = client.responses.create(model=MODEL, input="no instructions now", previous_response_id=responses[4].id,
                                    max_output_tokens=2)
    assert plain.instructions is None
    assert plain.usage.input_tokens_details.cached_tokens < responses[4].usage.input_tokens


def test_unknown_or_unstored_previous_response_gets_openais_error(server):
    client = client_of(server)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope", max_output_tokens=2)
    assert caught.value.body["code"] == "previous_response_not_found"
    assert caught.value.body["param"] == "previous_response_id"
    assert "resp_nope" in caught.value.body["message"]
    unstored = client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="again", previous_response_id=unstored.id, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    kept = client.responses.create(model=MODEL, input="keep me", max_output_tokens=2)
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=[{"role": "robot", "content": "x"}], max_output_tokens=2)
    assert caught.value.body["param"] == "input[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=0)
    assert caught.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [{"type": "input_image"}]}])
    assert caught.value.body["param"] == "input[0].content[0]"


def test_chat_completions_reuse_a_parked_ring_and_metrics_count_it(server):
    client = client_of(server)
    before = metrics(server)
    messages = [{"role": "user", "content": "tell me something"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "and more"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    after = metrics(server)
    assert after["minikv:session_hits_total"] >= before["minikv:session_hits_total"] + 1
    assert after["minikv:session_reused_tokens_total"] >= (before["minikv:session_reused_tokens_total"]
                                                           + first.usage.prompt_tokens)
    assert "minikv:kv_blocks_parked" in after and "minikv:sessions_released_by_pressure_total" in after


def test_chat_completions_with_a_reply_sent_back_changed_roll_an_evicted_ring_back(server):
    """The conversation outgrew the ring (budget 256), and the client sends the reply back trimmed: its ids
    differ from what the ring read only in the reply's tail, which is rolled back (docs/design.md, section 10)."""
    client = client_of(server)
    messages = [{"role": "user", "content": " ".join(f"fact{i}" for i in range(80))}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens > 256  # the ring has evicted
    reply = first.choices[0].message.content
    # half the reply: the cut falls inside the tokens the ring read (the last generated token it never read)
    messages += [{"role": "assistant", "content": reply[: len(reply) // 2]}, {"role": "user", "content": "and more"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    read = first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert read - 16 <= cached < read and cached >= first.usage.prompt_tokens - 16
    assert second.usage.completion_tokens == 6


def test_a_chain_continues_after_a_restart_with_a_session_dir(chat_model, tmp_path):
    first = LiveServer(create_app(engine(chat_model), model_name=MODEL, session_dir=str(tmp_path)))
    try:
        turns = chain(client_of(first), 2, stream=False)
    finally:
        first.close()  # the app's shutdown saves the sessions and the stored responses
    assert (tmp_path / "responses.json").exists() and list((tmp_path / "sessions").glob("*.safetensors"))
    second = LiveServer(create_app(engine(chat_model), model_name=MODEL, session_dir=str(tmp_path)))
    try:
        client = client_of(second)
        assert client.responses.retrieve(turns[1].id).output_text == turns[1].output_text
        after = client.responses.create(model=MODEL, input="after the restart?", max_output_tokens=4,
                                        previous_response_id=turns[1].id, temperature=0)
        assert after.usage.input_tokens_details.cached_tokens >= turns[1].usage.input_tokens  # the ring came back
    finally:
        second.close()


def test_a_damaged_session_dir_is_logged_and_the_server_serves(chat_model, tmp_path, caplog):
    (tmp_path / "sessions").mkdir()
    (tmp_path / "sessions" / "broken.json").write_text("{not json")
    (tmp_path / "responses.json").write_text("[1, 2")
    live = LiveServer(create_app(engine(chat_model), model_name=MODEL, session_dir=str(tmp_path)))
    try:
        out = client_of(live).responses.create(model=MODEL, input="hello", max_output_tokens=2)
        assert out.status in ("completed", "incomplete")
    finally:
        live.close()
    assert "not restored" in caplog.text


def test_chat_bench_against_a_server_reuses_rings_through_chat_completions(server):
    import asyncio

    from minikv.bench_chat import format_report, run_chats_url

    result = asyncio.run(run_chats_url(server.url, sessions=2, turns=3, user_len=8, gen_len=4))
    assert result.errors == 0 and result.output_tokens == 2 * 3 * 4
    assert result.prompt_tokens_computed == result.new_tokens < result.prompt_tokens_sent
    assert "computed with sessions = the new tokens only" in format_report([result])


def test_serve_command_line_session_flags(chat_model, monkeypatch, tmp_path):
    import uvicorn

    import minikv.cli

    ran = {}

    def build(args, model, **kw):
        ran.update(kw)
        return Engine(chat_model, budget=256, policy="nexus", chunk=64, window=16, max_model_len=1024, **kw)

    monkeypatch.setattr(minikv.cli, "build_engine", build)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app))
    args = minikv.cli.build_parser().parse_args(["serve", "--session-dir", str(tmp_path), "--no-session-reuse",
                                                 "--max-parked-sessions", "5", "--max-parked-kv-memory", "1MiB"])
    assert args.func(args) == 0
    assert ran["max_parked_sessions"] == 5 and ran["max_parked_kv_memory"] == "1MiB"
    server = ran["app"].state.server
    assert server.responses.session_dir == tmp_path and server.reuse_sessions is False
    assert server.engine_loop.engine.sessions.max_parked == 5
