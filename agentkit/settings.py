"""All of agentkit's settings in one place.

Values come, in order of precedence, from keyword arguments, ``AGENTKIT_*`` environment
variables, and an optional ``agentkit.toml`` in the working directory (or the file named by
``AGENTKIT_CONFIG``). Every field below is documented in the README.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agentkit.mcp_client import MCPServerSpec  # pydantic needs it at run time

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


# the guards AGENTKIT_GUARD_KIND names; learned+X: the learned input guard first, then X
GuardKind = Literal[
    "auto", "judge", "llama-guard", "learned", "learned+judge", "learned+llama-guard"
]


class Settings(BaseSettings):
    """agentkit configuration (``AGENTKIT_<FIELD>`` environment variables, ``agentkit.toml``)."""

    model_config = SettingsConfigDict(env_prefix="AGENTKIT_", extra="ignore")

    index: Path = Field(Path(".agentkit/index"), description="Index folder used by default.")
    embedding_model: str = Field(
        DEFAULT_EMBEDDING_MODEL, description="sentence-transformers model name or local path."
    )
    embedding_backend: Literal["auto", "onnx-int8", "onnx-fp32", "torch"] = Field(
        "auto",
        description="auto: torch on CUDA; on a CPU the fastest of onnx-int8, onnx-fp32 (ONNX "
        "Runtime, int8 or float32 weights) and torch, measured once per CPU and cached.",
    )
    embedding_device: Literal["auto", "cpu", "cuda"] = Field("auto")
    embedding_batch_size: int = Field(32, ge=1, le=4096)
    chunk_tokens: int = Field(
        0, ge=0, description="Chunk size in embedding-model tokens; 0 = the model's maximum."
    )
    chunk_overlap_tokens: int = Field(32, ge=0)
    max_file_bytes: int = Field(
        20 << 20, ge=1, description="Larger files are skipped (reported) when indexing a folder."
    )
    max_query_chars: int = Field(4096, ge=16, description="Longer search queries are refused.")
    llm_url: str | None = Field(
        None,
        description="OpenAI-compatible model server(s); a comma-separated list spreads requests "
        "over replicas. Unset: http://127.0.0.1:<model_port>.",
    )
    llm_api_key: str | None = Field(None, description="Bearer key for the model server.")
    llm_model: str | None = Field(None, description="Served model name; unset: the first listed.")
    llm_timeout_s: float = Field(300.0, gt=0, description="Per-request read timeout.")
    llm_max_retries: int = Field(3, ge=0, description="Retries on connection errors, 429, 5xx.")
    model_port: int = Field(8000, ge=1, le=65535, description="Port of `agentkit model serve`.")
    model_precision: Literal["float32", "int8"] = Field(
        "float32",
        description="The embedded model `agentkit model prepare` builds and `model serve` serves: "
        "float32, or int8 (W8A8; faster only on CPUs with VNNI).",
    )
    rag_k: int = Field(5, ge=1, le=50, description="Sources retrieved per question.")
    rag_max_tokens: int = Field(384, ge=16, description="Longest answer, in model tokens.")
    rag_min_similarity: float = Field(
        0.2, description="Sources below this cosine similarity to the question are not relevant."
    )
    sandbox_workers: int = Field(
        2, ge=1, le=64, description="Warm sandbox workers: programs that can run at once."
    )
    sandbox_allow_weak: bool = Field(
        False,
        description="Run untrusted code even when an OS layer (namespaces, seccomp, Landlock) is "
        "missing; every result then names what is missing.",
    )
    sandbox_uid: int = Field(
        65534, ge=1, description="Unprivileged uid the sandbox runs as (on the host too)."
    )
    api_keys: str | None = Field(
        None,
        description="Comma-separated bearer keys the REST API accepts, each `name:role:key` "
        "(role `admin` or `user`) or a bare key (an admin named key1, key2, ...); unset: open.",
    )
    api_max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger requests get 413.")
    api_rate_limit_per_minute: int = Field(0, ge=0, description="Per API key; 0: no limit.")
    api_document_roots: str | None = Field(
        None, description="Comma-separated folders POST /v1/documents/folder may index."
    )
    api_upload_dir: Path | None = Field(None, description="Enables uploads; files are kept here.")
    api_protect_docs: bool | None = Field(
        None,
        description="/metrics, /docs, /redoc and /openapi.json need a key; unset: when keys "
        "are set.",
    )
    api_shutdown_grace_s: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM/SIGINT, how long open chat requests may still run; then streams "
        "end with an error event and a second signal exits at once.",
    )
    conversations_db: Path = Field(
        Path(".agentkit/conversations.sqlite"), description="Server-side chat history."
    )
    feedback_db: Path = Field(
        Path(".agentkit/feedback.sqlite"), description="Where the API stores human feedback."
    )
    state_db: Path = Field(
        Path(".agentkit/state.sqlite"),
        description="API keys added with `agentkit keys add`, and with several workers the "
        "document jobs, rate-limit counts and upload owners they share.",
    )
    database_url: str | None = Field(
        None,
        description="postgresql://user:password@host:port/db: conversations, feedback, "
        "labeling, keys, jobs and rate limits in PostgreSQL, for several workers and replicas; "
        "unset: the SQLite files above.",
    )
    api_workers: int = Field(
        1, ge=1, le=256, description="API worker processes of `agentkit serve` (--workers)."
    )
    constitution: Path | None = Field(
        None, description="Constitution file (Markdown principles); unset: the default one."
    )
    guard: Literal["none", "input", "output", "both"] = Field(
        "none", description="Moderate the user's message, the answer, or both, for every agent."
    )
    guard_policy: Literal["block", "flag", "revise"] = Field(
        "block", description="What an unsafe verdict does: refuse, mark it, or critique-revise."
    )
    guard_on_error: Literal["open", "closed"] = Field(
        "closed", description="When a guard fails: let the message through (open) or block it."
    )
    guard_url: str | None = Field(
        None, description="A guard model served by vLLM (e.g. Llama Guard); unset: the judge."
    )
    guard_model: str | None = Field(None, description="The guard model's served name.")
    guard_kind: GuardKind = Field(
        "auto",
        description="Which guard: the served model as judge, a Llama Guard model at guard_url, "
        "or the learned input classifier (CPU, no model server; input only); auto: llama-guard "
        "when guard_url is set, else judge. learned+judge / learned+llama-guard layer them: the "
        "learned guard checks the message first, the other guard then checks what AGENTKIT_GUARD "
        "names.",
    )
    guard_weights: Path | None = Field(
        None, description="The learned guard's weights (.npz); unset: the shipped ones."
    )
    revise: bool = Field(
        False, description="Critique every answer against the constitution and revise it."
    )
    reward_url: str | None = Field(
        None, description="A reward model served by vLLM (pooling API) for best-of-n."
    )
    reward_model: str | None = Field(None, description="The reward model's served name.")
    cache_dir: Path = Field(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "agentkit",
        description="Where converted models (ONNX, safetensors) are cached.",
    )
    mcp_servers: list[MCPServerSpec] = Field(
        default_factory=list,
        description="MCP servers whose tools agentkit-react may call: commands (stdio) or URLs "
        "(streamable HTTP), or tables with command/url, headers, env, timeout_s; in the "
        "environment a JSON list.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("AGENTKIT_CONFIG", "agentkit.toml"))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file))

    def llm_urls(self) -> list[str]:
        """The model server URLs: ``llm_url`` split on commas, else the local default port."""
        if self.llm_url:
            return [u.strip() for u in self.llm_url.split(",") if u.strip()]
        return [f"http://127.0.0.1:{self.model_port}"]


def get_settings(**overrides: object) -> Settings:
    """Read the settings now (environment and ``agentkit.toml``), with ``overrides`` on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
