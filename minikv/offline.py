"""The offline loop: what `Engine.generate`, `Engine.chat` and `Engine.stream` run.

They are `add_request` and steps for the common cases: run a batch of prompts to completion, or follow one
request's text delta by delta. Each adds its requests with an `output_queue` of its own and with the output
kind it needs (FINAL_ONLY for a batch, DELTA for a stream), then steps the engine until its queue has what it
waits for. Outputs of every other request go where they always go (their own caller's queue, or the engine's
list for its next `step` caller), so requests queued with `add_request` keep running alongside. (This module
is handed the engine; it does not import minikv.engine, which imports it.)
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable

from .errors import InvalidRequestError
from .input_processor import Prompt, is_chat, is_token_ids
from .outputs import RequestOutput
from .sampling import RequestOutputKind, SamplingParams


def generate(engine, prompts: str | list[int] | Iterable[str | list[int]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             *, use_tqdm: bool = True, session_id: str | None = None, append: bool = False) -> list[RequestOutput]:
    """Engine.generate: complete raw prompts, return their final outputs in order."""
    prompts = as_prompt_list(prompts)
    for index, prompt in enumerate(prompts):
        if is_chat(prompt):
            raise InvalidRequestError(f"prompt {index} is a list of chat messages: use Engine.chat(messages) "
                                      "for those (generate completes raw text or token ids)")
    return _run_to_completion(engine, prompts, sampling_params, use_tqdm, session_id=session_id, append=append)


def chat(engine, messages: list[dict] | Iterable[list[dict]],
         sampling_params: SamplingParams | list[SamplingParams] | None = None,
         *, use_tqdm: bool = True, session_id: str | None = None) -> list[RequestOutput]:
    """Engine.chat: answer one conversation or a list of them, return the final outputs in order."""
    conversations = [messages] if is_chat(messages) else list(messages)
    for index, conversation in enumerate(conversations):
        if not is_chat(conversation):
            raise InvalidRequestError(f"conversation {index} must be a non-empty list of "
                                      "{'role': ..., 'content': ...} dicts")
    return _run_to_completion(engine, conversations, sampling_params, use_tqdm, session_id=session_id)


def stream(engine, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, *,
           session_id: str | None = None, append: bool = False) -> RequestStream:
    """Engine.stream: add a request whose DELTA outputs go to the stream's own queue."""
    queue: deque[RequestOutput] = deque()
    request_id = engine.add_request(prompt, _with_kind(params, RequestOutputKind.DELTA), request_id,
                                    session_id=session_id, append=append, output_queue=queue)
    return RequestStream(engine, request_id, queue)


def _run_to_completion(engine, prompts: list[Prompt], sampling_params, use_tqdm: bool, *,
                       session_id: str | None = None, append: bool = False) -> list[RequestOutput]:
    params_list = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                   else [sampling_params] * len(prompts))
    if len(params_list) != len(prompts):
        raise InvalidRequestError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
    queue: deque[RequestOutput] = deque()  # the batch's final outputs, in the order they finish
    if session_id is not None or append:
        if len(prompts) != 1:
            raise InvalidRequestError(f"session_id continues one conversation: got {len(prompts)} prompts")
        ids = [engine.add_request(prompts[0], _with_kind(params_list[0], RequestOutputKind.FINAL_ONLY),
                                  session_id=session_id, append=append, output_queue=queue)]
    else:
        ids = _add_all(engine, prompts, params_list, queue)
    final: dict[str, RequestOutput] = {}
    try:
        with _progress(len(ids), use_tqdm) as bar:
            while len(final) < len(ids):
                out = _next_output(engine, queue)
                final[out.request_id] = out
                bar.update(1)
    finally:  # interrupted (Ctrl-C, an exception): leave nothing of this batch behind
        for rid in ids:
            if rid not in final:
                engine.abort(rid)
    return [final[rid] for rid in ids]


def _add_all(engine, prompts: list[Prompt], params_list: list[SamplingParams | None],
             queue: deque[RequestOutput]) -> list[str]:
    """Add a whole batch, or nothing of it."""
    ids: list[str] = []
    for index, (prompt, params) in enumerate(zip(prompts, params_list)):
        try:
            ids.append(engine.add_request(prompt, _with_kind(params, RequestOutputKind.FINAL_ONLY),
                                          output_queue=queue))
        except InvalidRequestError as err:
            for rid in ids:
                engine.abort(rid)
            raise InvalidRequestError(f"prompt {index}: {err}") from None
    return ids


def _with_kind(params: SamplingParams | None, kind: RequestOutputKind) -> SamplingParams | None:
    """The caller's params asking for `kind` of outputs (anything else is left for add_request to refuse)."""
    if params is None:
        return SamplingParams(output_kind=kind)
    return dataclasses.replace(params, output_kind=kind) if isinstance(params, SamplingParams) else params


def _next_output(engine, queue: deque[RequestOutput]) -> RequestOutput:
    """The next output in `queue`, stepping the engine until there is one. Outputs of the requests that
    other callers follow go to their own queues, or wait in the engine for its next `step` caller."""
    while not queue:
        if not engine.scheduler.has_unfinished():
            raise RuntimeError("requests ended without a final output (a minikv bug)")
        engine._step()
    return queue.popleft()


class RequestStream:
    """One request's text, delta by delta. After the last delta, `output` holds its final RequestOutput
    (all of its text and tokens: the deltas added up). Use it as a context manager, or call `close()` when
    stopping early."""

    def __init__(self, engine, request_id: str, queue: deque[RequestOutput]):
        self.engine, self.request_id = engine, request_id
        self.output: RequestOutput | None = None
        self._queue = queue  # the request's DELTA outputs (Engine.add_request's output_queue)
        self._so_far: RequestOutput | None = None
        self._closed = False

    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> str:
        while not self._closed:
            out = _next_output(self.engine, self._queue)
            self._so_far = out if self._so_far is None else self._so_far.add(out)
            if out.finished:
                self.output = self._so_far
                self._closed = True
            if out.outputs[0].text:
                return out.outputs[0].text
        raise StopIteration

    def close(self) -> None:
        """Stop following the request; if it has not finished, abort it (its KV is free at once)."""
        if not self._closed:
            self._closed = True
            if self.output is None:
                self.engine.abort(self.request_id)

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_prompt_list(prompts) -> list[Prompt]:
    """One prompt (text, token ids, chat) or many, as a list of prompts."""
    if isinstance(prompts, str) or is_chat(prompts) or is_token_ids(prompts):
        return [prompts]
    if isinstance(prompts, (dict, bytes)) or not isinstance(prompts, Iterable):  # generate(5), generate(message)
        raise InvalidRequestError(f"prompts must be a prompt (a string, a list of token ids or a list of chat "
                                  f"messages) or a list of prompts, got {type(prompts).__name__}")
    return list(prompts)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req", disable=not enabled or total < 2)
