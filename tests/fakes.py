"""Test doubles that are real implementations of the embedder interface."""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")


class WordCounter:
    """Counts words and punctuation marks as tokens (the TokenCounter interface)."""

    def count(self, text: str) -> int:
        return len(_TOKEN.findall(text))

    def cut(self, text: str, max_tokens: int) -> list[str]:
        starts = [m.start() for m in _TOKEN.finditer(text)]
        cuts = starts[max_tokens::max_tokens]
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]


class HashingEmbedder:
    """Bag-of-words vectors by feature hashing: deterministic, no model, ~microseconds."""

    backend = "hashing"

    def __init__(
        self, name: str = "test/hashing", dim: int = 64, max_tokens: int = 64, delay_s: float = 0.0
    ):
        self.name, self.dim, self.max_tokens, self.delay_s = name, dim, max_tokens, delay_s
        self.counter = WordCounter()
        self.embedded: list[str] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.embedded.extend(texts)
        if self.delay_s:
            time.sleep(self.delay_s)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _TOKEN.findall(text.lower()):
                bucket = int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little")
                out[row, bucket % self.dim] += 1.0
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
