"""The FastAPI app of `minikv serve`: OpenAI's endpoints over one Engine.

    app = create_app(engine, model_name="SmolLM2-135M-Instruct")
    uvicorn.run(app, host="127.0.0.1", port=8000)

POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as server-sent events),
POST /v1/responses, GET/DELETE /v1/responses/{id} (minikv.server.responses), GET /v1/models, GET /health,
GET /metrics. The engine runs on its own thread (minikv.server.engine_loop), started and stopped with the
app's lifespan; handlers tokenize their prompts on worker threads, submit them and await their outputs. A
client that goes away is noticed at once, whether its request is waiting, prefilling or decoding, and its
request aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import Engine
from ..errors import InvalidRequestError
from . import errors
from .engine_loop import ClientDisconnected, EngineDeadError, EngineLoop, EngineLoopFailure, QueueFullError
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, field_names
from .reasoning import ReasoningParser, make_reasoning_parser
from .responses import ResponseStore, add_response_routes
from .serving import (ChatFormat, CompletionFormat, ResponseFormat, final_outputs, final_response, stream_events)

DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # a larger request body gets 413 before it is read
RETRY_AFTER_S = 1  # what a 503 (queue full) tells the client to wait


class Server:
    """What the handlers share: the engine loop, the metrics, the served model's name and limits."""

    def __init__(self, engine: Engine, model_name: str, max_waiting: int | None,
                 reasoning_parser: ReasoningParser | None = None, reuse_sessions: bool = True):
        self.model_name = model_name
        # handlers only call engine.tokenize and request_positions (thread-safe); the engine thread does the rest
        self.engine = engine
        self.reuse_sessions = reuse_sessions
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.config.vocab_size
        self.reasoning_parser = reasoning_parser
        self.started = int(time.time())
        self.engine_loop = EngineLoop(engine, max_waiting=max_waiting)
        self.metrics = ServerMetrics(self.engine_loop.stats, model_name=model_name, policy=engine.policy.label)
        self.engine_loop.observer = self.metrics

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise errors.APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                                  param="model", code="model_not_found")

    def _queue_full(self, err: QueueFullError) -> errors.APIError:
        self.metrics.rejected_queue_full.inc()
        return errors.APIError(503, f"the server is busy: {err}; retry later", type="server_busy",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    async def tokenize(self, body: SamplingFields, prompt,
                       chat_template_kwargs: dict | None = None) -> tuple[list[int], str | None]:
        """The prompt's token ids and text (chat messages through the template), worked out on a worker thread:
        a long prompt takes its time there, not on the event loop nor on the engine thread."""
        try:
            return await asyncio.to_thread(self.engine.tokenize, prompt, chat_template_kwargs=chat_template_kwargs)
        except InvalidRequestError as err:
            raise errors.from_invalid_request(err, body.request_field) from None

    def default_max_tokens(self, params, prompt_len: int, session_id: str | None = None) -> int:
        """max_tokens of a chat request that sets none. As vLLM: what max_model_len leaves after the prompt (at
        least 1, so that a prompt that fills the context gets the engine's "exceeds max_model_len"). Under
        positions "ring" max_model_len does not bound the request (a prompt may be longer), so the answer may
        run to max_model_len tokens whatever the prompt: finite, and never cut short because a long chat
        neared the context's end. A request that continues session `session_id` runs under that session's
        mode (one mode per ring) unless it names one."""
        session = self.engine.sessions.get(session_id) if session_id is not None else None
        try:
            ring = self.engine.request_positions(params, session) == "ring"
        except InvalidRequestError:
            ring = False  # the engine refuses it, with its own message
        return self.max_model_len if ring else max(1, self.max_model_len - prompt_len)

    async def submit(self, body: SamplingFields, prompt, params, fit_max_tokens: bool, request_id: str,
                     *, chat_template_kwargs: dict | None = None, session_id: str | None = None,
                     reuse_session: bool = False):
        """Tokenize the prompt, hand the request to the engine thread and wait until the engine has taken it
        (or refused it). With `fit_max_tokens`, max_tokens is `default_max_tokens`.
        `session_id` continues that engine session; `reuse_session` lets the engine pick the parked session
        whose ring has read the most of the prompt (minikv.session)."""
        limit = self.engine_loop.max_waiting
        if limit is not None and self.engine_loop.num_waiting >= limit:  # refuse before paying for tokenizing
            raise self._queue_full(QueueFullError(f"{self.engine_loop.num_waiting} requests are waiting (the limit "
                                                  f"is {limit})"))
        prompt_ids, prompt_text = await self.tokenize(body, prompt, chat_template_kwargs)
        if fit_max_tokens:
            params = dataclasses.replace(params, max_tokens=self.default_max_tokens(params, len(prompt_ids), session_id))
        try:
            handle = self.engine_loop.submit(prompt_ids, params, request_id, prompt=prompt, prompt_text=prompt_text,
                                             session_id=session_id, reuse_session=reuse_session)
        except QueueFullError as err:
            raise self._queue_full(err) from None
        except EngineDeadError as err:
            raise errors.APIError(503, str(err), type="server_busy", code="engine_not_running") from None
        try:
            await handle.accepted()
        except InvalidRequestError as err:
            raise errors.from_invalid_request(err, body.request_field) from None
        except (EngineLoopFailure, EngineDeadError) as err:
            raise errors.engine_failure(str(err)) from None
        except BaseException:  # cancelled while waiting: the engine may take it later, so abort it now
            handle.abort()
            raise
        return handle


def create_app(engine: Engine, *, model_name: str = "minikv", max_waiting: int | None = None,
               reasoning_parser: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               session_dir: str | None = None, reuse_sessions: bool = True) -> FastAPI:
    """An app serving `engine` as `model_name`; at most `max_waiting` requests wait for admission (503 beyond).
    `reasoning_parser` (e.g. "qwen3", see minikv.server.reasoning) moves `<think>` text of chat answers to
    `reasoning_content`; request bodies over `max_body_bytes` get 413. `session_dir`: parked sessions and
    stored responses are restored from it at start and saved to it at shutdown. `reuse_sessions`: chat
    completions continue a parked ring that has read their prefix."""
    server = Server(engine, model_name, max_waiting, make_reasoning_parser(reasoning_parser),
                    reuse_sessions=reuse_sessions)
    server.responses = ResponseStore(session_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.responses.restore(engine)  # before the engine thread starts: nothing else touches the engine
        server.engine_loop.start()
        yield
        server.engine_loop.stop()
        if server.engine_loop.is_alive:  # a step outlived stop's wait: the engine is not ours to read
            logging.getLogger(__name__).error("minikv serve: the engine thread did not stop; sessions not saved")
        else:
            server.responses.save(engine)

    app = FastAPI(title="minikv", summary="OpenAI-compatible server with per-request KV budgets", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    _add_error_handlers(app)
    _add_routes(app, server)
    add_response_routes(app, server)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    known_fields = field_names()

    @app.exception_handler(errors.APIError)
    async def api_error(request: Request, exc: errors.APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return errors.from_validation_errors(list(exc.errors()), known_fields).response()

    @app.exception_handler(InvalidRequestError)  # a safety net: the handlers translate these themselves
    async def invalid(request: Request, exc: InvalidRequestError):
        return errors.from_invalid_request(exc).response()

    @app.exception_handler(HTTPException)  # e.g. a body that is not UTF-8 (FastAPI's "error parsing the body")
    async def http_error(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body is not valid JSON in UTF-8 (it could not be decoded)"
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return JSONResponse(errors.error_body(message, type=kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def _add_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        body.check_supported()
        prompts = body.engine_prompts()
        tokenizer = server.engine.tokenizer
        fmt = CompletionFormat(
            f"cmpl-{uuid.uuid4().hex}", server.model_name, echo=body.echo, echo_only=body.echo_only,
            prompt_texts=[p if isinstance(p, str) else None for p in prompts],
            decode=lambda token: tokenizer.decode([token], skip_special_tokens=False),
            decode_prompt=lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
        if len(prompts) == 1:
            return await _serve(server, request, body, fmt)
        return await _serve_batch(server, request, body, prompts, fmt)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", server.model_name, top_logprobs=body.top_logprobs or 0,
                         reasoning_parser=server.reasoning_parser)
        return await _serve(server, request, body, fmt)

    @app.get("/v1/models")
    async def list_models():
        # max_model_len and vocab_size are minikv's additions (the load generator reads vocab_size).
        card = {"id": server.model_name, "object": "model", "created": server.started, "owned_by": "minikv",
                "max_model_len": server.max_model_len, "vocab_size": server.vocab_size}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        if not server.engine_loop.is_alive:
            return JSONResponse(errors.error_body("the engine thread is not running", type="internal_error"),
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)


async def _serve(server: Server, request: Request, body: CompletionRequest | ChatCompletionRequest,
                 fmt: ResponseFormat):
    """One request of either endpoint: check it, hand it to the engine, then stream or answer."""
    server.check_model(body.model)
    body.check_supported()
    params, fit_max_tokens = _sampling_params(body, server)
    template_kwargs = getattr(body, "chat_template_kwargs", None)
    # A chat resent whole continues the parked ring that has read the most of it (minikv.session).
    reuse = server.reuse_sessions and isinstance(body, ChatCompletionRequest)
    handle = await server.submit(body, body.engine_prompt(), params, fit_max_tokens, fmt.request_id,
                                 chat_template_kwargs=template_kwargs, reuse_session=reuse)
    on_disconnect = server.metrics.aborted_by_disconnect.inc
    if body.stream:
        events = stream_events(handle, fmt, body.include_usage, on_disconnect)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await final_response(handle, fmt, None, on_disconnect, client_gone=_client_gone(request))


async def _serve_batch(server: Server, request: Request, body: CompletionRequest, prompts: list, fmt: CompletionFormat):
    """A completions request with several prompts: one engine request each, answered together (not streamed)."""
    server.check_model(body.model)
    params, _ = _sampling_params(body, server)
    handles = []
    try:
        for index, prompt in enumerate(prompts):
            handles.append(await server.submit(body, prompt, params, False, f"{fmt.request_id}-{index}"))
    except BaseException as err:  # one prompt refused: the batch is
        for handle in handles:
            handle.abort()
        if isinstance(err, errors.APIError) and err.param == "prompt" and len(prompts) > 1:
            err.message = f"prompt[{index}]: {err.message}"
        raise
    outputs = await final_outputs(handles, _client_gone(request), server.metrics.aborted_by_disconnect.inc)
    return fmt.response(outputs)


def _sampling_params(body: SamplingFields, server: Server):
    try:
        return body.to_sampling_params(server.max_model_len)
    except InvalidRequestError as err:
        raise errors.from_invalid_request(err, body.request_field) from None


def _client_gone(request: Request):
    """A coroutine function that returns when the client disconnects. The handler has read the whole body,
    so the next ASGI message can only be the disconnect: it comes the moment the connection closes."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return gone


class BodySizeLimit:
    """ASGI middleware: a request whose Content-Length is over `max_bytes` gets 413 before its body is read.
    (Plain ASGI rather than FastAPI's @middleware, which would wrap `receive` and hide disconnects.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        length = dict(scope.get("headers", ())).get(b"content-length", b"") if scope["type"] == "http" else b""
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse(errors.error_body(
                f"the request body is {int(length)} bytes; this server takes at most {self.max_bytes}",
                type="invalid_request_error", code="request_too_large"), status_code=413)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
