"""agentkit's own exceptions. Every message says what the user can do next."""

from __future__ import annotations


class AgentkitError(Exception):
    """Base class of every error agentkit raises on purpose."""


class ConfigError(AgentkitError):
    """A setting is missing or invalid."""


class InvalidPathError(AgentkitError):
    """A path given by the user does not exist or is not the kind of path expected."""


class OutsideRootsError(InvalidPathError):
    """A folder outside the folders a server was told it may index."""


class IndexNotFoundError(AgentkitError):
    """No index exists at the given path."""


class IndexFormatError(AgentkitError):
    """The index on disk was written by another format version or is damaged."""


class IndexCorruptError(IndexFormatError):
    """The index's files are damaged (empty, truncated, not SQLite, tables missing)."""


class IndexLockedError(AgentkitError):
    """Another process is writing to the same index."""


class EmbeddingModelError(AgentkitError):
    """The embedding model cannot be loaded or does not match the index."""


class InvalidQueryError(AgentkitError):
    """A search query is empty or too long."""


class ModelPrepareError(AgentkitError):
    """The embedded model cannot be assembled, verified or converted."""


class ModelServerError(AgentkitError):
    """The model server cannot be started, reached or used."""


class LLMError(AgentkitError):
    """A request to the model server failed in a way retries cannot fix."""


class ContextBudgetError(AgentkitError):
    """The prompt cannot fit the served model's context even with every source dropped."""


class SandboxError(AgentkitError):
    """The sandbox itself failed (not the program inside it)."""


class ToolError(AgentkitError):
    """A tool is misdefined or was called with invalid arguments."""


class GuardError(AgentkitError):
    """A guard, judge or reward model failed or gave an answer that does not parse."""


class GuardModelError(GuardError):
    """The learned guard's weights are missing or damaged."""
