"""The documents view in Chromium: upload, watch the job, see the stats, delete; a server
folder; errors (unknown type, too large, outside the roots) shown where they happen."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect
from web_support import browser, open_page, page, served  # noqa: F401

# ruff: noqa: F811  (the fixtures imported from web_support are redefined as arguments)
pytestmark = pytest.mark.browser


def upload(page, name: str, content: bytes, mime: str = "text/markdown") -> None:
    page.set_input_files(
        "form.upload input[type=file]", files=[{"name": name, "mimeType": mime, "buffer": content}]
    )
    page.click("form.upload button[type=submit]")


def test_a_document_is_uploaded_indexed_and_deleted(served, page) -> None:
    open_page(page, served.url, "#docs")
    expect(page.locator("#index-stats")).to_contain_text("2 documents")
    upload(
        page,
        "otter <img src=x onerror=alert(1)>.md",
        b"# Otters\n\nThe otter module needs libpng.\n",
    )
    job = page.locator("#jobs li.job").first
    expect(job).to_have_attribute("data-state", "done")
    expect(job).to_contain_text("1 added")
    expect(page.locator("#index-stats")).to_contain_text("3 documents")
    row = page.locator("table.documents tr[data-source='otter <img src=x onerror=alert(1)>.md']")
    expect(row).to_contain_text(
        "otter <img src=x onerror=alert(1)>.md"
    )  # the name is text, not markup
    assert page.locator("main img").count() == 0
    assert (served.upload_dir / "otter <img src=x onerror=alert(1)>.md").exists()
    row.locator("button.delete").click()  # confirmed by the fixture
    expect(row).to_have_count(0)
    expect(page.locator("#index-stats")).to_contain_text("2 documents")
    assert not (served.upload_dir / "otter <img src=x onerror=alert(1)>.md").exists()
    assert [d.split(" ")[0] for d in page.log.dialogs] == ["confirm:"]  # no alert ran


def test_upload_errors_are_shown_not_swallowed(served, page) -> None:
    open_page(page, served.url, "#docs")
    upload(page, "picture.png", b"\x89PNG\r\n\x1a\n\x00\x00binary", "image/png")
    expect(page.locator("#view-docs .message")).to_contain_text("Upload failed: no indexable files")
    upload(page, "huge.md", b"# Big\n\n" + b"word " * 60_000)
    expect(page.locator("#view-docs .message")).to_contain_text("Upload failed: Too large")
    assert page.locator("#jobs li").count() == 0


def test_an_admin_indexes_a_server_folder_inside_the_roots_only(served, page) -> None:
    open_page(page, served.url, "#docs")
    page.fill("form.folder input", "/etc")
    page.click("form.folder button")
    expect(page.locator("#view-docs .message")).to_contain_text(
        "Folder not indexed: that folder is outside the configured document roots"
    )
    page.fill("form.folder input", str(served.docs))
    page.click("form.folder button")
    expect(page.locator("#jobs li.job").first).to_have_attribute("data-state", "done")
    expect(page.locator("table.documents")).to_contain_text("walrus.md")
    expect(page.locator("#index-stats")).to_contain_text("3 documents")
