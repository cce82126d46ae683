"""Preparing the embedded model and supervising a model server, without vLLM."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from agentkit.errors import ModelPrepareError, ModelServerError
from agentkit.services.model_prepare import EmbeddedModel, assemble_gguf, prepare_model
from agentkit.services.model_server import ModelServer, ServeOptions, build_command

PARTS = [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]


@pytest.fixture
def parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddedModel:
    for i, data in enumerate(PARTS, 1):
        folder = tmp_path / "site" / f"fake_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(PARTS)
    return EmbeddedModel(
        "fake",
        "fake",
        ("fake_part1", "fake_part2", "fake_part3"),
        len(whole),
        hashlib.sha256(whole).hexdigest(),
    )


def test_parts_are_concatenated_in_order_and_verified(parts: EmbeddedModel, tmp_path: Path) -> None:
    assemble_gguf(parts, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"".join(PARTS)


def test_a_wrong_checksum_is_an_error_and_leaves_no_file(
    parts: EmbeddedModel, tmp_path: Path
) -> None:
    bad = EmbeddedModel(parts.name, parts.served_name, parts.part_packages, parts.size, "0" * 64)
    with pytest.raises(ModelPrepareError, match="sha256 .* expected .* reinstall"):
        assemble_gguf(bad, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_missing_part_names_the_extra_to_install(parts: EmbeddedModel, tmp_path: Path) -> None:
    missing = EmbeddedModel("x", "x", (*parts.part_packages, "no_such_part_pkg"), 1, "0" * 64)
    with pytest.raises(
        ModelPrepareError, match=r"no-such-part-pkg is not installed.*agentkit\[cpu\]"
    ):
        assemble_gguf(missing, tmp_path / "m.gguf")


def test_an_unknown_embedded_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelPrepareError, match="unknown embedded model 'nope'.*--model"):
        prepare_model(tmp_path, "nope")


def test_cpu_and_gpu_commands() -> None:
    cpu = build_command(ServeOptions(port=9001), "/m", "m", "cpu")
    assert cpu[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cpu)
    for part in (
        "--model /m",
        "--port 9001",
        "--dtype float32",
        "--max-model-len 4096",
        "--enforce-eager",
        "--served-model-name m",
    ):
        assert part in joined
    gpu = " ".join(
        build_command(
            ServeOptions(tensor_parallel_size=2, gpu_memory_utilization=0.8, quantization="awq"),
            "Qwen/Qwen2.5-7B-Instruct",
            "Qwen/Qwen2.5-7B-Instruct",
            "cuda",
        )
    )
    assert "--tensor-parallel-size 2" in gpu and "--gpu-memory-utilization 0.8" in gpu
    assert "--quantization awq" in gpu and "--enforce-eager" not in gpu and "--dtype" not in gpu


def test_a_busy_port_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = ModelServer(ServeOptions(port=s.getsockname()[1]), tmp_path)
        with pytest.raises(ModelServerError, match="already in use"):
            server.start()


FAKE_SERVER = textwrap.dedent("""
    import http.server, os, sys, time
    time.sleep(float(sys.argv[2]))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(str(os.getpid()).encode())
        def log_message(self, *a): pass
    print("fake server up", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_is_restarted_when_it_dies_and_stopped_with_its_group(tmp_path: Path) -> None:
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SERVER)
    port = free_port()
    server = ModelServer(ServeOptions(port=port, max_restarts=1, startup_timeout_s=30), tmp_path)
    url = server.launch([sys.executable, str(script), str(port), "0.2"])
    first = int(httpx.get(url + "/health").text)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.restarts < 1 or not server._process or server._process.poll() is not None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    while True:
        try:
            second = int(httpx.get(url + "/health").text)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert second != first and "fake server up" in server.log_file.read_text()
    server.stop()
    server.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)


def test_a_server_that_dies_while_starting_shows_its_log(tmp_path: Path) -> None:
    server = ModelServer(ServeOptions(port=free_port()), tmp_path)
    with pytest.raises(ModelServerError, match="(?s)exited with status 3.*boom"):
        server.launch([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])


def test_the_server_does_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SERVER)
    port = free_port()
    supervisor = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from agentkit.services.model_server import ModelServer, ServeOptions
        server = ModelServer(ServeOptions(port={port}), Path({str(tmp_path)!r}))
        server.launch([sys.executable, {str(script)!r}, "{port}", "0"])
        print(server._process.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # running
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the model server outlived its supervisor"


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
