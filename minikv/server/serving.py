"""RequestOutputs into OpenAI's response bodies: whole responses and server-sent-event chunks.

One formatter per request (`CompletionFormat` for /v1/completions, `ChatFormat` for /v1/chat/completions)
knows its endpoint's shapes; `final_response` and `stream_events` are the same for both. A streamed
request's outputs are DELTA outputs (only the new text, tokens and logprobs), so each one becomes one
chunk as it is; a plain request's only output is its final one (FINAL_ONLY). A completions request with a
batch of prompts is one engine request per prompt, answered together (`final_outputs`, one choice each).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from ..outputs import CompletionOutput, PositionLogprobs, RequestOutput
from .engine_loop import ClientDisconnected, EngineDeadError, EngineLoopFailure, RequestHandle
from .errors import engine_failure
from .reasoning import ReasoningParser, ReasoningStream


def usage(output: RequestOutput | list[RequestOutput]) -> dict:
    """OpenAI's token counts, plus minikv's KV accounting of the request (per layer and KV head):

    kv_budget: the most KV slots the request's ring could hold;
    kv_slots_held: the slots it held at its end, min(kv_budget, tokens whose K/V were written), the tokens
        written being the prompt and every generated token but the last (never fed back to the model);
    evicted_tokens: tokens whose K/V were dropped from its ring to stay within the budget.
    prompt_tokens_details.cached_tokens (OpenAI's): prompt tokens not prefilled, read already by the ring of
        the engine session the request continued (minikv.session).
    For a batch of prompts, the sums over its requests (kv_budget: the largest).
    """
    if isinstance(output, list):
        parts = [usage(one) for one in output]
        total = {name: (max if name == "kv_budget" else sum)(part[name] for part in parts)
                 for name in parts[0] if name != "prompt_tokens_details"}
        total["prompt_tokens_details"] = {"cached_tokens": sum(p["prompt_tokens_details"]["cached_tokens"] for p in parts)}
        return total
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

    def response(self, output: RequestOutput | list[RequestOutput]) -> dict:
        """The whole response to one request's final output, or to a batch's (one choice per prompt)."""
        outputs = output if isinstance(output, list) else [output]
        choices = [self.request_choice(one, index) for index, one in enumerate(outputs)]
        return self.envelope(self.object_name, choices, usage=usage(output))

    def request_choice(self, output: RequestOutput, index: int) -> dict:
        return {**self.final_choice(output.outputs[0]), "index": index}

    def delta_choices(self, output: RequestOutput) -> list[dict]:
        """The choices of the stream chunk for one DELTA output ([] sends no chunk)."""
        completion = output.outputs[0]
        if completion.text or completion.logprobs or output.finished:
            return [self.delta_choice(completion)]
        return []

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
    """/v1/completions. With `echo`, each choice starts with its prompt: `prompt_texts[i]` (None for a token-id
    prompt, then decoded) and, when the output carries prompt_logprobs, the prompt tokens' logprobs (the first
    token's null, as OpenAI's). `echo_only` (max_tokens 0) drops the one token the engine generated.
    `decode` gives a token id's text (prompt logprobs come without it)."""

    object_name = chunk_object_name = "text_completion"

    def __init__(self, request_id: str, model: str, *, echo: bool = False, echo_only: bool = False,
                 prompt_texts: list[str | None] | None = None, decode: Callable[[int], str] | None = None,
                 decode_prompt: Callable[[list[int]], str] | None = None):
        super().__init__(request_id, model)
        self.echo, self.echo_only = echo, echo_only
        self.prompt_texts = prompt_texts or [None]
        self._decode, self._decode_prompt = decode, decode_prompt
        self._text_offset = 0  # streamed: where the next token's text starts, across chunks
        self._echoed = False  # streamed: whether the prompt went out (in the first chunk)

    def request_choice(self, output: RequestOutput, index: int) -> dict:
        self._text_offset = 0
        return {**self._choice(output.outputs[0], output if self.echo else None, index), "index": index}

    def final_choice(self, completion: CompletionOutput) -> dict:
        self._text_offset = 0
        return self._choice(completion)

    def delta_choices(self, output: RequestOutput) -> list[dict]:
        completion = output.outputs[0]
        # The first delta carries the echoed prompt (the first output holds the prompt logprobs).
        echoed = output if self.echo and not self._echoed else None
        self._echoed = self._echoed or self.echo
        new = (completion.text or completion.logprobs) and not self.echo_only
        if echoed is None and not new and not output.finished:
            return []
        return [self._choice(completion, echoed, 0)]

    def delta_choice(self, completion: CompletionOutput) -> dict:
        return self._choice(completion)

    def _choice(self, completion: CompletionOutput, echoed: RequestOutput | None = None, index: int = 0) -> dict:
        prompt_text, prompt_logprobs = "", None
        if echoed is not None:  # the prompt first: the completion's text offsets count from its end
            prompt_text, prompt_logprobs = self._prompt_text(echoed, index), self._prompt_logprobs(echoed)
            self._text_offset = len(prompt_text)
        text, logprobs = ("", None) if self.echo_only else (completion.text, self._logprobs(completion))
        if prompt_logprobs is not None:
            generated = logprobs or {name: [] for name in prompt_logprobs}
            logprobs = {name: prompt_logprobs[name] + generated[name] for name in prompt_logprobs}
        finish_reason = completion.finish_reason
        if self.echo_only and finish_reason is not None:
            finish_reason = "length"  # (the one sampled token, dropped, ended it)
        return {"index": completion.index, "text": prompt_text + text, "logprobs": logprobs,
                "finish_reason": finish_reason, "stop_reason": None if self.echo_only else completion.stop_reason}

    def _prompt_text(self, output: RequestOutput, index: int) -> str:
        given = self.prompt_texts[index] if index < len(self.prompt_texts) else None
        if given is not None:
            return given
        return self._decode_prompt(output.prompt_token_ids) if self._decode_prompt else ""

    def _prompt_logprobs(self, output: RequestOutput) -> dict | None:
        """The prompt's part of the legacy logprobs: every prompt token, its logprob (None for the first),
        its top alternatives; offsets are the running lengths of the tokens' texts (a special token such as
        BOS has text here but none in a text prompt, so offsets may run past it; the completion's count from
        the end of the echoed prompt text)."""
        if output.prompt_logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, position in zip(output.prompt_token_ids, output.prompt_logprobs):
            text = self._token_text(token_id)
            tokens.append(text)
            offsets.append(self._text_offset)
            self._text_offset += len(text)
            if position is None:
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(position[token_id].logprob)
            top.append({self._token_text(tid): lp.logprob for tid, lp in _ranked_items(position)})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _token_text(self, token_id: int) -> str:
        return self._decode(token_id) if self._decode else ""

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
    """/v1/chat/completions. With a reasoning parser, the thinking goes to `reasoning_content` (see
    minikv.server.reasoning), in the message and in the streamed deltas."""

    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, top_logprobs: int = 0,
                 reasoning_parser: ReasoningParser | None = None):
        super().__init__(request_id, model)
        self.top_logprobs = top_logprobs
        self.reasoning_parser = reasoning_parser
        self._reasoning = ReasoningStream(reasoning_parser) if reasoning_parser else None

    def first_chunks(self) -> list[list[dict]]:
        return [[{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}]]

    def final_choice(self, completion: CompletionOutput) -> dict:
        message = {"role": "assistant", "content": completion.text}
        if self.reasoning_parser is not None:
            reasoning, content = self.reasoning_parser.split(completion.text)
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        return {"index": completion.index, "message": message,
                "logprobs": self._logprobs(completion), "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

    def delta_choice(self, completion: CompletionOutput) -> dict:
        delta = {"content": completion.text} if completion.text else {}
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(completion.text, final=completion.finish_reason is not None)
            delta = {**({"reasoning_content": reasoning} if reasoning else {}),
                     **({"content": content} if content else {})}
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
    return [lp for _, lp in _ranked_items(position)]


def _ranked_items(position: PositionLogprobs) -> list:
    return sorted(position.items(), key=lambda item: (item[1].rank is None, item[1].rank or 0))


def _token_entry(logprob) -> dict:
    text = logprob.decoded_token or ""
    return {"token": text, "logprob": logprob.logprob, "bytes": list(text.encode("utf-8"))}


# --- one request, whole or streamed ------------------------------------------------------------------


async def final_response(handle: RequestHandle, fmt: ResponseFormat,
                         is_disconnected: Callable[[], Awaitable[bool]] | None, on_disconnect: Callable[[], None],
                         *, client_gone: Callable[[], Awaitable[None]] | None = None) -> dict:
    """Wait for the request's final output and return its response body (APIError if the engine failed)."""
    return fmt.response(await final_output(handle, is_disconnected, on_disconnect, client_gone=client_gone))


async def final_output(handle: RequestHandle, is_disconnected: Callable[[], Awaitable[bool]] | None,
                       on_disconnect: Callable[[], None], *,
                       client_gone: Callable[[], Awaitable[None]] | None = None) -> RequestOutput:
    """The request's final output (APIError if the engine failed). A client that goes away (noticed by
    `client_gone` returning, or `is_disconnected` polled) or a cancelled handler aborts the request."""
    final = None
    try:
        async for output in handle.outputs(is_disconnected, client_gone=client_gone):
            final = output
    except (EngineLoopFailure, EngineDeadError) as err:
        raise engine_failure(str(err)) from None
    finally:
        if not handle.finished:  # the client went away (ClientDisconnected, or this handler was cancelled)
            handle.abort()
            on_disconnect()
    if final.error is not None:
        raise engine_failure(final.error)
    return final


async def final_outputs(handles: list[RequestHandle], client_gone: Callable[[], Awaitable[None]],
                        on_disconnect: Callable[[], None]) -> list[RequestOutput]:
    """The final outputs of a batch of requests, in order; if one fails or the client goes away, the others
    are aborted too."""
    gone = asyncio.ensure_future(client_gone())  # one watcher for the batch, shared (shielded) by its requests
    tasks = [asyncio.ensure_future(final_output(handle, None, lambda: None, client_gone=lambda: asyncio.shield(gone)))
             for handle in handles]
    try:
        return list(await asyncio.gather(*tasks))
    except (ClientDisconnected, asyncio.CancelledError):
        on_disconnect()
        raise
    finally:
        gone.cancel()
        for task, handle in zip(tasks, handles):
            task.cancel()  # (a no-op for those done)
            handle.abort()  # (a no-op for those finished)


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
            choices = fmt.delta_choices(output)
            if choices:
                yield fmt.chunk(choices, include_usage)
    except (EngineLoopFailure, EngineDeadError) as err:
        yield engine_failure(str(err)).body()
        return
    if include_usage and last is not None:
        yield fmt.chunk([], include_usage, usage(last))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

