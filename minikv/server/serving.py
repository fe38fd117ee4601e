"""RequestOutputs into OpenAI's response bodies: whole responses and server-sent-event chunks.

One formatter per request (`CompletionFormat` for /v1/completions, `ChatFormat` for /v1/chat/completions)
knows its endpoint's shapes; `final_response` and `stream_events` are the same for both. A streamed
request's outputs are DELTA outputs (only the new text, tokens and logprobs), so each one becomes one
chunk as it is; a plain request's only output is its final one (FINAL_ONLY).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ..outputs import CompletionOutput, PositionLogprobs, RequestOutput
from .engine_loop import EngineDeadError, EngineLoopFailure, RequestHandle
from .errors import engine_failure


def usage(output: RequestOutput) -> dict:
    """OpenAI's token counts, plus minikv's KV accounting of the request (per layer and KV head):

    kv_budget: the most KV slots the request's ring could hold;
    kv_slots_held: the slots it held at its end, min(kv_budget, tokens whose K/V were written), the tokens
        written being the prompt and every generated token but the last (never fed back to the model);
    evicted_tokens: tokens whose K/V were dropped from its ring to stay within the budget.
    prompt_tokens_details.cached_tokens (OpenAI's): prompt tokens not prefilled, read already by the ring of
        the engine session the request continued (minikv.session).
    """
    prompt, completion = len(output.prompt_token_ids), output.metrics.num_generated_tokens
    written = prompt + max(completion - 1, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "kv_budget": output.metrics.kv_budget, "kv_slots_held": min(output.metrics.kv_budget, written),
            "evicted_tokens": output.metrics.num_evicted_tokens,
            "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens}}


class ResponseFormat:
    """What both endpoints share: ids, timestamps, the chunk envelope."""

    object_name = chunk_object_name = ""

    def __init__(self, request_id: str, model: str):
        self.request_id, self.model = request_id, model
        self.created = int(time.time())

    def envelope(self, object_name: str, choices: list[dict], **extra) -> dict:
        return {"id": self.request_id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def response(self, output: RequestOutput) -> dict:
        return self.envelope(self.object_name, [self.final_choice(output.outputs[0])], usage=usage(output))

    def chunk(self, choices: list[dict], include_usage: bool, usage_body: dict | None = None) -> dict:
        extra = {"usage": usage_body} if include_usage else {}
        return self.envelope(self.chunk_object_name, choices, **extra)

    def first_chunks(self) -> list[list[dict]]:
        """Choices of chunks sent before the first output (chat's role chunk)."""
        return []

    def final_choice(self, completion: CompletionOutput) -> dict:
        raise NotImplementedError

    def delta_choice(self, completion: CompletionOutput) -> dict:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, request_id: str, model: str):
        super().__init__(request_id, model)
        self._text_offset = 0  # where the next token's text starts, across stream chunks

    def final_choice(self, completion: CompletionOutput) -> dict:
        return self._choice(completion)

    def delta_choice(self, completion: CompletionOutput) -> dict:
        return self._choice(completion)

    def _choice(self, completion: CompletionOutput) -> dict:
        return {"index": completion.index, "text": completion.text, "logprobs": self._logprobs(completion),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}

    def _logprobs(self, completion: CompletionOutput) -> dict | None:
        """The legacy completions shape: parallel lists, top_logprobs as {token text: logprob}."""
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, position in zip(completion.token_ids, completion.logprobs):
            chosen = position[token_id]
            text = chosen.decoded_token or ""
            tokens.append(text)
            token_logprobs.append(chosen.logprob)
            top.append({lp.decoded_token or "": lp.logprob for lp in _by_rank(position)})
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class ChatFormat(ResponseFormat):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, top_logprobs: int = 0):
        super().__init__(request_id, model)
        self.top_logprobs = top_logprobs

    def first_chunks(self) -> list[list[dict]]:
        return [[{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}]]

    def final_choice(self, completion: CompletionOutput) -> dict:
        return {"index": completion.index, "message": {"role": "assistant", "content": completion.text},
                "logprobs": self._logprobs(completion), "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

    def delta_choice(self, completion: CompletionOutput) -> dict:
        delta = {"content": completion.text} if completion.text else {}
        return {"index": completion.index, "delta": delta, "logprobs": self._logprobs(completion),
                "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}

    def _logprobs(self, completion: CompletionOutput) -> dict | None:
        """The chat shape: one entry per token, with its top_logprobs alternatives (ranks 1..top_logprobs)."""
        if completion.logprobs is None:
            return None
        content = []
        for token_id, position in zip(completion.token_ids, completion.logprobs):
            entry = _token_entry(position[token_id])
            ranked = [lp for lp in _by_rank(position) if lp.rank is not None][: self.top_logprobs]
            entry["top_logprobs"] = [_token_entry(lp) for lp in ranked]
            content.append(entry)
        return {"content": content}


def _by_rank(position: PositionLogprobs) -> list:
    return sorted(position.values(), key=lambda lp: (lp.rank is None, lp.rank or 0))


def _token_entry(logprob) -> dict:
    text = logprob.decoded_token or ""
    return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode("utf-8"))}


# --- one request, whole or streamed ------------------------------------------------------------------


async def final_response(handle: RequestHandle, fmt: ResponseFormat,
                         is_disconnected: Callable[[], Awaitable[bool]], on_disconnect: Callable[[], None]) -> dict:
    """Wait for the request's final output and return its response body (APIError if the engine failed)."""
    final = None
    try:
        async for output in handle.outputs(is_disconnected):
            final = output
    except (EngineLoopFailure, EngineDeadError) as err:
        raise engine_failure(str(err)) from None
    finally:
        if not handle.finished:  # the client went away (ClientDisconnected, or this handler was cancelled)
            handle.abort()
            on_disconnect()
    if final.error is not None:
        raise engine_failure(final.error)
    return fmt.response(final)


async def stream_events(handle: RequestHandle, fmt: ResponseFormat, include_usage: bool,
                        on_disconnect: Callable[[], None]) -> AsyncIterator[str]:
    """The request's outputs as server-sent events (`data: {...}`), then `data: [DONE]`.

    A client that goes away cancels this generator (Starlette watches for the disconnect while it streams)
    or closes it; either way `finally` aborts the request, so its KV is free before the next engine step.
    """
    try:
        for choices in fmt.first_chunks():
            yield _event(fmt.chunk(choices, include_usage))
        async for payload in _stream_payloads(handle, fmt, include_usage):
            yield _event(payload)
        yield "data: [DONE]\n\n"
    finally:
        if not handle.finished:
            handle.abort()
            on_disconnect()


async def _stream_payloads(handle: RequestHandle, fmt: ResponseFormat, include_usage: bool) -> AsyncIterator[dict]:
    last = None
    try:
        async for output in handle.outputs():
            last = output
            if output.error is not None:
                yield engine_failure(output.error).body()
                return
            completion = output.outputs[0]
            if completion.text or completion.logprobs or output.finished:
                yield fmt.chunk([fmt.delta_choice(completion)], include_usage)
    except (EngineLoopFailure, EngineDeadError) as err:
        yield engine_failure(str(err)).body()
        return
    if include_usage and last is not None:
        yield fmt.chunk([], include_usage, usage(last))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

