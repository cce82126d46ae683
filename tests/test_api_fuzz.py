"""Property-based fuzzing of every endpoint in the OpenAPI schema: no 5xx, no hang."""

from __future__ import annotations

import pytest
from fakes import HashingEmbedder
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentkit import Index, index_folder
from agentkit.services.api import ApiConfig, create_app
from agentkit.services.conversations import ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "wizard", ""])
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": st.text(max_size=50) | JSON})
CHAT = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["agentkit-rag", "agentkit-pal", "agentkit-react", "scripted", ""])
        | st.text(max_size=10),
        "messages": st.lists(MESSAGE, max_size=3) | JSON,
    },
    optional={
        "stream": st.booleans() | JSON,
        "temperature": st.floats(allow_nan=False, allow_infinity=False) | JSON,
        "max_tokens": st.integers() | JSON,
        "stop": st.text(max_size=5) | JSON,
        "n": st.integers(-2, 20),
        "conversation_id": st.sampled_from(["c1", "c2", ""]) | JSON,
        "user": JSON,
    },
)
FEEDBACK = st.fixed_dictionaries(
    {"prompt": st.text(max_size=20), "labeler": st.text(max_size=10)},
    optional={
        "completion": st.text(max_size=10),
        "rating": st.integers(-2, 2) | JSON,
        "ranking": st.lists(st.text(max_size=5), max_size=5) | JSON,
        "ties": st.lists(st.lists(st.text(max_size=5), max_size=3), max_size=2) | JSON,
    },
)
SEARCH = st.fixed_dictionaries(
    {"query": st.text(max_size=60) | JSON},
    optional={"k": st.integers(-5, 500) | JSON, "mode": JSON},
)
FOLDER = st.fixed_dictionaries({"folder": st.sampled_from(["/", "/etc", "../..", "docs"]) | JSON})
BODIES = {
    "/v1/chat/completions": CHAT,
    "/v1/feedback": FEEDBACK,
    "/v1/search": SEARCH,
    "/v1/documents/folder": FOLDER,
    "/v1/documents": JSON,
    "/v1/labeling/tasks": st.fixed_dictionaries(
        {},
        optional={
            "prompts": st.lists(st.text(max_size=20), max_size=3) | JSON,
            "jsonl": st.text(max_size=40) | JSON,
            "agent": JSON,
            "n": JSON,
        },
    ),  # fmt: skip
    "/v1/labeling/tasks/{task_id}/sample": JSON,
    "/v1/labeling/items/{item_id}/rankings": st.fixed_dictionaries(
        {},
        optional={
            "ranking": st.lists(st.integers(-2, 5), max_size=5) | JSON,
            "ties": JSON,
            "labeler": JSON,
            "reason": JSON,
        },
    ),  # fmt: skip
    "/v1/labeling/feedback": FEEDBACK,
}
PATH_VALUES = {"{task_id}": "t1", "{item_id}": "1"}


def url(path: str) -> str:
    for template, value in PATH_VALUES.items():
        path = path.replace(template, value)
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "docs").mkdir()
    (root / "docs" / "a.md").write_text("# Zlib\n\nThe aardvark module needs zlib.\n")
    settings = Settings(index=root / "index", cache_dir=root / "cache")
    embedder = HashingEmbedder()
    index_folder(root / "docs", settings.index, settings=settings, embedder=embedder)
    model = ScriptedChatModel(
        lambda m, **kw: (
            "Thought: t\nAction: finish[x]"
            if kw.get("structured")
            else "def solution():\n    return 1"
        )
    )
    app = create_app(
        model,
        Index.open(settings.index, settings=settings, embedder=embedder),
        feedback=FeedbackStore(root / "f.sqlite"),
        config=ApiConfig(document_roots=(str(root / "docs"),), upload_dir=str(root / "up")),
        conversations=ConversationStore(root / "c.sqlite"),
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def test_every_post_endpoint_in_the_schema_is_fuzzed(client: TestClient) -> None:
    posts = {p for p, ops in client.get("/openapi.json").json()["paths"].items() if "post" in ops}
    assert posts == set(BODIES)


@pytest.mark.parametrize("path", sorted(BODIES))
def test_no_5xx_for_any_body(client: TestClient, path: str) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=BODIES[path] | JSON)
    def check(body: object) -> None:
        response = client.post(url(path), json=body)
        assert response.status_code < 500, (body, response.text)

    check()


@given(raw=st.binary(max_size=200))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_for_any_bytes(client: TestClient, raw: bytes) -> None:
    for path in BODIES:
        response = client.post(url(path), content=raw, headers={"content-type": "application/json"})
        assert response.status_code < 500, (path, raw, response.text)


@given(query=st.dictionaries(st.sampled_from(["format", "x"]), st.text(max_size=8), max_size=2))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_for_get_endpoints(client: TestClient, query: dict) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v1/feedback/export"):
        assert client.get(path, params=query).status_code < 500
