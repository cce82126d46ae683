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

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Settings(BaseSettings):
    """agentkit configuration (``AGENTKIT_<FIELD>`` environment variables, ``agentkit.toml``)."""

    model_config = SettingsConfigDict(env_prefix="AGENTKIT_", extra="ignore")

    index: Path = Field(Path(".agentkit/index"), description="Index folder used by default.")
    embedding_model: str = Field(
        DEFAULT_EMBEDDING_MODEL, description="sentence-transformers model name or local path."
    )
    embedding_backend: Literal["auto", "onnx-int8", "torch"] = Field(
        "auto",
        description="auto: torch on CUDA, else onnx-int8 (ONNX Runtime, int8 weights) on CPU.",
    )
    embedding_device: Literal["auto", "cpu", "cuda"] = Field("auto")
    embedding_batch_size: int = Field(32, ge=1, le=4096)
    chunk_tokens: int = Field(
        0, ge=0, description="Chunk size in embedding-model tokens; 0 = the model's maximum."
    )
    chunk_overlap_tokens: int = Field(32, ge=0)
    max_query_chars: int = Field(4096, ge=16, description="Longer search queries are refused.")
    cache_dir: Path = Field(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "agentkit",
        description="Where converted models (ONNX, safetensors) are cached.",
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


def get_settings(**overrides: object) -> Settings:
    """Read the settings now (environment and ``agentkit.toml``), with ``overrides`` on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
