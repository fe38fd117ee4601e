"""`minikv serve` as an operator runs it: errors in the log with tracebacks, prompts tokenized off the engine
thread, an exact waiting limit, disconnects noticed while a request waits or prefills.

Timing-free: where a test needs the engine at a given point, it gates `engine.step` (one step per permit)
and reads the engine loop's counters, never the clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from test_server import MODEL, LiveServer, metrics, tiny_engine, wait_for  # noqa: E402

from minikv.server import cli as serve_cli  # noqa: E402
from minikv.server.app import create_app  # noqa: E402

COMPLETIONS = "/v1/completions"
LONG_PROMPT = [3 + i % 300 for i in range(400)]  # 13 prefill chunks of 32


class GatedSteps:
    """engine.step runs only when the test releases a permit: the test decides where the engine is."""

    def __init__(self, engine):
        self.engine, self.real = engine, engine.step
        self.permits = threading.Semaphore(0)
        engine.step = self._step

    def _step(self):
        if not self.permits.acquire(timeout=30):
            raise RuntimeError("the test released no step for 30 s")
        return self.real()

    def release(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.permits.release()

    def open(self) -> None:
        self.engine.step = self.real
        self.release(100)


def test_engine_errors_reach_the_server_log_with_their_traceback(loaded, capsys):
    import minikv.cli

    minikv.cli._configure_logging()  # as `minikv serve` starts: the minikv logger has only a NullHandler
    saved = {name: (lg.handlers[:], lg.level, lg.propagate) for name in ("minikv", "uvicorn", "uvicorn.error",
                                                                          "uvicorn.access")
             for lg in [logging.getLogger(name)]}
    app = create_app(tiny_engine(loaded), model_name=MODEL)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=serve_cli.log_config("info"), log_level="info"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="the server")
        engine = app.state.server.engine_loop.engine
        real_step = engine.step

        def failing_step():
            engine.step = real_step
            raise RuntimeError("injected engine failure")

        engine.step = failing_step
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        assert httpx.post(url + COMPLETIONS, json={"prompt": "boom", "max_tokens": 2}).status_code == 500
    finally:
        server.should_exit = True
        thread.join(10)
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    log = capsys.readouterr().err
    assert "ERROR:" in log and "minikv.server.engine_loop: minikv engine loop: engine.step() raised" in log
    assert "Traceback (most recent call last)" in log and "RuntimeError: injected engine failure" in log


def test_serve_passes_its_log_config_to_uvicorn(loaded, monkeypatch):
    import minikv.cli

    ran = {}
    monkeypatch.setattr(minikv.cli, "build_engine", lambda args, model, **kw: tiny_engine(loaded))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw))
    args = minikv.cli.build_parser().parse_args(["serve", "--log-level", "warning", "--reasoning-parser", "qwen3"])
    assert args.func(args) == 0
    assert ran["log_config"]["loggers"]["minikv"]["level"] == "WARNING" and ran["log_level"] == "warning"


@pytest.fixture()
def gated_server(loaded):
    """One request runs at a time (max_num_seqs 1), up to 4 wait; engine steps only when the test says."""
    live = LiveServer(create_app(tiny_engine(loaded, max_num_seqs=1), model_name=MODEL, max_waiting=4))
    gate = GatedSteps(live.state.engine_loop.engine)
    yield live, gate
    gate.open()
    live.close()


def test_a_long_prompt_is_tokenized_while_the_engine_steps(gated_server):
    live, gate = gated_server
    engine, loop = live.state.engine_loop.engine, live.state.engine_loop
    big = "x" * 50_000  # 50k byte tokens
    encoders, steps_while_tokenizing = [], []
    real_tokenize, real_encode = engine.tokenize, engine.tokenizer.encode

    def tokenize(prompt, **kw):
        if prompt == big:  # hold the tokenizer until the engine has run three more steps
            start = loop.stats().num_steps
            gate.release(3)
            steps_while_tokenizing.append(wait_for(lambda: loop.stats().num_steps - start >= 3 and
                                                   loop.stats().num_steps - start, what="steps during tokenizing"))
            gate.open()  # from here the engine runs freely
        return real_tokenize(prompt, **kw)

    def encode(text, *args, **kw):
        encoders.append(threading.current_thread().name)
        return real_encode(text, *args, **kw)

    engine.tokenize, engine.tokenizer.encode = tokenize, encode
    with httpx.Client(base_url=live.url, timeout=60) as http, http.stream("POST", COMPLETIONS, json={
            "prompt": "a running stream", "max_tokens": 200, "ignore_eos": True, "stream": True}) as stream:
        gate.release(2)
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # it streams
        # under positions "original" max_model_len refuses it (under "ring" it would be read through the ring)
        big_response = httpx.post(live.url + COMPLETIONS, timeout=60,
                                  json={"prompt": big, "max_tokens": 4, "positions": "original"})
        gate.open()
    assert big_response.status_code == 400 and big_response.json()["error"]["param"] == "max_tokens"
    assert steps_while_tokenizing and steps_while_tokenizing[0] >= 3  # the stream's steps went on meanwhile
    assert encoders and "minikv-engine" not in encoders  # no prompt was ever encoded on the engine thread
    timings = loop.timings()
    assert timings.iterations >= 5 and timings.step_s_total > 0 and timings.admit_s_max >= 0


def test_max_waiting_4_admits_exactly_4(gated_server):
    live, gate = gated_server
    statuses = []

    async def many():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            async def one(i):
                response = await http.post(COMPLETIONS, json={"prompt": f"waiter {i}", "max_tokens": 2})
                statuses.append(response.status_code)
            await asyncio.gather(*(one(i) for i in range(10)))

    with httpx.Client(base_url=live.url, timeout=60) as http, http.stream("POST", COMPLETIONS, json={
            "prompt": "hold the ring", "max_tokens": 300, "ignore_eos": True, "stream": True}):
        gate.release(1)  # the holder prefills: it runs, holding the only ring
        wait_for(lambda: live.stats.num_running == 1, what="the holder to run")
        crowd = threading.Thread(target=lambda: asyncio.run(many()))
        crowd.start()
        wait_for(lambda: statuses.count(503) == 6, what="six refusals")
        assert live.state.engine_loop.num_waiting == 4
        engine, tokenized = live.state.engine_loop.engine, []
        real_tokenize = engine.tokenize
        engine.tokenize = lambda prompt, **kw: tokenized.append(prompt) or real_tokenize(prompt, **kw)
        late = httpx.post(live.url + COMPLETIONS, json={"prompt": "one more", "max_tokens": 2}, timeout=60)
        assert late.status_code == 503 and tokenized == []  # refused before its prompt was tokenized
        statuses.append(late.status_code)
        gate.release(2)  # the step under way, then one with the four admitted: still nobody else gets in
        wait_for(lambda: live.stats.num_waiting == 4, what="the engine to hold the 4 waiting")
    gate.open()  # the holder's client left; the four run
    crowd.join(60)
    assert sorted(statuses) == [200] * 4 + [503] * 7
    assert metrics(live)["minikv:request_rejected_queue_full_total"] == 7


def raw_request(live, body: dict) -> socket.socket:
    """Send a completions request on a bare socket (closing it is the client leaving, at a moment the test picks)."""
    host, port = live.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    client = socket.create_connection((host, int(port)))
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return client


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_during_prefill_frees_its_ring_within_one_step(gated_server, stream):
    live, gate = gated_server
    engine = live.state.engine_loop.engine
    client = raw_request(live, {"prompt": LONG_PROMPT, "max_tokens": 4, "stream": stream})
    gate.release(2)  # two prefill chunks of 32
    wait_for(lambda: live.stats.num_steps == 2, what="two prefill steps")
    assert live.stats.num_running == 1 and live.stats.kv_blocks_used > 0
    client.close()  # the client leaves mid-prefill (the engine thread waits at its third step)
    wait_for(lambda: metrics(live).get("minikv:request_aborted_by_disconnect_total", 0) == 1,
             what="the server to notice")
    gate.release(1)  # the one step already under way
    wait_for(lambda: engine.pool.num_used == 0, what="the ring to be freed")
    assert engine.stats().num_steps == 3 and engine.stats().prompt_tokens == 3 * 32 < len(LONG_PROMPT)


def test_a_client_leaving_while_queued_is_forgotten(gated_server):
    live, gate = gated_server
    engine = live.state.engine_loop.engine
    with httpx.Client(base_url=live.url, timeout=60) as http, http.stream("POST", COMPLETIONS, json={
            "prompt": "hold the ring", "max_tokens": 300, "ignore_eos": True, "stream": True}):
        gate.release(1)
        wait_for(lambda: live.stats.num_running == 1, what="the holder to run")
        client = raw_request(live, {"prompt": "queued", "max_tokens": 2})
        wait_for(lambda: live.state.engine_loop.num_waiting == 1, what="the request to be submitted")
        gate.release(2)  # the queued request is admitted to the engine's waiting queue, and that is published
        wait_for(lambda: live.stats.num_waiting == 1, what="the request to queue")
        client.close()
        wait_for(lambda: metrics(live).get("minikv:request_aborted_by_disconnect_total", 0) == 1,
                 what="the server to notice")
        gate.release(1)  # the step under way; the abort is applied before the next
        wait_for(lambda: engine.scheduler.num_waiting == 0, what="the queued request to be dropped")
        assert engine.scheduler.num_running == 1  # the holder runs on


def test_a_client_leaving_a_batch_aborts_every_prompt_of_it(gated_server):
    live, gate = gated_server
    engine = live.state.engine_loop.engine
    client = raw_request(live, {"prompt": [LONG_PROMPT, LONG_PROMPT[:100]], "max_tokens": 4})
    wait_for(lambda: live.state.engine_loop.num_waiting == 2, what="both prompts to be submitted")
    gate.release(2)  # one prefills (one ring: max_num_seqs 1), the other waits
    wait_for(lambda: live.stats.num_steps == 2, what="two steps")
    assert live.stats.num_running == 1 and live.stats.num_waiting == 1
    client.close()
    wait_for(lambda: metrics(live).get("minikv:request_aborted_by_disconnect_total", 0) == 1,
             what="the server to notice")
    gate.release(1)
    wait_for(lambda: engine.pool.num_used == 0 and engine.scheduler.num_waiting == 0, what="both to be dropped")
    assert engine.scheduler.num_running == 0  # both aborted within the one step
