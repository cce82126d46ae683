"""The page's server side, without a browser: how the page and its assets are served (CSP,
caching, versions, weight), what the assets may not do, and the routes the page adds
(whoami, conversations, documents) with their owners kept apart."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from web_support import served, start  # noqa: F401

from agentkit.services.web import ASSETS, PageAssets

# ruff: noqa: F811  (the fixture imported from web_support is redefined as an argument)


def test_the_page_is_never_cached_and_its_assets_are_for_a_year(served) -> None:
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    csp = page.headers["content-security-policy"]
    assert csp.startswith("default-src 'self'") and "frame-ancestors 'none'" in csp
    assets = re.findall(r'(?:src|href)="(assets/[^"]+)"', page.text)
    assert {Path(a).name for a in assets} >= {"app.js", "style.css", "chat.js", "icon.svg"}
    for asset in assets:
        response = httpx.get(f"{served.url}/{asset}")
        assert response.status_code == 200, asset
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{served.url}/{assets[0]}").headers["content-type"].split(";")[0] in (
        "image/svg+xml",
        "text/css",
        "text/javascript",
    )
    stale = httpx.get(f"{served.url}/assets/0123456789abcdef/app.js")
    assert stale.status_code == 404 and "reload" in stale.json()["error"]["message"]
    assert httpx.get(f"{served.url}/assets/{PageAssets().version}/../web.py").status_code == 404


def test_the_version_is_a_hash_of_every_assets_content(tmp_path: Path) -> None:
    copy = tmp_path / "web"
    shutil.copytree(ASSETS, copy)
    before = PageAssets(copy)
    assert before.version == PageAssets(ASSETS).version
    (copy / "markdown.js").write_text((copy / "markdown.js").read_text() + "\n// changed\n")
    after = PageAssets(copy)
    assert after.version != before.version and f"assets/{after.version}/app.js" in after.page


def test_the_page_weighs_at_most_150_kb_and_loads_nothing_from_elsewhere() -> None:
    assets = PageAssets()
    assert assets.weight <= 150_000, assets.weight
    for name, content in [("index.html", assets.page.encode()), *assets.files.items()]:
        text = content.decode()
        assert not re.search(r"""(?:src|href|url)\s*[=(]\s*["']?(?:https?:)?//""", text), name
        assert "@import" not in text, name


@pytest.mark.parametrize("name", sorted(p.name for p in ASSETS.glob("*.js")))
def test_no_script_turns_text_into_html_or_code(name: str) -> None:
    code = (ASSETS / name).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setAttribute(\"on", "javascript:"):  # fmt: skip
        assert sink not in code.replace("javascript: included", ""), (name, sink)


def test_whoami_names_the_key_and_its_role(tmp_path: Path) -> None:
    running = start(tmp_path, api_keys=("alice:user:k-a",))
    try:
        me = httpx.get(running.url + "/v1/whoami", headers={"Authorization": "Bearer k-a"})
        assert me.json() == {"name": "alice", "role": "user", "keys": True}
        assert httpx.get(running.url + "/v1/whoami").status_code == 401
        assert httpx.get(running.url + "/").status_code == 200  # the page asks for the key
    finally:
        running.stop()


def test_conversations_are_listed_read_and_deleted_by_their_key_only(tmp_path: Path) -> None:
    running = start(tmp_path, api_keys=("alice:user:k-a", "bob:user:k-b", "root:admin:k-r"))
    alice = httpx.Client(base_url=running.url, headers={"Authorization": "Bearer k-a"})
    bob = httpx.Client(base_url=running.url, headers={"Authorization": "Bearer k-b"})
    root = httpx.Client(base_url=running.url, headers={"Authorization": "Bearer k-r"})
    try:
        for client, question in ((alice, "alpha question"), (bob, "bravo question")):
            body = {
                "model": "scripted",
                "conversation_id": f"c-{question[0]}",
                "messages": [{"role": "user", "content": question}],
            }
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        listed = alice.get("/v1/conversations").json()["data"]
        assert [(c["id"], c["title"], c["messages"]) for c in listed] == [
            ("c-a", "alpha question", 2)
        ]
        assert root.get("/v1/conversations").json()["data"] == []  # private, admins included
        read = alice.get("/v1/conversations/c-a").json()
        assert [m["role"] for m in read["messages"]] == ["user", "assistant"]
        for other in (bob, root):
            assert other.get("/v1/conversations/c-a").status_code == 404
            assert other.delete("/v1/conversations/c-a").status_code == 404
        assert alice.delete("/v1/conversations/c-a").json() == {"deleted": "c-a"}
        assert alice.get("/v1/conversations/c-a").status_code == 404
        assert [c["id"] for c in bob.get("/v1/conversations").json()["data"]] == ["c-b"]
    finally:
        running.stop()


def test_documents_are_listed_with_what_each_key_may_delete(tmp_path: Path) -> None:
    running = start(tmp_path, api_keys=("alice:user:k-a", "root:admin:k-r"))
    alice = httpx.Client(base_url=running.url, headers={"Authorization": "Bearer k-a"})
    root = httpx.Client(base_url=running.url, headers={"Authorization": "Bearer k-r"})
    try:
        job = alice.post("/v1/documents", files={"files": ("mine.md", b"# Mine\n\nOtters.\n")})
        assert job.status_code == 202
        for _ in range(200):
            if alice.get(f"/v1/documents/jobs/{job.json()['id']}").json()["state"] != "running":
                break
            time.sleep(0.02)
        mine = {d["source"]: d for d in alice.get("/v1/index/documents").json()["data"]}
        assert mine["mine.md"]["uploaded"] and mine["mine.md"]["deletable"]
        assert not mine["guide/install.md"]["deletable"]
        everything = root.get("/v1/index/documents").json()["data"]
        assert all(d["deletable"] for d in everything)
        stats = alice.get("/v1/index/stats").json()
        assert stats["documents"] == 3 and stats["path"] == "index"
        assert stats["uploads"] and not stats["folders"] and "document_roots" not in stats
        admin_stats = root.get("/v1/index/stats").json()
        assert admin_stats["folders"] and admin_stats["document_roots"] == [str(running.docs)]
    finally:
        running.stop()
