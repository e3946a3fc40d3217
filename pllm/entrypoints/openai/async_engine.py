"""Asyncio front of the synchronous LLMEngine.

The engine is not thread-safe, so exactly one thread touches it::

    coroutines ── add / abort ──▶ inbox ──▶ engine thread: drain inbox, engine.step()
        ▲                                           │
        └──── RequestStream (asyncio.Queue) ◀───────┘  loop.call_soon_threadsafe

Commands are applied between steps, so a bad request (rejected by
``add_request``) never disturbs the running batch; one that fails inside a
step is ended alone by the engine (its stream raises RequestFailedError),
and only a step that fails as a whole fails the requests in it. torch
releases the GIL while it computes, so the event loop stays responsive
during a step.

The engine thread should also be the thread that built the engine
(:class:`EngineThread`): every OpenMP parallel region the engine runs on a
CPU should start from one thread. libgomp keeps a pool of worker threads
for each thread that starts a region, and once its pools hold more threads
than there are CPUs it stops spinning between regions, so each of the
hundreds of regions in a step waits for a futex wake-up: a decode step of
SmolLM2-135M on 2 cores took 43-47 ms from a second thread against 30-35
ms from the thread that had loaded the model. It is also the thread whose
OpenMP thread count ``--num-threads`` sets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pllm.core.executor import ExecutorBrokenError
from pllm.core.outputs import RequestOutput
from pllm.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or it failed outside a step)."""


class RequestFailedError(RuntimeError):
    """The engine ended this request alone (the others went on): why."""


class EngineObserver(Protocol):
    """Called from the engine thread (metrics); every method must be cheap."""

    def on_add(self, request_id: str, arrival: float) -> None: ...
    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...
    def on_abort(self, request_ids: list[str]) -> None: ...
    def on_stats(self, stats: Any) -> None: ...


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival: float


@dataclass
class _Abort:
    request_ids: list[str]


class RequestStream:
    """The outputs of one request, in order; iterate with ``async for``.

    Outputs are cumulative, so a slow consumer only sees the newest one.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


class EngineThread:
    """A daemon thread that runs what it is given in order: the engine's
    construction (:meth:`call`), then its loop (:meth:`finish_with`), so
    that both run on one thread (see the module's docstring)."""

    def __init__(self, name: str = "pllm-engine") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._finishing = False
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on this thread: its result, or its exception raised here."""
        self._check_open()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, future))
        return future.result()

    def finish_with(self, fn: Any) -> threading.Thread:
        """Run ``fn()`` on this thread, which ends with it; the thread."""
        self._check_open()
        self._finishing = True
        self._jobs.put((fn, (), None))
        return self.thread

    def _check_open(self) -> None:
        if self._finishing:  # nothing after the last job would ever run
            raise RuntimeError("this engine thread already runs its last job")

    def _work(self) -> None:
        while True:
            fn, args, future = self._jobs.get()
            if future is None:
                fn(*args)
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller
                future.set_exception(exc)


class AsyncLLMEngine:
    def __init__(self, engine: Any, observer: EngineObserver | None = None,
                 thread: EngineThread | None = None) -> None:
        """``thread``: the thread that built ``engine``, to run its loop
        (a new one otherwise)."""
        self.engine = engine
        self.observer = observer
        self._host = thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inbox: list[_Add | _Abort] = []
        self._wakeup = threading.Event()
        self._stop = False
        self._dead: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}  # event-loop thread only
        self._active: set[str] = set()  # engine thread only
        self._num_waiting = 0  # written by the engine thread after each step

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will await outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = (self._host or EngineThread()).finish_with(self._run)
        self._broken_watch = self._loop.create_task(self._watch_broken())

    async def _watch_broken(self, every_s: float = 0.5) -> None:
        """A rank that died (the executor says so at once) ends every stream
        now: the engine thread may be inside a step that waits for that rank
        until the process group's timeout (a node that vanished without
        closing its connections)."""
        while not self._stop:
            broken = getattr(self.engine, "broken", None)
            if broken:
                if self._streams:
                    logger.error("failing %d request(s): %s", len(self._streams), broken)
                self._fail_all(EngineDeadError(f"engine failed: {broken}"))
                return
            await asyncio.sleep(every_s)

    @property
    def is_running(self) -> bool:
        """The loop runs and the engine can step (a tensor-parallel rank that
        died makes this false at once, before any step tries)."""
        return (self._thread is not None and self._thread.is_alive() and self._dead is None
                and not getattr(self.engine, "broken", None))

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: those waiting in the engine as of its last
        step, and those handed over since."""
        with self._lock:
            queued = sum(isinstance(cmd, _Add) for cmd in self._inbox)
        return self._num_waiting + queued

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is still in flight and stop the thread."""
        self._stop = True
        self._wakeup.set()
        if getattr(self, "_broken_watch", None) is not None:
            self._broken_watch.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self._fail_all(EngineDeadError("the server is shutting down"))
        if self._thread is None or not self._thread.is_alive():
            await asyncio.to_thread(self.engine.shutdown)
        else:  # a step is still running: its worker processes go at interpreter exit
            logger.warning("the engine thread did not stop within %.0fs", timeout)

    # ------------------------------------------------------------ requests

    async def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it.

        Raises what ``engine.add_request`` raised (ValueError for bad input).
        """
        if self._loop is None:
            raise EngineDeadError("the engine loop is not started")
        if not self.is_running or self._stop:
            raise EngineDeadError("the engine loop is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream = RequestStream(request_id, self._loop)
        self._streams[request_id] = stream
        self._post(_Add(request_id, prompt, params, time.monotonic()))
        try:
            await stream.accepted
        except BaseException:
            self._streams.pop(request_id, None)
            self.abort(request_id)  # cancelled while queued: harmless if never added
            raise
        return stream

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until finished; aborts if the consumer stops early."""
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str | list[str]) -> None:
        """Abort requests (idempotent; unknown ids are ignored). Event-loop thread only."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.finished = True
        self._post(_Abort(ids))

    # ------------------------------------------------------------ engine thread

    def _post(self, cmd: _Add | _Abort) -> None:
        with self._lock:
            self._inbox.append(cmd)
        self._wakeup.set()

    def _call_loop(self, fn: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
        except RuntimeError:  # loop closed during shutdown
            pass

    def _run(self) -> None:
        # Inference mode is per thread. This one only ever runs inference, so it
        # skips autograd bookkeeping for everything, sampling included.
        with torch.inference_mode():
            self._loop_forever()

    def _loop_forever(self) -> None:
        try:
            while not self._stop:
                self._apply_inbox()
                if not self.engine.has_unfinished_requests():
                    self._publish_stats()
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except ExecutorBrokenError:
                    raise  # no step can run any more: the loop below reports the engine dead
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                    self._fail_active(exc)
                    continue
                now = time.monotonic()
                for out in outputs:
                    if out.finished:
                        self._active.discard(out.request_id)
                if self.observer is not None:
                    self.observer.on_outputs(outputs, now)
                self._publish_stats()
                if outputs:
                    self._call_loop(self._deliver, outputs)
            self._apply_inbox()
            self._abort_in_engine(list(self._active))
            self._publish_stats()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter
            logger.exception("the engine loop failed; the server cannot serve requests")
            self._dead = exc
            self._call_loop(self._fail_all, EngineDeadError(f"engine failed: {exc!r}"))

    def _fail_active(self, exc: Exception) -> None:
        """A step raised: its batch cannot go on. Abort every request in the engine
        and hand them the error; the engine itself stays usable for new requests."""
        logger.exception("an engine step failed; aborting %d request(s)", len(self._active))
        failed = list(self._active)
        self._abort_in_engine(failed)
        self._publish_stats()
        self._call_loop(self._fail_requests, failed, exc)

    def _apply_inbox(self) -> None:
        with self._lock:
            cmds, self._inbox = self._inbox, []
        for cmd in cmds:
            if isinstance(cmd, _Abort):
                self._abort_in_engine([r for r in cmd.request_ids if r in self._active])
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params)
            except Exception as exc:  # noqa: BLE001 - handed to the request's coroutine
                self._call_loop(self._accepted, cmd.request_id, exc)
                continue
            self._active.add(cmd.request_id)
            if self.observer is not None:
                self.observer.on_add(cmd.request_id, cmd.arrival)
            self._call_loop(self._accepted, cmd.request_id, None)

    def _abort_in_engine(self, request_ids: list[str]) -> None:
        if not request_ids:
            return
        self.engine.abort_request(request_ids)
        self._active.difference_update(request_ids)
        if self.observer is not None:
            self.observer.on_abort(request_ids)

    def _publish_stats(self) -> None:
        stats = self.engine.get_stats()
        self._num_waiting = stats.num_waiting
        if self.observer is not None:
            self.observer.on_stats(stats)

    # ------------------------------------------------------------ event-loop thread

    def _accepted(self, request_id: str, exc: BaseException | None) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if stream.accepted.done():
            return
        if exc is None:
            stream.accepted.set_result(None)
        else:
            self._streams.pop(request_id, None)
            stream.accepted.set_exception(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out if out.error is None else RequestFailedError(out.error))
            if out.finished:
                del self._streams[out.request_id]

    def _fail_requests(self, request_ids: list[str], exc: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(exc)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            if not stream.accepted.done():
                stream.accepted.set_exception(exc)
            else:
                stream.put(exc)
