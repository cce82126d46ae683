"""Indexing a folder into SQLite + FAISS: incremental, atomic, single-writer, cited hits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import HashingEmbedder

from agentkit import (
    EmbeddingModelError,
    Index,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    InvalidPathError,
    InvalidQueryError,
    index_folder,
)
from agentkit.retrievers.store import writer_lock
from agentkit.settings import Settings


def build(docs: Path, settings: Settings, embedder: HashingEmbedder, **kw):
    return index_folder(docs, settings.index, settings=settings, embedder=embedder, **kw)


def sources(index: Index) -> set[str]:
    return {r[0] for r in index.store.db.execute("SELECT source FROM documents")}


def test_folder_is_indexed_with_citable_hits(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    summary = build(docs, settings, embedder)
    assert (summary.added, summary.skipped, summary.documents_total) == (3, 1, 3)
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        hit = index.search("aardvark zlib", k=1)[0]
    assert hit.source == "guide/install.md"
    assert hit.title == "Installing" and hit.heading == "Installing > Requirements"
    assert hit.line_start == 5 and hit.location == f"{docs.resolve()}/guide/install.md:5"
    text = (docs / "guide" / "install.md").read_text()
    assert text[hit.char_start : hit.char_end] == hit.text


def test_documents_lists_what_the_index_holds(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        listed = index.documents()
        assert {d["source"] for d in listed} == sources(index)
    install = next(d for d in listed if d["source"] == "guide/install.md")
    assert install["title"] == "Installing" and install["chunks"] >= 1
    assert install["root"] == str(docs.resolve()) and install["format"]


@pytest.mark.parametrize("mode", ["hybrid", "dense", "bm25"])
def test_every_mode_finds_the_right_file(
    docs: Path, settings: Settings, embedder: HashingEmbedder, mode: str
) -> None:
    build(docs, settings, embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        assert index.search("walrus release", k=1, mode=mode)[0].source == "notes.txt"


def test_reindexing_skips_unchanged_and_replaces_changed_files(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    embedder.embedded.clear()
    summary = build(docs, settings, embedder)
    assert (summary.unchanged, summary.added, summary.updated, embedder.embedded) == (3, 0, 0, [])

    (docs / "notes.txt").write_text("Release notes.\nThe narwhal release replaced the old one.\n")
    (docs / "page.html").unlink()
    (docs / "new.md").write_text("# New\n\nA capybara appears.\n")
    summary = build(docs, settings, embedder)
    assert (summary.added, summary.updated, summary.removed, summary.unchanged) == (1, 1, 1, 1)
    assert all("install" not in text.lower() for text in embedder.embedded)  # only changed files
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        assert sources(index) == {"guide/install.md", "notes.txt", "new.md"}
        assert index.store.vectors.ntotal == index.store.counts()[1]
        assert all("walrus" not in h.text for h in index.search("walrus release", k=10))
        assert index.search("capybara", k=1)[0].source == "new.md"


def test_full_rebuild_reembeds_everything(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    summary = build(docs, settings, embedder, full=True)
    assert (summary.added, summary.unchanged) == (3, 0)
    assert not [p for p in settings.index.parent.iterdir() if ".build-" in p.name]


def test_a_second_writer_is_refused(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    with writer_lock(settings.index):
        with pytest.raises(IndexLockedError, match="another process .* is writing"):
            build(docs, settings, embedder)


def test_bad_paths_are_clear_errors(
    tmp_path: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    with pytest.raises(InvalidPathError, match="does not exist"):
        build(tmp_path / "nope", settings, embedder)
    (tmp_path / "file.md").write_text("x")
    with pytest.raises(InvalidPathError, match="not a folder"):
        build(tmp_path / "file.md", settings, embedder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidPathError, match="holds no files to index"):
        build(tmp_path / "empty", settings, embedder)
    assert not settings.index.exists()
    with pytest.raises(IndexNotFoundError, match="agentkit index DIR"):
        Index.open(settings.index, settings=settings)


def test_bad_queries_are_refused_and_leave_the_index_intact(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        with pytest.raises(InvalidQueryError, match="empty"):
            index.search("   ")
        with pytest.raises(InvalidQueryError, match="102,400 characters"):
            index.search("a" * 102_400)
        assert index.search("?!", k=3) != []  # no words for BM25: dense still answers
        assert index.search("pelican", k=1)[0].source == "page.html"


def test_another_format_version_is_refused(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    manifest_path = settings.index / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format version 99.*--full"):
        Index.open(settings.index, settings=settings)
    build(docs, settings, embedder, full=True)  # --full replaces it
    assert json.loads(manifest_path.read_text())["format_version"] == 1


def test_another_embedding_model_is_refused(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    with pytest.raises(EmbeddingModelError, match="built with the embedding model 'test/hashing'"):
        Index.open(settings.index, settings=settings, embedder=HashingEmbedder(name="other/model"))
    explicit = Settings(
        index=settings.index, embedding_model="sentence-transformers/all-mpnet-base-v2"
    )
    with pytest.raises(EmbeddingModelError, match="not comparable"):
        Index.open(settings.index, settings=explicit)


def test_stale_faiss_file_is_rebuilt_from_sqlite(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    build(docs, settings, embedder)
    (settings.index / "vectors.faiss").unlink()
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        assert index.store.vectors.ntotal == index.store.counts()[1] > 0
        assert index.search("walrus", k=1)[0].source == "notes.txt"


KILL_SCRIPT = """
import sys, pathlib
sys.path.insert(0, {tests!r})
from fakes import HashingEmbedder
from agentkit import index_folder
from agentkit.settings import Settings
from agentkit.retrievers import indexer

def written(done, total, chunks):  # the progress signal: chunks embedded and written so far
    pathlib.Path({marker!r}).write_text(str(chunks))

indexer.EMBED_BATCH_CHUNKS = 1
settings = Settings(index={index!r}, cache_dir={cache!r})
index_folder({docs!r}, settings=settings, embedder=HashingEmbedder(delay_s=0.5), full={full},
             progress=written)
"""


def chunks_written(marker: Path) -> int:
    try:
        return int(marker.read_text() or 0)
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0


@pytest.mark.parametrize("full", [False, True], ids=["incremental", "full"])
def test_killing_the_indexer_mid_run_leaves_the_previous_index(
    docs: Path, settings: Settings, embedder: HashingEmbedder, tmp_path: Path, full: bool
) -> None:
    build(docs, settings, embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        before = (sources(index), index.store.counts())
    for i in range(20):
        (docs / f"extra{i}.md").write_text(f"# Extra {i}\n\nThe tapir number {i}.\n")
    (docs / "notes.txt").write_text("changed\n")
    marker = tmp_path / "chunks-written"
    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).parent),
        marker=str(marker),
        index=str(settings.index),
        cache=str(settings.cache_dir),
        docs=str(docs),
        full=full,
    )
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    deadline = time.monotonic() + 60
    while chunks_written(marker) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # polls for the progress signal; not a wait standing in for it
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert chunks_written(marker) >= 2  # batches were written inside the transaction
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        assert (sources(index), index.store.counts()) == before
        assert index.search("walrus release", k=1)[0].source == "notes.txt"
    summary = build(docs, settings, embedder)  # the lock died with the process
    assert summary.added == 20


def test_hybrid_ranks_titles_the_query_names_and_the_top_hits_mention(
    tmp_path: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    from agentkit.retrievers.types import LoadedDocument

    def doc(title: str, text: str) -> LoadedDocument:
        return LoadedDocument(source=title, text=text, title=title, format="txt", content_hash=text)

    # 30 documents that share no word with the question: only the entity signals separate them
    filler = [doc(f"Pottery {i}", f"Glaze recipe number {i}, fired twice.") for i in range(30)]
    corpus = [
        doc("Quillon Abbey (film)", "Quillon Abbey is a film directed by Maro Vettel."),
        doc("Maro Vettel", "An engineer of rivers."),  # shares no word with the question
        *filler,
    ]
    with Index.create(settings.index, settings=settings, embedder=embedder) as index:
        index.add_documents(corpus)
        question = "Where was the director of Quillon Abbey born?"
        bm25 = [h.title for h in index.search(question, k=5, mode="bm25")]
        hybrid = [h.title for h in index.search(question, k=2)]
    assert "Maro Vettel" not in bm25
    assert hybrid == ["Quillon Abbey (film)", "Maro Vettel"]


def test_bm25_keeps_the_rarest_terms_when_common_ones_would_cost_too_much(
    settings: Settings, embedder: HashingEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentkit.retrievers import search as S
    from agentkit.retrievers.types import LoadedDocument

    def doc(title: str, text: str) -> LoadedDocument:
        return LoadedDocument(source=title, text=text, title=title, format="txt", content_hash=text)

    corpus = [doc(f"Note {i}", f"Running notes about servers, part {i}.") for i in range(20)]
    corpus.append(doc("Zephyrine", "Zephyrine servers keep running."))
    with Index.create(settings.index, settings=settings, embedder=embedder) as index:
        index.add_documents(corpus)
        store = index.store
        # Counted as FTS5 tokenises: "running" and "runs" are both the stem "run".
        assert store.document_frequencies(["runs", "servers", "zephyrine", "absent"]) == [
            21,
            21,
            1,
            0,
        ]
        terms = ["runs", "servers", "zephyrine"]
        assert S.bm25_terms(store, terms) == terms  # 43 postings: within the default budget
        monkeypatch.setattr(S, "BM25_MAX_POSTINGS", 10)
        assert S.bm25_terms(store, terms) == ["zephyrine"]
        assert S.bm25_terms(store, ["runs", "servers"]) == ["runs"]  # one term at least
        pruned = S.bm25_ranking(store, "runs servers zephyrine", 50, prune=True)
        assert [h.title for h in S.fetch_hits(store, pruned)] == ["Zephyrine"]
        every_term = index.search("runs servers zephyrine", k=50, mode="bm25")  # not pruned
        assert len(every_term) == 21 and every_term[0].title == "Zephyrine"


def test_dense_similarity_is_the_exact_float32_cosine(
    settings: Settings, embedder: HashingEmbedder
) -> None:
    from agentkit.retrievers.types import LoadedDocument

    texts = ["alpha beta gamma", "beta gamma delta epsilon", "zeta eta theta alpha"]
    docs = [
        LoadedDocument(source=f"d{i}", text=t, title=f"d{i}", format="txt", content_hash=t)
        for i, t in enumerate(texts)
    ]
    with Index.create(settings.index, settings=settings, embedder=embedder) as index:
        index.add_documents(docs)
        hits = index.search("alpha gamma", k=3, mode="dense")
    query = embedder.embed(["alpha gamma"])[0]
    for hit in hits:  # the index ranks by float16 codes; similarities are not rounded to them
        expected = float(query @ embedder.embed([f"{hit.title}\n{hit.text}"])[0])
        assert hit.similarity == pytest.approx(expected, abs=1e-6)


def test_an_open_index_follows_what_other_writers_commit(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    import faiss

    build(docs, settings, embedder)
    # A long-lived reader (an API, say) and, beside it, other writers.
    reader = Index.open(settings.index, settings=settings, embedder=embedder)
    assert reader.search("narwhal", k=1, mode="dense")[0].source != "narwhal.txt"
    (docs / "narwhal.txt").write_text("The narwhal tusk is a tooth.\n")
    build(docs, settings, embedder)  # an incremental run by another Index
    assert reader.search("narwhal tusk", k=1, mode="dense")[0].source == "narwhal.txt"

    # The reader now writes: its FAISS includes the other writer's chunks, on disk too.
    from agentkit.retrievers.types import LoadedDocument

    reader.add_documents(
        [
            LoadedDocument(
                source="n.txt", text="Orca pods.", title="n", format="txt", content_hash="o"
            )
        ]
    )
    chunks = reader.stats()["chunks"]
    on_disk = faiss.read_index(str(settings.index / "vectors.faiss"))
    assert reader.store.vectors.ntotal == on_disk.ntotal == chunks

    # A --full rebuild swaps the folder: the reader moves to the new index.
    (docs / "notes.txt").unlink()
    (docs / "penguin.txt").write_text("Penguins cannot fly.\n")
    build(docs, settings, embedder, full=True)
    sources = {h.source for h in reader.search("penguins fly walrus release", k=10)}
    assert "penguin.txt" in sources and "notes.txt" not in sources and "n.txt" not in sources
    assert reader.stats()["documents"] == 4  # install.md, page.html, narwhal.txt, penguin.txt
    reader.close()


class MeetingEmbedder(HashingEmbedder):
    """Embeds a query only once ``parties`` searches are inside ``embed`` at the same time."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        import threading

        self.meeting = threading.Barrier(parties, timeout=10)
        self.meet = False

    def embed(self, texts):  # type: ignore[override]
        if self.meet:
            self.meeting.wait()  # BrokenBarrierError if searches were serialised
        return super().embed(texts)


def test_searches_from_several_threads_run_at_once(docs: Path, settings: Settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    embedder = MeetingEmbedder(parties=4)
    build(docs, settings, embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        embedder.meet = True
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda q: index.search(q, k=2), ["zlib"] * 4))
    assert all(r and r[0].source == "guide/install.md" for r in results)


def test_a_write_in_this_process_has_the_index_to_itself(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    import threading

    build(docs, settings, embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        events: list[str] = []
        with index.lock.writing():
            searcher = threading.Thread(
                target=lambda: events.append(f"search {len(index.search('zlib', k=1))}")
            )
            searcher.start()
            searcher.join(timeout=0.3)  # it must still be waiting
            events.append("write done")
        searcher.join()
    assert events == ["write done", "search 1"]


def test_threads_that_searched_and_ended_leave_no_connection_behind(
    docs: Path, settings: Settings, embedder: HashingEmbedder
) -> None:
    import threading

    build(docs, settings, embedder)
    with Index.open(settings.index, settings=settings, embedder=embedder) as index:
        # bm25 alone runs on the calling thread (hybrid also uses the long-lived search pool)
        index.search("zlib", k=1, mode="bm25")  # this thread's connection stays
        before = len(index.store._connections)
        for _ in range(20):  # a thread per request, as the API's chat does
            thread = threading.Thread(target=lambda: index.search("zlib", k=1, mode="bm25"))
            thread.start()
            thread.join()
            del thread
        assert len(index.store._connections) == before
