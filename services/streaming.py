"""Running an agent in a worker thread for a request on the event loop, and OpenAI's SSE framing
of what it produces."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException

from agentkit.errors import AgentkitError
from agentkit.services.schemas import ERROR_KINDS, error_body, error_status

if TYPE_CHECKING:
    from starlette.types import Receive

logger = logging.getLogger("agentkit.api")
WORKER_NICENESS = 10  # relative to the event loop's thread; see below_the_event_loop
CHAT_WORKERS = 256  # chat requests answered at once (a thread each); more get a 503
STREAM_BUFFER = 32  # events a stream's worker may run ahead of a slow client


class ClientGone(HTTPException):
    def __init__(self) -> None:
        # nginx's "client closed request": only the metrics and the log ever see it
        super().__init__(499, "the client closed the connection")


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request's body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


END = object()  # what BackgroundIterator.next returns after the last item


class BackgroundIterator:
    """The items of a blocking iterator, produced by a daemon thread and read on the event loop.

    The thread runs ahead of the reader by at most ``buffer`` items (a slow client slows the
    producer instead of filling memory). ``stop()`` (the client went away, the server's grace
    ended) sets ``cancel``, which a PAL sandbox run watches, and closes the iterator at its next
    item; a step that blocks (a model call) finishes in the background: the thread is a daemon,
    so exiting never waits for it. Each thread holds one of ``slots`` while it runs: with none
    free, the first ``next()`` is a 503.
    """

    def __init__(
        self,
        produce: Callable[[], Iterator[Any]],
        cancel: threading.Event,
        slots: threading.Semaphore,
        buffer: int = STREAM_BUFFER,
    ) -> None:
        self.cancel = cancel
        self._produce, self._slots = produce, slots
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._room = threading.Semaphore(buffer)
        self._stopped = threading.Event()
        self._started = False
        self._loop = asyncio.get_running_loop()

    async def next(self) -> Any:
        """The next item, ``END`` after the last; the iterator's exception is raised here."""
        if not self._started:
            if not self._slots.acquire(blocking=False):
                raise HTTPException(
                    503,
                    f"the server is answering {CHAT_WORKERS} chat requests already; retry soon",
                    headers={"Retry-After": "1"},
                )
            self._started = True
            context = contextvars.copy_context()  # the request's trace context, for its spans
            threading.Thread(
                target=context.run, args=(self._run,), name="agentkit-chat", daemon=True
            ).start()
        kind, value = await self._queue.get()
        self._room.release()
        if kind == "error":
            raise value
        return END if kind == "end" else value

    def stop(self) -> None:
        self._stopped.set()
        self.cancel.set()
        self._room.release()  # a producer waiting for room wakes up and sees it is stopped

    def interrupt(self, error: BaseException) -> None:
        """Stop, and make ``next()`` raise ``error`` once what is already queued is read (on
        the event loop's thread)."""
        self.stop()
        self._queue.put_nowait(("error", error))

    @asynccontextmanager
    async def interrupted(
        self, *when: tuple[Callable[[], Awaitable[Any]], BaseException]
    ) -> AsyncIterator[None]:
        """While inside, each ``(wait, error)`` whose ``wait()`` returns interrupts with its
        error."""

        async def watch(wait: Callable[[], Awaitable[Any]], error: BaseException) -> None:
            await wait()
            self.interrupt(error)

        watchers = [asyncio.ensure_future(watch(event, error)) for event, error in when]
        try:
            yield
        finally:
            for watcher in watchers:
                watcher.cancel()

    def _run(self) -> None:
        below_the_event_loop()
        try:
            items = self._produce()
            try:
                for item in items:
                    if not self._put("item", item):
                        return
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()  # e.g. closes the model server's stream, which aborts the request
            self._put("end", None)
        except BaseException as error:  # handed to the reader
            self._put("error", error)
        finally:
            self._slots.release()

    def _put(self, kind: str, value: Any) -> bool:
        if self._stopped.is_set():
            return False
        self._room.acquire()
        if self._stopped.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server has stopped
            return False
        return True


def below_the_event_loop() -> None:
    """Lower this thread's scheduling priority (Linux: a thread's own nice value) by
    WORKER_NICENESS. A worker's CPU work (retrieval, prompt assembly) then yields the cores to the
    event loop's thread, so /healthz and new connections answer in milliseconds however many
    requests are busy; on an idle machine the worker loses nothing. Threads it starts (the
    search and embedding pools) inherit the value."""
    try:
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me) + WORKER_NICENESS)
    except (AttributeError, OSError):  # not Linux: threads share their process's priority
        pass


def error_event(error: Exception, relative: Callable[[str], str]) -> str:
    """An error inside a stream, as OpenAI sends it: ``data: {"error": {...}}``."""
    if isinstance(error, HTTPException):
        status, message = error.status_code, str(error.detail)
        body = error_body(message, ERROR_KINDS.get(status, "invalid_request_error"), status)
    elif isinstance(error, AgentkitError):
        status = error_status(error)
        body = error_body(relative(str(error)), type(error).__name__, status)
    else:
        logger.error("a chat stream failed", exc_info=error)
        body = error_body("internal error; see the server log", "server_error", 500)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


@dataclass
class ChunkFrames:
    """``chat.completion.chunk`` events of one completion."""

    id: str
    created: int
    model: str

    def frame(self, **fields: Any) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            **fields,
        }
        return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def chunk(self, delta: dict[str, Any], finish: str | None, extra: dict | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self.frame(choices=[choice], **({"agentkit": extra} if extra else {}))
