"""OpenAI's Responses API over engine sessions: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A response is stored (`store`, true by default) with its conversation: the input items of every turn of its
chain and the replies. A request naming `previous_response_id` continues that conversation: the server
renders the whole of it through the chat template, and the chain's engine session (minikv.session) holds
the ring that has read it all but the new turn, so only the new turn is prefilled
(`usage.input_tokens_details.cached_tokens` counts the rest). `instructions` are a system message of this
request only (not carried over, as OpenAI's). With `store: false` the response is not kept and keeps no ring.

Streaming sends OpenAI's typed events (`event: response.output_text.delta` ...) that the official client
parses. `minikv serve --session-dir DIR` saves the stored responses and every engine session at shutdown and
restores them at start (ResponseStore.save / restore); a file that cannot be read is logged and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from ..errors import InvalidRequestError, MiniKVError
from ..outputs import RequestOutput
from ..sampling import RequestOutputKind, SamplingParams
from . import errors
from .engine_loop import EngineDeadError, EngineLoopFailure
from .protocol import OpenAIBody
from .serving import final_response

logger = logging.getLogger(__name__)

MAX_STORED_RESPONSES = 4096  # the oldest stored response is dropped beyond this
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(OpenAIBody):
    """POST /v1/responses. Fields the server does not use (`metadata`, `user`, `text`, ...) are ignored;
    tools and non-text inputs are refused with a 400."""

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    seed: int | None = None
    tools: list[Any] | None = None
    metadata: dict[str, Any] | None = None

    def request_field(self, engine_field: str | None) -> str | None:
        return {"max_tokens": "max_output_tokens"}.get(engine_field, engine_field)

    def messages(self) -> list[dict]:
        """The input items as chat messages (OpenAI's message items; text parts only)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        if not self.input:
            raise errors.bad_request("input must not be empty", "input")
        return [_message(item, f"input[{i}]") for i, item in enumerate(self.input)]

    def sampling_params(self) -> SamplingParams:
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "seed")
                 if getattr(self, name) is not None}
        return SamplingParams(**given, max_tokens=1 if self.max_output_tokens is None else self.max_output_tokens,
                              output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY)


def _message(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise errors.bad_request(f"{where} must be a message object {{'role': ..., 'content': ...}}", where)
    if item.get("type", "message") != "message":
        raise errors.bad_request(f"{where}.type {item.get('type')!r} is not supported: minikv takes message items "
                                 "(text) only", f"{where}.type")
    role = item.get("role")
    if role not in _ROLES:
        raise errors.bad_request(f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            is_text = isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str)
            if not is_text:
                raise errors.bad_request(f"{where}.content[{j}] must be a text part ({{'type': 'input_text', 'text': "
                                         "...}); images, files and audio are not supported", f"{where}.content[{j}]")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise errors.bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    return {"role": _ROLES[role], "content": content}


@dataclass
class StoredResponse:
    body: dict  # the response object, as GET returns it
    messages: list[dict]  # the conversation up to and including this response's reply (no instructions)
    session_id: str | None  # the engine session that holds the chain's ring


class ResponseStore:
    """The stored responses (oldest dropped beyond MAX_STORED_RESPONSES), and their save/restore in a dir."""

    def __init__(self, session_dir: str | os.PathLike | None = None):
        self.session_dir = Path(session_dir) if session_dir is not None else None
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str) -> StoredResponse | None:
        return self.responses.get(response_id)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self.responses[response_id] = stored
        while len(self.responses) > MAX_STORED_RESPONSES:
            self.responses.popitem(last=False)

    def uses_session(self, session_id: str | None) -> bool:
        return any(r.session_id == session_id for r in self.responses.values())

    # --- --session-dir -------------------------------------------------------------------------------
    def save(self, engine) -> None:
        """Write the stored responses and every idle engine session into session_dir (engine thread stopped)."""
        if self.session_dir is None:
            return
        sessions_dir = self.session_dir / "sessions"
        try:
            sessions_dir.mkdir(parents=True, exist_ok=True)
            for old in sessions_dir.iterdir():  # sessions gone since the last save must not come back
                if old.suffix in (".json", ".safetensors"):
                    old.unlink()
            tmp = self.session_dir / ".responses.json.tmp"
            tmp.write_text(json.dumps({rid: vars(r) for rid, r in self.responses.items()}))
            os.replace(tmp, self.session_dir / "responses.json")
        except OSError as err:
            logger.error("minikv serve: cannot save sessions to %s: %s", self.session_dir, err)
            return
        saved = 0
        for session_id in engine.session_ids():
            try:
                engine.save_session(session_id, sessions_dir)
                saved += 1
            except MiniKVError as err:
                logger.error("minikv serve: session %r not saved: %s", session_id, err)
        logger.info("minikv serve: saved %d sessions and %d responses to %s", saved, len(self.responses),
                    self.session_dir)

    def restore(self, engine) -> None:
        """Read back what `save` wrote; a file that cannot be read is logged and skipped."""
        if self.session_dir is None or not self.session_dir.exists():
            return
        path = self.session_dir / "responses.json"
        if path.exists():
            try:
                for rid, stored in json.loads(path.read_text()).items():
                    self.put(rid, StoredResponse(stored["body"], stored["messages"], stored["session_id"]))
            except (OSError, ValueError, KeyError, TypeError) as err:
                logger.error("minikv serve: stored responses in %s not restored: %s", path, err)
        sessions_dir = self.session_dir / "sessions"
        for file in sorted(sessions_dir.glob("*.json")) if sessions_dir.exists() else []:
            try:
                engine.restore_session(file)
            except MiniKVError as err:
                logger.error("minikv serve: session file %s not restored: %s", file, err)


# --- response bodies ---------------------------------------------------------------------------------


def response_body(response_id: str, body: ResponsesRequest, model: str, created: int, *, status: str,
                  message_id: str, text: str | None, output: RequestOutput | None = None,
                  error: str | None = None) -> dict:
    """OpenAI's Response object: one output message of text (none while in progress)."""
    finish = output.outputs[0].finish_reason if output is not None else None
    if status == "completed" and finish == "length":
        status = "incomplete"
    items = []
    if text is not None:
        items.append({"type": "message", "id": message_id, "status": status, "role": "assistant",
                      "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
    usage = None
    if output is not None:
        prompt, completion = len(output.prompt_token_ids), output.metrics.num_generated_tokens
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": output.num_cached_tokens},
                 "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + completion}
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status,
        "error": {"code": "server_error", "message": error} if error else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
        "output": items, "parallel_tool_calls": False, "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": body.store,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [],
        "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled", "usage": usage,
        "user": None, "metadata": body.metadata or {},
    }


def not_found(message: str, param: str | None = None, code: str | None = None) -> errors.APIError:
    return errors.APIError(404, message, param=param, code=code)


# --- routes ------------------------------------------------------------------------------------------


def add_response_routes(app: FastAPI, server) -> None:
    store: ResponseStore = server.responses

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request):
        server.check_model(body.model)
        if body.tools:
            raise errors.bad_request("tools are not supported by this server", "tools")
        previous = None
        if body.previous_response_id is not None:
            previous = store.get(body.previous_response_id)
            if previous is None:
                raise not_found(f"Previous response with id '{body.previous_response_id}' not found.",
                                "previous_response_id", "previous_response_not_found")
        messages = (previous.messages if previous else []) + body.messages()
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        try:
            params = body.sampling_params()
        except InvalidRequestError as err:
            raise errors.from_invalid_request(err, body.request_field) from None
        response_id, message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        # A stored response's chain keeps one engine session: the next turn's ring is this one's.
        session_id = None
        if body.store:
            session_id = previous.session_id if previous and previous.session_id else f"chain-{response_id}"
        handle = await server.submit(body, system + messages, params, body.max_output_tokens is None, response_id,
                                     session_id=session_id)
        session_id = handle.session_id
        created = int(time.time())

        def finished(output: RequestOutput, text: str) -> dict:
            final = response_body(response_id, body, server.model_name, created, status="completed",
                                  message_id=message_id, text=text, output=output)
            if body.store:
                reply = {"role": "assistant", "content": text}
                store.put(response_id, StoredResponse(final, messages + [reply], session_id))
            return final

        on_disconnect = server.metrics.aborted_by_disconnect.inc
        if body.stream:
            start = response_body(response_id, body, server.model_name, created, status="in_progress",
                                  message_id=message_id, text=None)
            events = _stream(handle, start, message_id, finished, on_disconnect)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        return await final_response(handle, _FinalFormat(lambda output: finished(output, output.outputs[0].text)),
                                    request.is_disconnected, on_disconnect)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        stored = store.get(response_id)
        if stored is None:
            raise not_found(f"Response with id '{response_id}' not found.")
        return stored.body

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        stored = store.responses.pop(response_id, None)
        if stored is None:
            raise not_found(f"Response with id '{response_id}' not found.")
        if stored.session_id is not None and not store.uses_session(stored.session_id):
            try:  # the chain's last stored response is gone: nothing can continue its ring
                await server.engine_loop.call(lambda engine: engine.close_session(stored.session_id))
            except EngineDeadError:
                pass
        return {"id": response_id, "object": "response", "deleted": True}


class _FinalFormat:
    """What serving.final_response asks of a format: the body of a finished request."""

    def __init__(self, response):
        self.response = response


async def _stream(handle, start: dict, message_id: str, finished, on_disconnect):
    """OpenAI's streaming events for one response with one message of text."""
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    where = dict(item_id=message_id, output_index=0, content_index=0)
    item = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []}
    pieces: list[str] = []
    try:
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        yield event("response.output_item.added", output_index=0, item=item)
        yield event("response.content_part.added", **where, part={"type": "output_text", "text": "",
                                                                   "annotations": [], "logprobs": []})
        last = None
        try:
            async for output in handle.outputs():
                last = output
                if output.error is not None:
                    break
                text = output.outputs[0].text
                if text:
                    pieces.append(text)
                    yield event("response.output_text.delta", **where, delta=text, logprobs=[])
        except (EngineLoopFailure, EngineDeadError) as err:
            failed = dict(start, status="failed", error={"code": "server_error", "message": str(err)})
            yield event("response.failed", response=failed)
            return
        if last is None or last.error is not None:
            message = last.error if last is not None else "no output"
            failed = dict(start, status="failed", error={"code": "server_error", "message": message})
            yield event("response.failed", response=failed)
            return
        text = "".join(pieces)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        final = finished(last, text)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=part)
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
        yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
    finally:
        if not handle.finished:
            handle.abort()
            on_disconnect()
