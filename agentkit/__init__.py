"""agentkit: RAG, PAL and ReAct agents on a self-hosted, aligned model served by vLLM."""

from agentkit.errors import (
    AgentkitError,
    ConfigError,
    EmbeddingModelError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    InvalidPathError,
    InvalidQueryError,
)
from agentkit.retrievers import (
    Hit,
    Index,
    LoadedDocument,
    SyncSummary,
    index_folder,
    register_loader,
)
from agentkit.settings import Settings, get_settings

__version__ = "0.1.0"

__all__ = [
    "AgentkitError",
    "ConfigError",
    "EmbeddingModelError",
    "Hit",
    "Index",
    "IndexFormatError",
    "IndexLockedError",
    "IndexNotFoundError",
    "InvalidPathError",
    "InvalidQueryError",
    "LoadedDocument",
    "Settings",
    "SyncSummary",
    "get_settings",
    "index_folder",
    "register_loader",
]
