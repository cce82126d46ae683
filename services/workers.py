"""``agentkit serve`` as one process or as N worker processes, on the stores its settings name.

``open_stores`` opens what the API keeps: conversations, feedback (and labeling, on the same
database), keys, and, when state must be shared (several workers, or a PostgreSQL database),
the jobs, rate-limit counts and upload owners. With ``AGENTKIT_DATABASE_URL`` everything is in
that PostgreSQL database, on one connection pool per process; else in the SQLite files of the
settings, as the embedded default always did.

``serve_workers`` runs uvicorn with ``workers=N``: a supervisor process that starts N workers
(and replaces one that dies), each calling ``worker_app`` to build its own app from the
settings it inherits through the environment (the index it follows on disk, the model's URL,
the database). SIGTERM or Ctrl-C on the supervisor stops every worker, each with the grace
period its app gives open requests.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agentkit.services.conversations import ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.services.keys import KeyStore
from agentkit.services.shared_state import (
    JobStore,
    SharedRateLimiter,
    SharedState,
    UploadOwnerStore,
)
from agentkit.services.storage import Database, PostgresDatabase, SqliteDatabase

if TYPE_CHECKING:
    from fastapi import FastAPI

    from agentkit.settings import Settings

WORKER_APP = "agentkit.services.workers:worker_app"


@dataclass
class Stores:
    feedback: FeedbackStore
    conversations: ConversationStore
    shared: SharedState
    _closing: ExitStack = field(default_factory=ExitStack, repr=False)

    def close(self) -> None:
        self._closing.close()


def open_databases(settings: Settings) -> dict[str, Database]:
    """The databases of ``settings`` by use: feedback, conversations, state (one PostgreSQL
    database for all three, or three SQLite files)."""
    if settings.database_url:
        shared = PostgresDatabase(settings.database_url)
        return {"feedback": shared, "conversations": shared, "state": shared}
    return {
        "feedback": SqliteDatabase(settings.feedback_db),
        "conversations": SqliteDatabase(settings.conversations_db),
        "state": SqliteDatabase(settings.state_db),
    }


def open_stores(settings: Settings, *, shared_state: bool | None = None) -> Stores:
    """The API's stores from ``settings``. ``shared_state`` (default: with a database URL or
    more than one worker): jobs, rate-limit counts and upload owners in the database too."""
    if shared_state is None:
        shared_state = bool(settings.database_url) or settings.api_workers > 1
    closing = ExitStack()
    try:
        databases = open_databases(settings)
        for database in {id(d): d for d in databases.values()}.values():
            closing.callback(database.close)
        state = databases["state"]
        shared = SharedState(keys=KeyStore(state))
        if shared_state:
            shared.jobs = JobStore(state)
            shared.limiter = SharedRateLimiter(state, settings.api_rate_limit_per_minute)
            shared.uploads = UploadOwnerStore(state) if settings.api_upload_dir else None
        return Stores(
            feedback=FeedbackStore(databases["feedback"]),
            conversations=ConversationStore(databases["conversations"]),
            shared=shared,
            _closing=closing,
        )
    except BaseException:
        closing.close()
        raise


def build_app(settings: Settings, stores: Stores) -> FastAPI:
    """The API over the index and model of ``settings``, on ``stores``."""
    from agentkit.llm import connect
    from agentkit.retrievers import Index
    from agentkit.services.api import ApiConfig, create_app

    index = Index.open(settings.index, settings=settings) if settings.index.exists() else None
    return create_app(
        connect(settings),
        index,
        feedback=stores.feedback,
        conversations=stores.conversations,
        config=ApiConfig.from_settings(settings),
        settings=settings,
        shared=stores.shared,
    )


def worker_app() -> FastAPI:
    """One worker's app (uvicorn's factory), from the settings in its environment; its stores
    close with the process."""
    from agentkit.services.lifecycle import SignalHandling
    from agentkit.settings import get_settings

    settings = get_settings()
    app = build_app(settings, open_stores(settings))
    app.state.signals = SignalHandling(app.state.shutdown, None)  # a signal's grace, per worker
    return app


def serve_workers(
    settings: Settings,
    host: str,
    port: int,
    *,
    environment: dict[str, str],
    log_level: str = "info",
) -> None:
    """Run ``settings.api_workers`` worker processes on ``host:port`` until SIGINT/SIGTERM;
    ``environment``: the settings the workers must see (``AGENTKIT_*``) on top of ours."""
    import uvicorn

    os.environ.update(environment)
    stores = open_stores(settings)  # migrate once here, before the workers race to
    stores.close()
    uvicorn.run(
        WORKER_APP,
        factory=True,
        host=host,
        port=port,
        workers=settings.api_workers,
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=int(settings.api_shutdown_grace_s) + 1,
    )
