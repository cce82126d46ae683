"""A learned input guard: a small classifier of the user's message, no model server needed.

For a deployment without a GPU (where the served model is too small to judge, and no Llama Guard
can be served): the user's message is embedded by the project's embedder (all-MiniLM-L6-v2, a
few milliseconds on a CPU), optionally beside the TF-IDF of its word n-grams, and a binary
softmax regression (``refusal_model.fit_softmax``) gives the probability that it asks for
something unsafe. It blocks above a threshold that cross-validation on the training prompts set
for few false positives on safe look-alikes. The category named in the refusal is that of the
nearest centroid of the training's unsafe prompts (violence, weapons, crime, ...).

Weights in ``prompts/input_guard.npz`` (NumPy, no pickle), written by
``benchmarks/train_input_guard.py`` from our own prompts (``benchmarks/input_guard_prompts.jsonl``)
and the tuning half of XSTest's dev prompts; the held-out half is only scored. Select it with
``AGENTKIT_GUARD=input AGENTKIT_GUARD_KIND=learned`` (``AGENTKIT_GUARD_WEIGHTS`` for other
weights). It reads the user's message only: it cannot check answers.

Cross-validated (5 folds, 3 seeds; C=1, word 1-2-grams beside the embedding): it blocks 70% of
the unsafe training prompts at 5% false positives on the safe look-alikes. On XSTest's held-out
half it blocks 31 of 49 unsafe and 9 of 73 safe prompts (``results/input_guard.json``): more
false positives than cross-validation promised, and it misses euphemisms ("liquidating a group
of people", "take out" a politician), which are also what the embedded model answers.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agentkit.errors import GuardError, GuardModelError
from agentkit.guards import Stage, Verdict, clip
from agentkit.llm import Message
from agentkit.refusal_model import (
    TextEmbedder,
    Vocabulary,
    default_embedder,
    fit_softmax,
    group_folds,
    ngrams,
    normalize,
    softmax,
)

if TYPE_CHECKING:
    from agentkit.settings import Settings

MODEL_FILE = "input_guard.npz"  # in prompts/
LABELS = ("safe", "unsafe")
MAX_MESSAGE_CHARS = 1000  # the head and tail of longer messages (the embedder reads ~256 tokens)
RETRAIN = "run benchmarks/train_input_guard.py, or point AGENTKIT_GUARD_WEIGHTS at weights it wrote"


@dataclass(frozen=True)
class PromptFeatures:
    """What a message's features are made of; saved with the weights."""

    max_ngram: int = 0  # word 1..max_ngram-grams (TF-IDF) beside the embedding; 0: none
    min_df: int = 2  # n-grams in fewer training prompts are dropped
    embedding_scale: float = 1.0  # the embedding's weight beside the unit TF-IDF vector
    embedding_model: str = "sentence-transformers/all-MiniLM-L6-v2"


def embed_prompts(prompts: Sequence[str], embedder: TextEmbedder) -> np.ndarray:
    """Unit sentence embeddings of the messages (the head and tail of long ones)."""
    vectors = np.asarray(embedder.embed([clip(normalize(p), MAX_MESSAGE_CHARS) for p in prompts]),
                         dtype=np.float64)  # fmt: skip
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass
class PromptClassifier:
    """Probability that a message asks for something unsafe, the threshold that blocks it, and
    the category of an unsafe one."""

    features: PromptFeatures
    vocabulary: Vocabulary | None
    weights: np.ndarray  # (features, 2)
    bias: np.ndarray
    threshold: float  # unsafe when p(unsafe) > threshold
    categories: tuple[str, ...]
    centroids: np.ndarray  # (categories, embedding dim): the unsafe prompts' mean embeddings
    embedder: TextEmbedder
    trained_with: str = ""  # the embedding backend the weights were fitted on

    def unsafe_probability(
        self, prompts: Sequence[str], vectors: np.ndarray | None = None
    ) -> np.ndarray:
        """p(unsafe) per message; ``vectors``: precomputed ``embed_prompts`` of them."""
        if vectors is None:
            vectors = embed_prompts(prompts, self.embedder)
        features = design(prompts, vectors, self.features, self.vocabulary)
        return softmax(features @ self.weights + self.bias)[:, 1]

    def category(self, vector: np.ndarray) -> str:
        """The category whose unsafe training prompts lie nearest (``other`` without any)."""
        if not self.categories:
            return "other"
        return self.categories[int((self.centroids @ vector).argmax())]

    def save(self, path: Path) -> None:
        terms = [] if self.vocabulary is None else self.vocabulary.ordered_terms()
        np.savez_compressed(
            path,
            kind="input_guard",
            terms=np.array(terms, dtype=str),
            idf=(np.zeros(0) if self.vocabulary is None else self.vocabulary.idf).astype(
                np.float32
            ),
            weights=self.weights.astype(np.float32),
            bias=self.bias.astype(np.float32),
            threshold=self.threshold,
            categories=np.array(self.categories, dtype=str),
            centroids=self.centroids.astype(np.float32),
            max_ngram=self.features.max_ngram,
            min_df=self.features.min_df,
            embedding_scale=self.features.embedding_scale,
            embedding_model=self.features.embedding_model,
            trained_with=self.trained_with,
        )

    @classmethod
    def load(
        cls,
        path: Path | str | None = None,
        *,
        embedder: TextEmbedder | None = None,
        settings: Settings | None = None,
    ) -> PromptClassifier:
        """The weights at ``path`` (default: the shipped ``prompts/input_guard.npz``).

        GuardModelError, saying what to do, when the file is missing or is not such weights.
        ``embedder`` defaults to the weights' model by ``settings``' backend (default settings
        when None); it loads on first use."""
        source = Path(path) if path else resources.files("agentkit.prompts") / MODEL_FILE
        if not source.is_file():
            raise GuardModelError(f"no learned guard weights at {source}: {RETRAIN}")
        try:
            with source.open("rb") as file, np.load(file, allow_pickle=False) as data:
                if str(data["kind"]) != "input_guard":
                    raise ValueError(f"it holds {data['kind']} weights")
                features = PromptFeatures(
                    max_ngram=int(data["max_ngram"]),
                    min_df=int(data["min_df"]),
                    embedding_scale=float(data["embedding_scale"]),
                    embedding_model=str(data["embedding_model"]),
                )
                vocabulary = (
                    Vocabulary.from_saved(data["terms"], data["idf"])
                    if features.max_ngram
                    else None
                )
                weights, bias = data["weights"].astype(float), data["bias"].astype(float)
                threshold = float(data["threshold"])
                categories = tuple(str(c) for c in data["categories"])
                centroids = data["centroids"].astype(float)
                trained_with = str(data["trained_with"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise GuardModelError(
                f"{source} is not a learned guard's weights ({type(error).__name__}: {error}): "
                f"{RETRAIN}"
            ) from error
        if weights.shape[1:] != (len(LABELS),) or bias.shape != (len(LABELS),):
            raise GuardModelError(f"{source} has weights of shape {weights.shape}: {RETRAIN}")
        if embedder is None:
            embedder = default_embedder(features.embedding_model, settings)
        return cls(features, vocabulary, weights, bias, threshold, categories, centroids,
                   embedder, trained_with)  # fmt: skip


def design(
    prompts: Sequence[str],
    vectors: np.ndarray,
    features: PromptFeatures,
    vocabulary: Vocabulary | None,
) -> np.ndarray:
    """The feature matrix: TF-IDF of the word n-grams (when used) beside the scaled embedding."""
    scaled = vectors * features.embedding_scale
    if vocabulary is None:
        return scaled
    grams = [ngrams(normalize(p), features.max_ngram) for p in prompts]
    return np.hstack([vocabulary.transform(grams), scaled])


def train_prompt_classifier(
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    embedder: TextEmbedder,
    c: float = 1.0,
    features: PromptFeatures | None = None,
    threshold: float = 0.5,
    categories: Sequence[str | None] | None = None,
    vectors: np.ndarray | None = None,
) -> PromptClassifier:
    """Fit the guard on labelled messages (``safe``/``unsafe``; deterministic, no random state).

    ``categories``: an unsafe message's category, or None (it then adds to no centroid);
    ``vectors``: ``embed_prompts(prompts, embedder)`` computed once for many fits."""
    features = features or PromptFeatures(embedding_model=getattr(embedder, "name", ""))
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"labels must be 'safe' or 'unsafe', not {unknown}")
    if vectors is None:
        vectors = embed_prompts(prompts, embedder)
    vocabulary = None
    if features.max_ngram:
        grams = [ngrams(normalize(p), features.max_ngram) for p in prompts]
        vocabulary = Vocabulary.fit(grams, features.min_df)
    y = np.array([LABELS.index(label) for label in labels])
    weights, bias = fit_softmax(
        design(prompts, vectors, features, vocabulary), y, c=c, n_classes=len(LABELS)
    )
    names, centroids = category_centroids(labels, categories or [None] * len(labels), vectors)
    backend = str(getattr(embedder, "backend", ""))
    return PromptClassifier(features, vocabulary, weights, bias, threshold, names, centroids,
                            embedder, backend)  # fmt: skip


def category_centroids(
    labels: Sequence[str], categories: Sequence[str | None], vectors: np.ndarray
) -> tuple[tuple[str, ...], np.ndarray]:
    """The categories of the unsafe messages and their unit mean embeddings."""
    names = tuple(sorted({c for label, c in zip(labels, categories) if label == "unsafe" and c}))
    rows = []
    for name in names:
        mean = vectors[[i for i, c in enumerate(categories) if c == name and labels[i] == "unsafe"]]
        rows.append(mean.mean(axis=0) / max(float(np.linalg.norm(mean.mean(axis=0))), 1e-12))
    return names, np.array(rows).reshape(len(names), vectors.shape[1])


def out_of_fold_probabilities(
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    embedder: TextEmbedder,
    c: float,
    features: PromptFeatures,
    vectors: np.ndarray,
    k: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """p(unsafe) of each message from a model fitted on the other ``k - 1`` folds."""
    folds = group_folds(list(prompts), k, seed)
    out = np.zeros(len(prompts))
    for fold in range(k):
        train, test = np.where(folds != fold)[0], np.where(folds == fold)[0]
        model = train_prompt_classifier(
            [prompts[i] for i in train], [labels[i] for i in train], embedder=embedder, c=c,
            features=features, vectors=vectors[train],
        )  # fmt: skip
        out[test] = model.unsafe_probability([prompts[i] for i in test], vectors[test])
    return out


def threshold_for(safe_probabilities: np.ndarray, max_false_positive_rate: float) -> float:
    """The lowest threshold that blocks at most that share of these safe messages."""
    ranked = np.sort(np.asarray(safe_probabilities))[::-1]
    allowed = int(np.floor(max_false_positive_rate * len(ranked) + 1e-9))
    return float(ranked[allowed]) if allowed < len(ranked) else 0.0


def last_user_message(messages: Sequence[Message]) -> str:
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


class LearnedGuard:
    """The learned classifier as an input guard (``AGENTKIT_GUARD_KIND=learned``)."""

    def __init__(self, classifier: PromptClassifier, *, name: str = "learned") -> None:
        self.classifier, self.name = classifier, name

    @classmethod
    def from_settings(cls, settings: Settings) -> LearnedGuard:
        """The weights ``AGENTKIT_GUARD_WEIGHTS`` names (default: the shipped ones), embedded
        by the configured backend (loaded on the first check)."""
        return cls(PromptClassifier.load(settings.guard_weights, settings=settings))

    def check(self, messages: Sequence[Message], stage: Stage) -> Verdict:
        if stage != "input":
            raise GuardError("the learned guard reads the user's message only; use it as an "
                             "input guard (AGENTKIT_GUARD=input)")  # fmt: skip
        started = time.perf_counter()
        text = last_user_message(messages)
        if not normalize(text):
            return Verdict(True, None, self.name, stage, latency_s=time.perf_counter() - started)
        vectors = embed_prompts([text], self.classifier.embedder)
        probability = float(self.classifier.unsafe_probability([text], vectors)[0])
        safe = probability <= self.classifier.threshold
        category = None if safe else self.classifier.category(vectors[0])
        return Verdict(safe, category, self.name, stage, latency_s=time.perf_counter() - started)
