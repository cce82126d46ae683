"""How ``agentkit serve`` stops: a grace period for open chat requests, then an end; a second
signal ends everything at once."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.exceptions import HTTPException

SHUTDOWN_MARGIN_S = 1.0  # after the grace period, for streams to send their last event
FORCED_EXIT_S = 1.0  # after a second signal, how long the orderly exit may take before _exit
SHUTTING_DOWN = "the server is shutting down; send the request again"


class Shutdown:
    """The server is stopping: chat requests still open get ``grace_s`` more seconds, then a
    stream ends with an error event and ``[DONE]`` and a request still waiting for its answer
    gets a 503; new chat requests get a 503 at once.

    ``begin()`` may be called from any thread; calling it again with a shorter grace
    (``begin(0)``: a second signal) brings the end forward. Waiters may sit on any event loop
    (a TestClient runs each request on a loop of its own).
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.deadline: float | None = None  # time.monotonic() when the grace period ends
        self._lock = threading.Lock()
        self._ended: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def started(self) -> bool:
        return self.deadline is not None

    def begin(self, grace_s: float | None = None) -> None:
        """Start the grace period (``grace_s``, else the configured one) now."""
        deadline = time.monotonic() + max(0.0, self.grace_s if grace_s is None else grace_s)
        with self._lock:
            if self.deadline is not None and self.deadline <= deadline:
                return
            self.deadline = deadline
            loops = list(self._ended)
        for loop in loops:
            try:
                loop.call_soon_threadsafe(self._arm, loop)
            except RuntimeError:  # that loop is closed
                pass

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        ended, deadline = self._ended.get(loop), self.deadline
        if ended is not None and deadline is not None:
            loop.call_later(max(0.0, deadline - time.monotonic()), ended.set)

    async def ended(self) -> None:
        """Returns when the grace period is over."""
        loop = asyncio.get_running_loop()
        with self._lock:
            ended = self._ended.get(loop)
            if ended is None:
                ended = self._ended[loop] = asyncio.Event()
                if self.deadline is not None:
                    self._arm(loop)
        await ended.wait()

    def seconds_left(self, default: float) -> float:
        """Seconds to the end of the grace period; ``default`` when no shutdown has begun."""
        deadline = self.deadline
        return default if deadline is None else max(0.0, deadline - time.monotonic())


class SignalHandling:
    """What SIGINT/SIGTERM do to ``agentkit serve`` (``serve``): the first stops accepting
    connections and gives open requests the grace period (``Shutdown``); a second one ends open
    streams at once and exits: if the orderly exit has not finished ``FORCED_EXIT_S`` later,
    the process ends there (``os._exit``; the stores are SQLite, which rolls back what was not
    committed). Unlike uvicorn's own handling, the signal is not raised again once the server
    has stopped: ``agentkit serve`` still has its cleanup to do (the stores, a model server).

    uvicorn installs its handlers (its ``Server.handle_exit``) as it starts serving; the app's
    lifespan calls ``take_over()`` next, in the main thread, which puts these in their place
    and keeps uvicorn's server to stop. Without uvicorn's handlers there, nothing changes.
    """

    def __init__(self, stopping: Shutdown, on_forced_exit: Callable[[], object] | None) -> None:
        self.stopping, self.on_forced_exit = stopping, on_forced_exit
        self.forced = False

    def take_over(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if not isinstance(server, uvicorn.Server):
            return
        loop = asyncio.get_running_loop()

        def on_signal(sig: int, frame: FrameType | None) -> None:
            second = server.should_exit
            server.should_exit = True
            if second:
                # Not uvicorn's force_exit: it skips the app's shutdown, which is quick now
                # that the grace period is over. The backstop bounds the rest.
                self.forced = True
                backstop = threading.Timer(FORCED_EXIT_S, self.exit_now)
                backstop.daemon = True
                backstop.start()
            # Not inside the handler: it may have interrupted this thread while it held the
            # Shutdown's lock.
            loop.call_soon_threadsafe(self.stopping.begin, 0.0 if second else None)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def exit_now(self) -> None:
        try:
            if self.on_forced_exit is not None:
                self.on_forced_exit()
        finally:
            os._exit(1)


def serve(
    app: FastAPI,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    on_forced_exit: Callable[[], object] | None = None,
) -> bool:
    """Serve ``app`` (from ``create_app``) with uvicorn until SIGINT/SIGTERM; see
    ``SignalHandling`` for what one and two signals do (``on_forced_exit`` runs before a forced
    ``os._exit``). False when a second signal forced the exit."""
    stopping: Shutdown = app.state.shutdown
    signals = app.state.signals = SignalHandling(stopping, on_forced_exit)
    # Agents run in threads that hold the GIL for milliseconds at a time; handing it over every
    # 1 ms instead of 5 ms keeps the event loop (/healthz, new connections) answering under load.
    sys.setswitchinterval(0.001)
    # What is loaded by now (the embedding model, the index, the app) lives as long as the
    # server: out of the collector's sight, a full collection no longer walks it while holding
    # the GIL (pauses of 100+ ms that stalled every request at once).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        # Streams and chat requests end on their own at the grace period's end; anything else
        # still running then is cancelled by uvicorn a little later.
        timeout_graceful_shutdown=stopping.grace_s + SHUTDOWN_MARGIN_S,  # type: ignore[arg-type]
    )
    return not signals.forced


class ServerStopping(HTTPException):
    def __init__(self) -> None:
        super().__init__(503, SHUTTING_DOWN, headers={"Retry-After": "1"})
