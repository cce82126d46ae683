"""The CLI end to end with the real embedding model (int8 ONNX by default)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agentkit.cli import app
from agentkit.retrievers.embedding import Embedder

pytestmark = pytest.mark.integration
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample-docs"
runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout + (result.stderr or "")


def test_index_then_search_cites_the_file_that_holds_the_answer(tmp_path: Path) -> None:
    index = str(tmp_path / "index")
    code, out = run("index", str(SAMPLE), "--index", index, "--json")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["added"] == 4 and summary["chunks_total"] >= 4
    code, out = run(
        "search", "What was the code name of the first release?", "--index", index, "--json"
    )
    assert code == 0, out
    hits = json.loads(out)
    assert hits[0]["source"] == "release-notes.txt"
    assert hits[0]["location"].endswith("release-notes.txt:1")
    code, out = run("index", str(SAMPLE), "--index", index, "--json")
    assert json.loads(out)["unchanged"] == 4 and json.loads(out)["chunks_embedded"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "/nonexistent/folder"], "does not exist"),
        (["search", "   "], "empty"),
        (["search", "x" * 100_000], "100,000 characters"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    index = str(tmp_path / "index")
    run("index", str(SAMPLE), "--index", index, "--json")
    code, out = run(*args, "--index", index)
    assert code == 1
    assert message in out and "Traceback" not in out


def test_int8_onnx_embeddings_stay_close_to_fp32_torch() -> None:
    texts = [p.read_text() for p in sorted(SAMPLE.iterdir())] + ["a short query", "代码 检索"]
    int8 = Embedder(backend="onnx-int8").embed(texts)
    fp32 = Embedder(backend="torch").embed(texts)
    cosine = (int8 * fp32).sum(axis=1)
    assert cosine.min() > 0.97, cosine
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)


def test_parallel_onnx_batches_keep_each_vector_with_its_text() -> None:
    # Many texts of different lengths: several length-sorted batches run on two sessions.
    vocabulary = sorted({w for p in SAMPLE.iterdir() for w in p.read_text().split()})
    pick = random.Random(0)
    texts = [" ".join(pick.choices(vocabulary, k=pick.randint(3, 150))) for _ in range(60)]
    embedder = Embedder(backend="onnx-int8")
    together = embedder.embed(texts)
    alone = np.vstack([embedder.embed([text]) for text in texts])
    similarity = together @ alone.T
    assert (similarity.argmax(axis=1) == np.arange(len(texts))).all()
    assert np.diag(similarity).min() > 0.97  # int8 activations are scaled per batch
