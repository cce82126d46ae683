"""Loading, chunking, embedding, the FAISS + SQLite index, and hybrid search."""

from .embedding import Embedder
from .index import Index, index_folder
from .loaders import register_loader, supported_extensions
from .types import ChunkSpan, Hit, LoadedDocument, SyncSummary

__all__ = [
    "ChunkSpan",
    "Embedder",
    "Hit",
    "Index",
    "LoadedDocument",
    "SyncSummary",
    "index_folder",
    "register_loader",
    "supported_extensions",
]
