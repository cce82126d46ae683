"""``index_folder(..., ray=ADDRESS)`` on a real Ray cluster: a head and a worker node started
with ``ray start`` on loopback. The index it writes holds exactly what the single-process
indexer writes for the same folder, first run and incremental run (a file changed, one deleted,
one added, one left as it was)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from fakes import HashingEmbedder

from agentkit.retrievers import Index, index_folder
from agentkit.settings import Settings

pytestmark = pytest.mark.integration
pytest.importorskip("ray", reason="Ray is not installed: pip install 'agentkit[ray]'")
RAY = Path(sys.executable).parent / "ray"
TOKEN = secrets.token_hex(32)  # Ray's token authentication, with a token of these tests' own
DRIVER = """
import json, sys
import ray
sys.path.insert(0, sys.argv[4])
from fakes import HashingEmbedder
from agentkit.retrievers import index_folder
from agentkit.settings import Settings
ray.init(address=sys.argv[3], _node_ip_address="127.0.0.2", log_to_driver=False)
nodes = sum(node["Alive"] for node in ray.nodes())
summary = index_folder(sys.argv[1], sys.argv[2], settings=Settings(), embedder=HashingEmbedder(),
                       ray=sys.argv[3])
print(json.dumps({**summary.to_dict(), "nodes": nodes}))
"""


def ray_environment() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}  # fmt: skip


def index_on_ray(docs: Path, index: Path, address: str) -> dict:
    """``index_folder(docs, index, ray=address)`` in a driver process of its own (Ray's token
    is read from its environment)."""
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(docs), str(index), address, str(Path(__file__).parent)],
        env=ray_environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head and a worker node (one CPU each) on loopback: the head's address."""
    port = free_port()
    temp = Path("/tmp") / f"ray-agentkit-{os.getpid()}"  # Ray's socket paths must be short
    # 127.0.0.2: Ray replaces 127.0.0.1 (not 127.0.0.2) by the machine's address
    common = ["--node-ip-address", "127.0.0.2", "--num-cpus", "1", "--disable-usage-stats",
              "--block"]  # fmt: skip
    environment = ray_environment()
    address = f"127.0.0.2:{port}"
    nodes: list[subprocess.Popen] = []

    def start(*arguments: str) -> None:
        """``ray start ... --block``, once it says the node runs."""
        node = subprocess.Popen(
            [str(RAY), "start", *arguments, *common], env=environment, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        nodes.append(node)
        said = []
        for line in node.stdout:  # type: ignore[union-attr]
            said.append(line)
            if "Ray runtime started" in line:
                break
        else:
            raise AssertionError("ray start failed:\n" + "".join(said[-30:]))
        threading.Thread(target=node.stdout.read, daemon=True).start()  # type: ignore[union-attr]

    try:
        start("--head", "--port", str(port), "--include-dashboard=false",
              "--temp-dir", str(temp))  # fmt: skip
        start("--address", address)
        yield address
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:  # its raylet and workers are in its session
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def contents(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each document's chunks (id and text), by source."""
    with Index.open(path, embedder=HashingEmbedder()) as index:
        rows = index.store.db.execute(
            "SELECT d.source, c.id, c.text FROM chunks c JOIN documents d ON d.id = c.document_id "
            "ORDER BY d.source, c.ordinal"
        ).fetchall()
    found: dict[str, list[tuple[str, str]]] = {}
    for source, chunk_id, text in rows:
        found.setdefault(source, []).append((chunk_id, text))
    return found


def test_indexing_on_a_ray_cluster_writes_what_one_process_writes(
    ray_cluster: str, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    for i in range(40):
        (docs / "guide" / f"page{i}.md").write_text(
            f"# Page {i}\n\nThe walrus number {i} eats fish.\n\n## More\n\n" + "word " * (i * 7)
        )
    (docs / "notes.txt").write_text("Plain notes.\n")
    (docs / "image.png").write_bytes(b"\x89PNG")
    settings = Settings(cache_dir=tmp_path / "cache")

    def both() -> tuple:
        alone = index_folder(
            docs, tmp_path / "alone", settings=settings, embedder=HashingEmbedder()
        )
        spread = index_on_ray(docs, tmp_path / "ray", ray_cluster)
        assert contents(tmp_path / "ray") == contents(tmp_path / "alone")
        return alone, spread

    alone, spread = both()
    assert spread["nodes"] == 2 and spread["added"] == alone.added == 41
    assert spread["chunks_embedded"] == alone.chunks_embedded
    (docs / "guide" / "page3.md").write_text("# Page 3\n\nRewritten.\n")
    (docs / "guide" / "page4.md").unlink()
    (docs / "new.md").write_text("# New\n\nA new page.\n")
    alone, spread = both()
    assert (alone.added, alone.updated, alone.removed, alone.unchanged) == (1, 1, 1, 39)
    assert [spread[k] for k in ("added", "updated", "removed", "unchanged")] == [1, 1, 1, 39]
    with Index.open(tmp_path / "ray", embedder=HashingEmbedder()) as index:
        assert index.search("walrus number 12 eats fish", k=1)[0].source == "guide/page12.md"
