"""What the API is configured with (``ApiConfig``, from ``AGENTKIT_API_*``) and what its routes
share once it is built (``ApiState``)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agentkit.agents import AgentContext
from agentkit.llm import ChatModel
from agentkit.retrievers import Index
from agentkit.retrievers.uploads import UploadOwners
from agentkit.services.auth import ApiKey, parse_api_keys
from agentkit.services.conversations import ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.services.jobs import JobRunner
from agentkit.services.lifecycle import Shutdown
from agentkit.services.metrics import Metrics
from agentkit.settings import Settings
from agentkit.tools.sandbox import Sandbox


@dataclass
class ApiConfig:
    api_keys: tuple[str | ApiKey, ...] = ()  # entries of AGENTKIT_API_KEYS, see parse_api_keys
    max_body_bytes: int = 1 << 20
    rate_limit_per_minute: int = 0  # 0: no limit
    cors_origins: tuple[str, ...] = ()
    document_roots: tuple[str, ...] = ()  # folders POST /v1/documents/folder may index
    upload_dir: str | None = None  # where uploaded files are kept; None: no uploads
    protect_docs: bool | None = None  # /metrics, /docs, /redoc, /openapi.json need a key;
    # None: when keys are set
    shutdown_grace_s: float = 10.0  # on shutdown, how long open chat requests may still run
    keys: tuple[ApiKey, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = parse_api_keys(self.api_keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiConfig:
        """The API's configuration from ``AGENTKIT_API_*`` settings (ConfigError if malformed)."""

        def listed(text: str | None) -> tuple[str, ...]:
            return tuple(item.strip() for item in (text or "").split(",") if item.strip())

        return cls(
            api_keys=listed(settings.api_keys),
            max_body_bytes=settings.api_max_body_bytes,
            rate_limit_per_minute=settings.api_rate_limit_per_minute,
            document_roots=listed(settings.api_document_roots),
            upload_dir=str(settings.api_upload_dir) if settings.api_upload_dir else None,
            protect_docs=settings.api_protect_docs,
            shutdown_grace_s=settings.api_shutdown_grace_s,
        )


@dataclass
class ApiState:
    """What the routes of one app share: the agents' context, the stores, the running jobs,
    the upload folder, the shutdown, and the paths that never leave the server."""

    config: ApiConfig
    settings: Settings
    context: AgentContext
    metrics: Metrics
    stopping: Shutdown
    jobs: JobRunner
    feedback: FeedbackStore | None = None
    conversations: ConversationStore | None = None
    upload_root: Path | None = None
    uploads: UploadOwners | None = None
    upload_lock: threading.Lock = field(default_factory=threading.Lock)  # upload checks/writes
    document_roots: list[Path] = field(default_factory=list)
    server_paths: list[str | Path] = field(default_factory=list)

    @property
    def model(self) -> ChatModel:
        return self.context.model

    @property
    def index(self) -> Index | None:
        return self.context.index

    @property
    def sandbox(self) -> Sandbox | None:
        return self.context.sandbox

    def relative(self, text: str) -> str:
        """``text`` with the server's absolute paths made relative (``relative_paths``)."""
        return relative_paths(text, self.server_paths)


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\":]+/)+([^\s/'\":]*)")


def relative_paths(text: str, bases: Iterable[str | Path]) -> str:
    """``text`` with the server's absolute paths made relative: under one of ``bases`` (the
    index, the upload folder, the document roots) relative to it, any other one as its last
    part only."""
    for base in sorted({str(b).rstrip("/") for b in bases if str(b).startswith("/")}, key=len)[
        ::-1
    ]:
        text = text.replace(base + "/", "").replace(base, ".")
    return ABSOLUTE_PATH.sub(lambda m: m.group(1), text)
