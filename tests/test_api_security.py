"""The REST API's trust boundaries: keys kept apart, roles, body limits that hold for chunked
bodies, uploads that never write through a link, file names checked, security headers, no
absolute server paths, docs and metrics behind a key."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fakes import HashingEmbedder
from fastapi.testclient import TestClient

from agentkit import Index, index_folder
from agentkit.errors import ConfigError
from agentkit.services.api import ApiConfig, create_app, parse_api_keys, relative_paths
from agentkit.services.conversations import ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel

ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
ROOT = {"Authorization": "Bearer key-root"}
KEYS = ("alice:user:key-alice", "bob:user:key-bob", "root:admin:key-root")
KESTREL = b"# Kestrel\n\nThe kestrel flag enables turbo mode.\n"


@dataclass
class Api:
    client: TestClient
    model: ScriptedChatModel
    uploads: Path
    docs: Path
    tmp: Path


@pytest.fixture
def api(docs: Path, settings: Settings, embedder: HashingEmbedder, tmp_path: Path):
    index_folder(docs, settings.index, settings=settings, embedder=embedder)
    index = Index.open(settings.index, settings=settings, embedder=embedder)
    model = ScriptedChatModel(lambda messages, **kw: f"{len(messages)} messages so far")
    config = ApiConfig(
        api_keys=KEYS,
        max_body_bytes=50_000,
        document_roots=(str(docs),),
        upload_dir=str(tmp_path / "uploads"),
    )
    app = create_app(
        model,
        index,
        feedback=FeedbackStore(tmp_path / "feedback.sqlite"),
        conversations=ConversationStore(tmp_path / "conversations.sqlite"),
        config=config,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, model, tmp_path / "uploads", docs, tmp_path)
    index.close()


def upload(api: Api, headers: dict, name: str | bytes = "kestrel.md", raw: bytes = KESTREL):
    """POST /v1/documents with one file; a bytes ``name`` goes into the multipart body as is."""
    if isinstance(name, str):
        return api.client.post("/v1/documents", files={"files": (name, raw)}, headers=headers)
    body = (
        b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="'
        + name
        + b'"\r\nContent-Type: text/markdown\r\n\r\n'
        + raw
        + b"\r\n--b0undary--\r\n"
    )
    content_type = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    return api.client.post("/v1/documents", content=body, headers={**headers, **content_type})


def finished(api: Api, job_id: str, headers: dict) -> dict:
    """The job's record once it is no longer running (bounded polling on its state)."""
    for _ in range(500):
        job = api.client.get(f"/v1/documents/jobs/{job_id}", headers=headers).json()
        if job["state"] != "running":
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still running: {job}")


def say(api: Api, headers: dict, text: str, conversation: str = "c1") -> httpx.Response:
    body = {
        "model": "scripted",
        "conversation_id": conversation,
        "messages": [{"role": "user", "content": text}],
    }
    return api.client.post("/v1/chat/completions", json=body, headers=headers)


# Keys kept apart


def test_another_key_cannot_continue_a_conversation(api: Api) -> None:
    assert say(api, ALICE, "my secret plan").status_code == 200
    calls = len(api.model.calls)
    for key in (BOB, ROOT):  # an admin neither: a conversation is private to its key
        refused = say(api, key, "what was said before?")
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["type"] == "ConversationNotFound"
    assert len(api.model.calls) == calls  # nothing of Alice's reached a prompt for Bob
    assert say(api, BOB, "mine", conversation="c2").status_code == 200
    reply = say(api, ALICE, "and now?").json()["choices"][0]["message"]["content"]
    assert reply == "3 messages so far"


def test_feedback_export_is_a_users_own_and_an_admins_all(api: Api) -> None:
    for headers, prompt in ((ALICE, "alice's prompt"), (BOB, "bob's prompt")):
        ranking = {"prompt": prompt, "ranking": ["a", "b"], "labeler": "x"}
        assert api.client.post("/v1/feedback", json=ranking, headers=headers).status_code == 200

    def exported(headers: dict) -> set[str]:
        response = api.client.get("/v1/feedback/export", headers=headers)
        assert response.status_code == 200
        return {json.loads(line)["prompt"] for line in response.text.splitlines()}

    assert exported(BOB) == {"bob's prompt"}
    assert exported(ALICE) == {"alice's prompt"}
    assert exported(ROOT) == {"alice's prompt", "bob's prompt"}


def test_another_key_cannot_read_a_job(api: Api) -> None:
    job = upload(api, ALICE).json()
    refused = api.client.get(f"/v1/documents/jobs/{job['id']}", headers=BOB)
    assert refused.status_code == 404 and refused.json()["error"]["type"] == "not_found_error"
    assert finished(api, job["id"], ALICE)["state"] == "done"
    assert finished(api, job["id"], ROOT)["state"] == "done"  # admins see every job


def test_another_key_cannot_overwrite_an_upload(api: Api) -> None:
    finished(api, upload(api, ALICE).json()["id"], ALICE)
    refused = upload(api, BOB, raw=b"# Kestrel\n\nThe kestrel flag deletes everything.\n")
    assert refused.status_code == 409 and "another name" in refused.json()["error"]["message"]
    assert (api.uploads / "kestrel.md").read_bytes() == KESTREL
    again = upload(api, ALICE, raw=KESTREL + b"\nMore.\n")  # the owner may replace it
    assert again.status_code == 202
    assert upload(api, ROOT).status_code == 202  # and so may an admin


def test_another_key_cannot_delete_an_upload_or_an_indexed_folders_document(api: Api) -> None:
    finished(api, upload(api, ALICE).json()["id"], ALICE)
    assert api.client.delete("/v1/documents/kestrel.md", headers=BOB).status_code == 404
    assert api.client.delete("/v1/documents/guide/install.md", headers=ALICE).status_code == 404
    hits = api.client.post("/v1/search", json={"query": "kestrel turbo"}, headers=BOB).json()
    assert hits["data"][0]["source"] == "kestrel.md"
    deleted = api.client.delete("/v1/documents/kestrel.md", headers=ALICE)
    assert deleted.status_code == 200 and deleted.json()["documents"] == 1
    assert not (api.uploads / "kestrel.md").exists()
    assert api.client.delete("/v1/documents/guide/install.md", headers=ROOT).status_code == 200


def test_a_user_cannot_delete_a_folder_document_through_an_upload_of_the_same_name(
    api: Api,
) -> None:
    finished(api, upload(api, ALICE, "notes.txt", b"Alice's notes.\n").json()["id"], ALICE)
    refused = api.client.delete("/v1/documents/notes.txt", headers=ALICE)
    assert refused.status_code == 409 and "admin" in refused.json()["error"]["message"]
    hits = api.client.post("/v1/search", json={"query": "walrus release"}, headers=ALICE).json()
    assert hits["data"][0]["source"] == "notes.txt"


def test_only_admins_index_server_folders(api: Api) -> None:
    body = {"folder": str(api.docs)}
    refused = api.client.post("/v1/documents/folder", json=body, headers=ALICE)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert api.client.post("/v1/documents/folder", json=body, headers=ROOT).status_code == 202


def test_api_keys_are_parsed_with_roles_and_bare_keys_stay_admins() -> None:
    keys = parse_api_keys(["alice:user:k:with:colons", "first-bare", "root:admin:r", "second"])
    assert [(k.name, k.role, k.key) for k in keys] == [
        ("alice", "user", "k:with:colons"),
        ("key1", "admin", "first-bare"),
        ("root", "admin", "r"),
        ("key2", "admin", "second"),
    ]
    assert "first-bare" not in repr(keys)


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        (["a:user:SECRET1", "a:admin:SECRET2"], "names a twice"),
        (["a:user:"], "empty key"),
        (["a:owner:SECRET1"], "unknown role 'owner'"),
        (["a:SECRET1"], "not name:role:key"),
        (["a b:user:SECRET1"], "the name must be"),
        (["a:user:SECRET1", "b:user:SECRET1"], "same key twice"),
    ],
)
def test_malformed_api_keys_are_refused_with_what_is_wrong(entries: list, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as refused:
        ApiConfig(api_keys=tuple(entries))
    assert "SECRET" not in str(refused.value)  # the message names the entry, never the key


# Limits that hold for chunked bodies


def test_a_chunked_oversize_chat_body_gets_413(api: Api) -> None:
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "x" * 200_000}]})
    chunks = iter([body[i : i + 8192].encode() for i in range(0, len(body), 8192)])
    headers = {**ALICE, "Content-Type": "application/json"}
    response = api.client.post("/v1/chat/completions", content=chunks, headers=headers)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == 413
    assert api.model.calls == []


def test_a_chunked_oversize_upload_gets_413_and_leaves_no_file(api: Api) -> None:
    request = httpx.Request(
        "POST", "http://x/v1/documents", files={"files": ("big.md", b"# Big\n" + b"y" * 200_000)}
    )
    body = request.read()
    headers = {**ROOT, "Content-Type": request.headers["Content-Type"]}
    response = api.client.post("/v1/documents", content=iter([body]), headers=headers)
    assert response.status_code == 413, response.text
    assert sorted(p.name for p in api.uploads.iterdir() if p.name != ".owners.json") == []


# Uploads


@pytest.mark.parametrize("dangling", [False, True])
def test_an_upload_never_writes_through_a_link(api: Api, dangling: bool) -> None:
    target = api.tmp / "outside.md"
    if not dangling:
        target.write_bytes(b"# Outside\n\nuntouched\n")
    api.uploads.mkdir(exist_ok=True)
    os.symlink(target, api.uploads / "kestrel.md")
    refused = upload(api, ROOT)
    assert refused.status_code == 400 and "symbolic link" in refused.json()["error"]["message"]
    assert target.exists() != dangling
    assert dangling or target.read_bytes() == b"# Outside\n\nuntouched\n"
    assert os.path.islink(api.uploads / "kestrel.md")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (b"a\x00b.md", "NUL"),
        (("x" * 300 + ".md").encode(), "longer than 255 bytes"),
        ("report\u202egnp.md".encode(), "bidirectional"),
        ("a\u2066b.md".encode(), "bidirectional"),
        (b"a\x1bb.md", "control character"),
        (b"../../evil/kestrel.md", "path separator"),
        (b"..", "starts with '.'"),
        (b".hidden.md", "starts with '.'"),
    ],
)
def test_bad_file_names_get_400_saying_what_is_wrong(api: Api, name: bytes, problem: str) -> None:
    response = upload(api, ALICE, name)
    assert response.status_code == 400, response.text
    assert problem in response.json()["error"]["message"]
    assert [p.name for p in api.uploads.iterdir() if p.name != ".owners.json"] == []


def test_a_broken_pdf_is_a_4xx_and_is_not_kept(api: Api) -> None:
    response = upload(api, ALICE, "broken.pdf", b"%PDF-1.7\nthis is not a PDF at all\n")
    assert response.status_code == 400, response.text
    assert "broken.pdf" in response.json()["error"]["message"]
    assert not (api.uploads / "broken.pdf").exists()


# Folders


def test_a_folder_that_links_outside_the_roots_is_refused(api: Api) -> None:
    outside = api.tmp / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("# Secret\n\nThe password is swordfish.\n")
    os.symlink(outside, api.docs / "escape")
    for folder in (str(api.docs / "escape"), f"{api.docs}/escape/../escape"):
        refused = api.client.post("/v1/documents/folder", json={"folder": folder}, headers=ROOT)
        assert refused.status_code == 403, refused.text
        assert str(outside) not in refused.text
    nul = api.client.post("/v1/documents/folder", json={"folder": f"{api.docs}\x00"}, headers=ROOT)
    assert nul.status_code == 400


# Headers, paths, docs


def test_every_response_carries_the_security_headers(api: Api) -> None:
    responses = [
        api.client.get("/healthz"),
        api.client.get("/v1/models"),  # 401
        api.client.get("/v1/nothing-here", headers=ALICE),  # 404
        say(api, ALICE, "hi"),
        api.client.post("/v1/chat/completions", content=b"{", headers=ALICE),  # 400
    ]
    for response in responses:
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"].startswith("default-src 'none'")
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "server" not in response.headers
    docs = api.client.get("/docs", headers=ALICE)
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert "https://cdn.jsdelivr.net" in docs.headers["content-security-policy"]


def test_an_unexpected_error_carries_the_security_headers_too() -> None:
    def broken(messages: list, **kw: object) -> str:
        raise RuntimeError("/srv/secret/path broke")

    app = create_app(ScriptedChatModel(broken), None)
    with TestClient(app, raise_server_exceptions=False) as client:
        body = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 500 and "/srv/secret" not in response.text
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"].startswith("default-src 'none'")


def test_serve_turns_off_the_server_banner_and_wires_the_key_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from agentkit.cli import app as cli

    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    monkeypatch.setenv("AGENTKIT_API_KEYS", "alice:user:key-alice")
    monkeypatch.setenv("AGENTKIT_INDEX", str(tmp_path / "no-index"))
    monkeypatch.setenv("AGENTKIT_FEEDBACK_DB", str(tmp_path / "f.sqlite"))
    monkeypatch.setenv("AGENTKIT_CONVERSATIONS_DB", str(tmp_path / "c.sqlite"))
    result = CliRunner().invoke(cli, ["serve", "--llm-url", "http://127.0.0.1:9"])
    assert result.exit_code == 0, result.output
    assert started["server_header"] is False
    with TestClient(started["app"]) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=ALICE).status_code == 200
    monkeypatch.setenv("AGENTKIT_API_KEYS", "alice:wizard:key-alice")
    refused = CliRunner().invoke(cli, ["serve", "--llm-url", "http://127.0.0.1:9"])
    assert refused.exit_code == 1 and "unknown role 'wizard'" in refused.output


def test_job_records_and_errors_show_no_absolute_paths(api: Api) -> None:
    job = finished(api, upload(api, ALICE).json()["id"], ALICE)
    assert job["state"] == "done" and job["summary"]["added"] == 1
    folder = finished(
        api,
        api.client.post(
            "/v1/documents/folder", json={"folder": str(api.docs)}, headers=ROOT
        ).json()["id"],
        ROOT,
    )
    for record in (job, folder):
        assert str(api.tmp) not in json.dumps(record), record
    text = "cannot read '/srv/agentkit/index/index.sqlite' or /home/ann/secret/notes.md here"
    assert relative_paths(text, ["/srv/agentkit/index"]) == (
        "cannot read 'index.sqlite' or notes.md here"
    )


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json", "/docs", "/redoc"])
def test_metrics_and_docs_need_a_key_when_keys_are_set(api: Api, path: str) -> None:
    refused = api.client.get(path)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert api.client.get(path, headers=BOB).status_code == 200


def test_metrics_and_docs_can_stay_open_with_keys(tmp_path: Path) -> None:
    config = ApiConfig(api_keys=KEYS, protect_docs=False)
    with TestClient(create_app(ScriptedChatModel(["x"]), None, config=config)) as client:
        assert client.get("/openapi.json").status_code == client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401
