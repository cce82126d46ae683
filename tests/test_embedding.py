"""The embedding backends and ``auto``'s choice among them on a CPU (fakes: no model, no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agentkit import Index
from agentkit.retrievers import embedding
from agentkit.retrievers.embedding import (
    Embedder,
    choose_backend,
    measure_rates,
    pick_backend,
)
from agentkit.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEncoder:
    """Takes ``seconds_per_text`` of the fake clock per text; ``slow_calls`` calls take 10x."""

    dim, max_tokens, counter = 8, 256, None

    def __init__(
        self, backend: str, seconds_per_text: float = 0.01, clock: FakeClock | None = None
    ):
        self.backend, self.seconds_per_text, self.clock = backend, seconds_per_text, clock
        self.slow_calls: set[int] = set()
        self.calls = 0

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        if self.clock is not None:
            slow = 10 if self.calls in self.slow_calls else 1
            self.clock.now += slow * self.seconds_per_text * len(texts)
        self.calls += 1
        return np.zeros((len(texts), self.dim), dtype=np.float32)


KEY = {"version": 1, "cpu": {"model": "AMD EPYC", "flags": ["avx2"]}, "cores": 2}
RATES = {"onnx-int8": 16.3, "onnx-fp32": 16.5, "torch": 12.2}


class Recorder:
    """``build`` and ``measure`` for ``choose_backend``, counting their calls."""

    def __init__(self, rates: dict[str, float], broken: tuple[str, ...] = ()) -> None:
        self.rates, self.broken = rates, broken
        self.built: list[str] = []
        self.measured: list[list[str]] = []

    def build(self, backend: str) -> FakeEncoder:
        if backend in self.broken:
            raise RuntimeError(f"{backend} is broken here")
        self.built.append(backend)
        return FakeEncoder(backend)

    def measure(self, encoders: dict) -> dict[str, float]:
        self.measured.append(list(encoders))
        return {backend: self.rates[backend] for backend in encoders}


@pytest.mark.parametrize(
    "rates, chosen",
    [
        ({"onnx-int8": 30.0, "onnx-fp32": 16.0, "torch": 12.0}, "onnx-int8"),  # int8 pays
        ({"onnx-int8": 16.3, "onnx-fp32": 16.5, "torch": 12.2}, "onnx-fp32"),  # Zen 1
        ({"onnx-int8": 18.5, "onnx-fp32": 16.5, "torch": 12.2}, "onnx-fp32"),  # 12% faster
        ({"onnx-int8": 10.0, "onnx-fp32": 11.0, "torch": 14.0}, "torch"),
        ({"onnx-int8": 10.0}, "onnx-int8"),
    ],
)
def test_pick_backend_takes_the_fastest_and_int8_only_when_it_pays(
    rates: dict[str, float], chosen: str
) -> None:
    assert pick_backend(rates) == chosen


def test_measure_rates_times_each_encoder_and_keeps_its_best_round() -> None:
    clock = FakeClock()
    fast = FakeEncoder("onnx-fp32", 0.05, clock)
    slow = FakeEncoder("torch", 0.10, clock)
    fast.slow_calls = {1}  # the first timed round (after the warm-up call) met other load
    rates = measure_rates(
        {"onnx-fp32": fast, "torch": slow}, ["text"] * 20, 32, rounds=2, clock=clock
    )
    assert rates == pytest.approx({"onnx-fp32": 20.0, "torch": 10.0})
    assert fast.calls == slow.calls == 3  # a warm-up, then one call a round


def test_auto_measures_once_caches_and_reuses_the_choice(tmp_path: Path) -> None:
    cache_file = tmp_path / "onnx" / "model-x" / "backend-1.json"
    first = Recorder(RATES)
    choice, encoder = choose_backend(KEY, cache_file, first.build, first.measure)
    assert (choice.backend, choice.reason, encoder.backend) == (
        "onnx-fp32",
        "measured",
        "onnx-fp32",
    )
    assert first.measured == [["onnx-int8", "onnx-fp32", "torch"]]
    saved = json.loads(cache_file.read_text())
    assert saved["backend"] == "onnx-fp32" and saved["rates"] == RATES and saved["key"] == KEY

    again = Recorder({})  # would fail if asked to measure
    choice, encoder = choose_backend(KEY, cache_file, again.build, again.measure)
    assert (choice.backend, choice.reason, choice.rates) == ("onnx-fp32", "cached", RATES)
    assert again.measured == [] and again.built == ["onnx-fp32"]


@pytest.mark.parametrize(
    "change",
    [
        {"cpu": {"model": "AMD EPYC", "flags": ["avx2", "avx512_vnni"]}},
        {"cores": 16},
        {"libraries": {"onnxruntime": "9.9"}},
    ],
)
def test_a_different_cpu_or_runtime_measures_again(tmp_path: Path, change: dict) -> None:
    cache_file = tmp_path / "backend.json"
    choose_backend(KEY, cache_file, Recorder(RATES).build, Recorder(RATES).measure)
    other = Recorder({"onnx-int8": 40.0, "onnx-fp32": 16.5, "torch": 12.2})
    choice, _ = choose_backend({**KEY, **change}, cache_file, other.build, other.measure)
    assert (choice.backend, choice.reason) == ("onnx-int8", "measured")
    assert len(other.measured) == 1


def test_a_damaged_cache_file_measures_again(tmp_path: Path) -> None:
    cache_file = tmp_path / "backend.json"
    cache_file.write_text("{not json")
    recorder = Recorder(RATES)
    choice, _ = choose_backend(KEY, cache_file, recorder.build, recorder.measure)
    assert choice.reason == "measured" and json.loads(cache_file.read_text())["backend"]


def test_a_backend_that_cannot_load_is_left_out(tmp_path: Path) -> None:
    recorder = Recorder(RATES, broken=("onnx-fp32",))
    choice, _ = choose_backend(KEY, tmp_path / "c.json", recorder.build, recorder.measure)
    assert recorder.measured == [["onnx-int8", "torch"]]
    assert choice.backend == "onnx-int8"


def test_when_no_backend_loads_the_first_error_is_raised(tmp_path: Path) -> None:
    recorder = Recorder(RATES, broken=("onnx-int8", "onnx-fp32", "torch"))
    with pytest.raises(RuntimeError, match="onnx-int8 is broken"):
        choose_backend(KEY, tmp_path / "c.json", recorder.build, recorder.measure)


@pytest.fixture
def fake_encoders(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Embedder's encoders replaced by fakes, on a machine without CUDA."""
    recorder = Recorder(RATES)
    monkeypatch.setattr(embedding, "cuda_available", lambda: False)
    monkeypatch.setattr(embedding, "_TorchEncoder", lambda path, device: recorder.build("torch"))
    monkeypatch.setattr(
        embedding,
        "_OnnxEncoder",
        lambda model_dir, pooling, cache, backend: recorder.build(backend),
    )
    monkeypatch.setattr(Embedder, "measure", lambda self, encoders: recorder.measure(encoders))
    return recorder


@pytest.mark.parametrize("backend", ["onnx-int8", "onnx-fp32", "torch"])
def test_a_named_backend_is_used_without_measuring(
    fake_encoders: Recorder, tmp_path: Path, backend: str
) -> None:
    embedder = Embedder(backend=backend, cache_dir=tmp_path)
    assert embedder.backend == backend and embedder.choice is None
    assert fake_encoders.built == [backend] and fake_encoders.measured == []
    assert not list(tmp_path.rglob("backend-*.json"))


def test_auto_on_a_cpu_records_its_choice_beside_the_onnx_export(
    fake_encoders: Recorder, tmp_path: Path
) -> None:
    embedder = Embedder(cache_dir=tmp_path)
    assert embedder.backend == "onnx-fp32" and embedder.choice.reason == "measured"
    [cached] = tmp_path.glob("onnx/*/backend-*.json")
    assert json.loads(cached.read_text())["key"]["cpu"] == embedding.cpu_info()
    assert Embedder(cache_dir=tmp_path).choice is None  # not loaded yet
    again = Embedder(cache_dir=tmp_path)
    assert again.backend == "onnx-fp32" and again.choice.reason == "cached"
    assert len(fake_encoders.measured) == 1


def test_an_index_keeps_the_backend_it_was_built_with(
    fake_encoders: Recorder, tmp_path: Path
) -> None:
    # auto's choice may change later (another CPU, a new runtime); int8 and float32 vectors
    # differ slightly, so an index goes on with the backend recorded in its manifest.
    settings = Settings(index=tmp_path / "index", cache_dir=tmp_path / "cache")
    Index.create(settings.index, settings=settings).close()
    for path in (tmp_path / "cache").rglob("backend-*.json"):
        path.unlink()
    fake_encoders.rates = {"onnx-int8": 90.0, "onnx-fp32": 16.5, "torch": 12.2}
    with Index.open(settings.index, settings=settings) as index:
        assert index.store.manifest["embedding"]["backend"] == "onnx-fp32"
        assert index.embedder.backend == "onnx-fp32"
    assert len(fake_encoders.measured) == 1


def test_float32_onnx_reproduces_the_torch_vectors() -> None:
    texts = ["a short query", "代码 检索", " ".join(embedding.sample_texts(3))]
    onnx = Embedder(backend="onnx-fp32").embed(texts)
    torch = Embedder(backend="torch").embed(texts)
    assert (onnx * torch).sum(axis=1).min() > 0.9999
