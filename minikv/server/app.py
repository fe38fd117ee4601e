"""The FastAPI app of `minikv serve`: OpenAI's endpoints over one Engine.

    app = create_app(engine, model_name="SmolLM2-135M-Instruct")
    uvicorn.run(app, host="127.0.0.1", port=8000)

POST /v1/completions, POST /v1/chat/completions (both with `"stream": true` as server-sent events),
POST /v1/responses, GET/DELETE /v1/responses/{id} (minikv.server.responses), GET /v1/models, GET /health,
GET /metrics. The engine runs on its own thread (minikv.server.engine_loop),
started and stopped with the app's lifespan; handlers only submit requests and await their outputs.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import Engine
from ..errors import InvalidRequestError
from . import errors
from .engine_loop import ClientDisconnected, EngineDeadError, EngineLoop, EngineLoopFailure, QueueFullError
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, field_names
from .responses import ResponseStore, add_response_routes
from .serving import ChatFormat, CompletionFormat, ResponseFormat, final_response, stream_events

RETRY_AFTER_S = 1  # what a 503 (queue full) tells the client to wait


class Server:
    """What the handlers share: the engine loop, the metrics, the served model's name and limits."""

    def __init__(self, engine: Engine, model_name: str, max_waiting: int | None, reuse_sessions: bool = True):
        self.model_name = model_name
        self.reuse_sessions = reuse_sessions
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.config.vocab_size
        self.started = int(time.time())
        self.engine_loop = EngineLoop(engine, max_waiting=max_waiting)
        self.metrics = ServerMetrics(self.engine_loop.stats, model_name=model_name, policy=engine.policy.label)
        self.engine_loop.observer = self.metrics

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise errors.APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                                  param="model", code="model_not_found")

    async def submit(self, body: SamplingFields, prompt, params, fit_max_tokens: bool, request_id: str, *,
                     session_id: str | None = None, reuse_session: bool = False):
        """Hand the request to the engine thread and wait until the engine has taken it (or refused it)."""
        try:
            handle = self.engine_loop.submit(prompt, params, request_id, fit_max_tokens=fit_max_tokens,
                                             session_id=session_id, reuse_session=reuse_session)
        except QueueFullError as err:
            self.metrics.rejected_queue_full.inc()
            raise errors.APIError(503, f"the server is busy: {err}; retry later", type="server_busy",
                                  code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
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
               session_dir: str | None = None, reuse_sessions: bool = True) -> FastAPI:
    """An app serving `engine` as `model_name`; at most `max_waiting` requests wait for admission (503 beyond).
    `session_dir`: parked sessions and stored responses are restored from it at start and saved to it at
    shutdown. `reuse_sessions`: chat completions continue a parked ring that has read their prefix."""
    server = Server(engine, model_name, max_waiting, reuse_sessions)
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

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def _add_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await _serve(server, request, body, CompletionFormat(f"cmpl-{uuid.uuid4().hex}", server.model_name))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", server.model_name, top_logprobs=body.top_logprobs or 0)
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
    try:
        params, fit_max_tokens = body.to_sampling_params(server.max_model_len)
    except InvalidRequestError as err:
        raise errors.from_invalid_request(err, body.request_field) from None
    # A chat resent whole continues the parked ring that has read the most of it (minikv.session).
    reuse = server.reuse_sessions and isinstance(body, ChatCompletionRequest)
    handle = await server.submit(body, body.engine_prompt(), params, fit_max_tokens, fmt.request_id,
                                 reuse_session=reuse)
    on_disconnect = server.metrics.aborted_by_disconnect.inc
    if body.stream:
        events = stream_events(handle, fmt, body.include_usage, on_disconnect)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await final_response(handle, fmt, request.is_disconnected, on_disconnect)
