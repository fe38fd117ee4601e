"""The one thread that owns the Engine, and the handles through which HTTP requests talk to it.

The engine is single-threaded (it is not thread-safe, and one step serves every request in flight anyway),
while HTTP requests arrive on asyncio's event loop. They meet through two kinds of queue:

    event loop (many requests)                 engine thread (one loop)
    EngineLoop.submit(token ids) ── inbox ──►  add_request / abort
                                                     engine.step()
    RequestHandle.queue  ◄── call_soon_threadsafe ── route each RequestOutput to its request

Every iteration of the engine thread admits what arrived, applies aborts, runs one `engine.step()` (which
batches all running requests: continuous batching across HTTP clients) and routes the outputs. Prompts
arrive as token ids: the handlers tokenize (and apply the chat template) on worker threads, so a long prompt
never stalls the streams the engine is running. Only the engine thread touches the Engine; the event loop
reads a snapshot of `engine.stats()` the thread publishes after each step, and the loop's own timings
(LoopTimings). An abort (a client that went away) is a message in the same inbox, so it reaches the engine
before its next step, and `engine.abort` frees the request's KV at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ..engine import Engine, EngineStats, Prompt
from ..errors import InvalidRequestError
from ..outputs import RequestOutput
from ..sampling import SamplingParams

logger = logging.getLogger(__name__)

_ACCEPTED = object()  # the engine took the request: the first message on a handle's queue
_STOP = object()


class QueueFullError(Exception):
    """Too many requests are waiting: the server refuses new ones until some are admitted (HTTP 503)."""


class EngineDeadError(Exception):
    """The engine thread is not running (the server is shutting down, or it failed to start)."""


class EngineLoopFailure(Exception):
    """An engine step raised: the requests in flight were failed (see EngineLoop._fail_in_flight)."""


class ClientDisconnected(Exception):
    """The client went away while its request ran."""


class Observer:
    """What the engine thread reports as it runs (ServerMetrics implements it). Called on the engine thread."""

    def on_step(self, stats: EngineStats) -> None: ...

    def on_finished(self, output: RequestOutput) -> None: ...


class RequestHandle:
    """The HTTP side of one request: its outputs arrive on an asyncio queue that the engine thread fills."""

    def __init__(self, request_id: str, engine_loop: "EngineLoop", event_loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.finished = False  # set once the final output (or a failure) has been taken from the queue
        self.session_id: str | None = None  # the engine session the request runs in, once accepted
        self._engine_loop = engine_loop
        self._event_loop = event_loop
        self._queue: asyncio.Queue = asyncio.Queue()

    # --- engine thread -------------------------------------------------------------------------------
    def deliver(self, item) -> None:
        try:
            self._event_loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # --- event loop --------------------------------------------------------------------------------
    async def accepted(self) -> None:
        """Wait until the engine has taken the request; raise the engine's InvalidRequestError if it refused."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item

    async def outputs(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None, poll_s: float = 0.5,
                      *, client_gone: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs up to its final one. If the client goes away meanwhile, ClientDisconnected is
        raised (the caller aborts): `client_gone` returns when it does (noticed at once), or `is_disconnected`
        is asked every `poll_s` seconds of silence."""
        watcher = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        try:
            while not self.finished:
                item = await (self._next_or_gone(watcher) if watcher else self._next(is_disconnected, poll_s))
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _next(self, is_disconnected, poll_s: float):
        if is_disconnected is None:
            return await self._queue.get()
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), poll_s)
            except asyncio.TimeoutError:
                if await is_disconnected():
                    raise ClientDisconnected(self.request_id) from None

    async def _next_or_gone(self, watcher: asyncio.Future):
        if not self._queue.empty():
            return self._queue.get_nowait()
        getter = asyncio.ensure_future(self._queue.get())
        try:
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        raise ClientDisconnected(self.request_id)

    def abort(self) -> None:
        """Stop the request if it still runs (its KV is freed before the engine's next step)."""
        if not self.finished:
            self.finished = True
            self._engine_loop.abort(self.request_id)


@dataclass
class _Submission:
    prompt_ids: list[int]
    params: SamplingParams
    handle: RequestHandle
    prompt: Prompt | None = None  # what was tokenized (text, chat messages), for sessions continued by text
    prompt_text: str | None = None
    session_id: str | None = None  # the engine session the request continues (minikv.session)
    reuse_session: bool = False  # continue whichever parked session's ring serves the most of the prompt


@dataclass
class LoopTimings:
    """Where the engine thread's time goes (seconds, since it started): applying the inbox (admissions and
    aborts) and engine steps, each as a total and the longest single one. The prompts come tokenized, so
    admitting one costs a pass over its token ids, never its tokenization or chat template."""

    iterations: int = 0
    admit_s_total: float = 0.0
    admit_s_max: float = 0.0
    step_s_total: float = 0.0
    step_s_max: float = 0.0

    def add_admission(self, seconds: float) -> None:
        self.admit_s_total += seconds
        self.admit_s_max = max(self.admit_s_max, seconds)

    def add_step(self, seconds: float) -> None:
        self.step_s_total += seconds
        self.step_s_max = max(self.step_s_max, seconds)


class EngineLoop:
    """Runs `engine` on one background thread; `submit` and `abort` may be called from the event loop."""

    def __init__(self, engine: Engine, *, max_waiting: int | None = None, observer: Observer | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer or Observer()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}  # engine thread only: requests the engine holds
        # Requests waiting for a ring: submitted but not yet taken from the inbox, plus those the engine holds
        # waiting. Both change under the lock, so `submit` never sees a request in neither (max_waiting exact).
        self._pending = 0
        self._engine_waiting = 0
        self._waiting_lock = threading.Lock()
        self._stats = engine.stats()
        self._timings = LoopTimings()
        self._thread = threading.Thread(target=self._run, name="minikv-engine", daemon=True)

    # --- lifetime ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever still runs and end the thread."""
        if self._thread.is_alive():
            self._inbox.put((_STOP, None))
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        """engine.stats() as of the engine thread's last iteration."""
        return self._stats

    def timings(self) -> LoopTimings:
        """A copy of the engine thread's timings (see LoopTimings)."""
        return LoopTimings(**vars(self._timings))

    @property
    def num_waiting(self) -> int:
        """Requests submitted that wait for a ring (in the inbox or in the engine's waiting queue)."""
        with self._waiting_lock:
            return self._pending + self._engine_waiting

    # --- event loop side -----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, *, prompt: Prompt | None = None,
               prompt_text: str | None = None, session_id: str | None = None,
               reuse_session: bool = False) -> RequestHandle:
        """Queue a tokenized request for the engine thread; `await handle.accepted()` says whether the engine
        took it. `prompt` / `prompt_text`: what was tokenized (text or chat messages) and its rendered text,
        which a session continued by text needs (Engine.add_request's `tokenized`). `session_id` continues that
        engine session; `reuse_session` picks the parked session whose ring serves the most of the prompt
        (Engine.match_session), or starts one named after the request. Raises QueueFullError when
        `max_waiting` requests already wait, EngineDeadError when the thread is gone."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        with self._waiting_lock:
            waiting = self._pending + self._engine_waiting
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise QueueFullError(f"{waiting} requests are waiting (the limit is {self.max_waiting})")
            self._pending += 1
        handle = RequestHandle(request_id, self, asyncio.get_running_loop())
        self._inbox.put(("add", _Submission(prompt_ids, params, handle, prompt, prompt_text, session_id,
                                            reuse_session)))
        return handle

    def call(self, fn: Callable[[Engine], object]) -> "asyncio.Future":
        """Run `fn(engine)` on the engine thread between steps (the engine is not thread-safe); await the
        returned future for its result or exception."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        event_loop = asyncio.get_running_loop()
        future = event_loop.create_future()
        self._inbox.put(("call", (fn, event_loop, future)))
        return future

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # --- engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._take_inbox(block=not self.engine.has_unfinished_requests()):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish()
            except Exception:  # a bug in this loop must not take the server down: log it and serve on
                logger.exception("minikv engine loop: unexpected error (continuing)")
        self._shut_down()

    def _publish(self) -> None:
        """Refresh the stats snapshot and the waiting count after an iteration."""
        self._stats = self.engine.stats()
        with self._waiting_lock:
            self._engine_waiting = self._stats.num_waiting
        self._timings.iterations += 1
        self.observer.on_step(self._stats)

    def _take_inbox(self, block: bool) -> bool:
        """Apply every message waiting in the inbox (wait for one first if `block`); False on stop."""
        try:
            message = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        began = time.perf_counter()  # (the wait for the first message is idle time, not admission)
        try:
            while True:
                kind, payload = message
                if kind is _STOP:
                    return False
                if kind == "add":
                    self._admit(payload)
                elif kind == "call":
                    self._call(*payload)
                else:
                    self.engine.abort(payload)  # unknown or finished ids are ignored by the engine
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    return True
        finally:
            self._timings.add_admission(time.perf_counter() - began)

    def _call(self, fn, event_loop, future) -> None:
        try:
            result, error = fn(self.engine), None
        except Exception as err:
            result, error = None, err

        def settle():
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)
        try:
            event_loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed
            pass

    def _admit(self, sub: _Submission) -> None:
        try:
            if not sub.handle.finished:  # else aborted before it reached the engine
                self._add(sub)
        finally:
            with self._waiting_lock:  # one update: the request moves from the inbox to the engine's queue
                self._pending -= 1
                self._engine_waiting = self.engine.scheduler.num_waiting

    def _add(self, sub: _Submission) -> None:
        try:
            tokenized = (sub.prompt_ids, sub.prompt_text)
            session_id = sub.session_id
            if sub.reuse_session and session_id is None and self.engine.supports_sessions:
                session_id = (self.engine.match_session(sub.prompt, tokenized=tokenized)
                              or f"auto-{sub.handle.request_id}")
            session = self.engine.sessions.get(session_id) if session_id is not None else None
            if session is not None and session.request_id is not None:  # another request continues it now:
                # this one starts its own session
                session_id = f"auto-{sub.handle.request_id}"
            self.engine.add_request(sub.prompt if sub.prompt is not None else sub.prompt_ids, sub.params,
                                    sub.handle.request_id, session_id=session_id, tokenized=tokenized)
            sub.handle.session_id = session_id
        except InvalidRequestError as err:
            sub.handle.deliver(err)
            return
        except Exception as err:  # a bug, but one request's: refuse it and keep serving
            logger.exception("minikv engine loop: add_request failed")
            sub.handle.deliver(EngineLoopFailure(f"{type(err).__name__}: {err}"))
            return
        self._handles[sub.handle.request_id] = sub.handle
        sub.handle.deliver(_ACCEPTED)

    def _step(self) -> None:
        began = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as err:
            logger.exception("minikv engine loop: engine.step() raised; failing the requests in flight")
            self._fail_in_flight(err)
            return
        finally:
            self._timings.add_step(time.perf_counter() - began)
        for output in outputs:
            self._route(output)

    def _route(self, output: RequestOutput) -> None:
        handle = self._handles.get(output.request_id)
        if output.finished:
            self._handles.pop(output.request_id, None)
            self.observer.on_finished(output)
        if handle is not None:
            handle.deliver(output)

    def _fail_in_flight(self, err: Exception) -> None:
        """engine.step() itself raised (the engine already fails single requests inside a step, so this is a
        minikv bug): which requests the step touched is unknown, so every request in flight fails, is aborted
        in the engine, and the loop goes on with new requests."""
        failure = EngineLoopFailure(f"{type(err).__name__}: {err}")
        for request_id, handle in list(self._handles.items()):
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("minikv engine loop: abort of %s failed", request_id)
            handle.deliver(failure)
        self._handles.clear()

    def _shut_down(self) -> None:
        """Abort what runs and answer what never reached the engine, so that no handler waits for ever."""
        gone = EngineDeadError("the server is shutting down")
        for request_id, handle in self._handles.items():
            self.engine.abort(request_id)
            handle.deliver(gone)
        self._handles.clear()
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                payload.handle.deliver(gone)

