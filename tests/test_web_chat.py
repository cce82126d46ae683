"""The web page's chat in Chromium, against the API with the scripted model: loading offline,
streaming and Stop, citations and sources, PAL and ReAct views, untrusted text, feedback,
regenerate → preference, conversations, the API-key prompt."""

# ruff: noqa: F811  (the fixtures imported from web_support are redefined as arguments)

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from playwright.sync_api import expect
from web_support import browser, open_page, page, served, start  # noqa: F401

pytestmark = pytest.mark.browser


def ask(page, question: str, agent: str | None = None) -> None:
    if agent:
        page.select_option("#agent", agent)
    page.fill("#prompt", question)
    page.keyboard.press("Enter")


def last_answer(page, status: str = "done"):
    page.wait_for_selector(f".answer[data-status={status}]")
    return page.locator(".answer").last


def test_the_page_loads_from_its_own_origin_only_under_a_self_csp(served, page) -> None:
    response = page.goto(served.url + "/")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-cache"
    page.wait_for_selector("body[data-ready=true]")
    ask(page, "Which module needs zlib?")
    last_answer(page)
    origins = {urlparse(u).netloc for u in page.log.requests}
    assert origins == {urlparse(served.url).netloc}, page.log.requests
    assert page.log.errors == [] and page.log.dialogs == []
    asset = next(u for u in page.log.requests if u.endswith("/app.js"))
    cached = httpx.get(asset).headers["cache-control"]
    assert "immutable" in cached and "max-age=31536000" in cached


def test_an_answer_streams_and_stop_cancels_the_model_on_the_server(served, page) -> None:
    open_page(page, served.url)
    words = " ".join(f"w{i}" for i in range(200))
    ask(page, f"please answer slowly {words}", agent="scripted")
    page.wait_for_selector(".answer .body p")  # the first words are painted
    expect(page.locator(".answer .body")).to_contain_text("w3 w4")
    page.click("#stop")
    answer = last_answer(page, "stopped")
    assert served.model.cancelled.wait(5), "the server did not close the model's stream"
    assert not served.model.finished.is_set()
    shown = answer.locator(".body").inner_text()
    assert shown.startswith("Echo: please answer slowly") and "w199" not in shown
    assert page.is_visible("#send") and not page.is_disabled("#send")
    assert page.is_hidden("#stop")


def test_citations_are_chips_that_open_their_source_and_invalid_ones_are_flagged(
    served, page
) -> None:
    open_page(page, served.url)
    ask(page, "Which module needs zlib?")
    answer = last_answer(page)
    assert answer.locator("strong").inner_text() == "aardvark"  # Markdown, rendered
    chips = answer.locator("button.cite")
    assert chips.count() == 1 and chips.first.inner_text() == "1"
    assert "[9]" in answer.locator(".note.invalid").inner_text()  # the server removed [9]
    chips.first.click()
    card = page.locator(".sources article.source.focused")
    assert "aardvark module needs zlib" in card.locator(".source-text").inner_text()
    assert card.locator("h3").inner_text().endswith("Installing › Requirements")
    location = card.locator(".location").inner_text()
    assert location.startswith("guide/install.md:") and not location.startswith("/")


def test_sources_without_the_answer_are_said_to_be_so(served, page) -> None:
    open_page(page, served.url)
    ask(page, "Which module needs zlib? Say nothing else.")
    answer = last_answer(page)
    assert answer.locator(".note.no-answer").inner_text() == (
        "The sources do not contain the answer."
    )


def test_pal_shows_its_program_highlighted_with_result_and_stdout(served, page) -> None:
    open_page(page, served.url)
    ask(page, "Tom has 6 boxes of 7 pens. How many pens?", agent="agentkit-pal")
    answer = last_answer(page)
    program = answer.locator("details.pal > pre")
    assert "def solution():" in program.inner_text()
    assert program.locator("span.tok-keyword").first.inner_text() == "def"
    assert program.locator("span.tok-comment").first.inner_text() == "# 6 boxes of 7 pens"
    assert answer.locator(".pal-result code").inner_text() == "42"
    assert answer.locator(".stdout pre").inner_text().strip() == "boxes 6"


def test_react_steps_appear_then_the_answer(served, page) -> None:
    open_page(page, served.url)
    ask(page, "Which module needs zlib?", agent="agentkit-react")
    answer = last_answer(page)
    steps = answer.locator("li.step")
    assert steps.count() == 2
    assert "search[aardvark]" in steps.nth(0).inner_text()
    assert "Observation" in steps.nth(0).inner_text()
    assert "finish[zlib]" in steps.nth(1).inner_text()
    assert answer.locator(".body").inner_text().strip() == "zlib"
    assert answer.locator(".note.fallback").count() == 0


def test_a_react_agent_that_falls_back_to_rag_says_so(served, page) -> None:
    open_page(page, served.url)
    ask(page, "stubborn: which module needs zlib?", agent="agentkit-react")
    answer = last_answer(page)
    assert answer.locator("li.step").count() >= 1
    assert "RAG answered instead" in answer.locator(".note.fallback").inner_text()
    assert "aardvark" in answer.locator(".body").inner_text()


def test_hostile_documents_and_answers_render_as_inert_text(served, page) -> None:
    open_page(page, served.url)
    ask(page, "xss: what does the pangolin module render?")
    answer = last_answer(page)
    answer.locator("button.cite").first.click()
    source = page.locator(".sources .source-text").first.inner_text()
    assert "<img src=x onerror=alert(1)>" in source
    assert "[here](javascript:alert(2))" in source
    body = answer.locator(".body")
    assert "<script>window.__xss = 1; alert(3)</script>" in body.inner_text()
    assert "[click](javascript:alert(4))" in body.inner_text()
    page.wait_for_timeout(300)  # an image's onerror would have fired by now
    assert page.evaluate("window.__xss") is None
    assert page.locator("main script, main img, main iframe").count() == 0
    assert page.locator("a[href^='javascript']").count() == 0
    assert page.log.dialogs == [], page.log.dialogs


def test_thumbs_and_a_comment_are_stored_with_the_agent(served, page) -> None:
    open_page(page, served.url)
    page.fill("#labeler", "carol")
    ask(page, "Which module needs zlib?")
    answer = last_answer(page)
    answer.locator("button.thumb.up").click()
    page.wait_for_selector("text=Thanks, saved.")
    answer.locator("textarea.comment").fill("cites the guide")
    answer.locator("text=Save comment").click()
    page.wait_for_selector("text=Comment saved.")
    answer.locator("button.thumb.down").click()
    expect(answer.locator("button.thumb.down")).to_have_attribute("aria-pressed", "true")
    db = sqlite3.connect(served.feedback.path)
    rows = db.execute(
        "SELECT f.prompt, f.completion, f.rating, f.comment, f.labeler, a.agent FROM feedback f "
        "JOIN feedback_agents a ON a.feedback_id = f.id"
    ).fetchall()
    assert rows == [
        (
            "Which module needs zlib?",
            "The **aardvark** module needs zlib [1].",
            -1,
            "cites the guide",
            "carol",
            "agentkit-rag",
        )
    ]


def test_regenerate_keeps_the_first_answer_and_stores_which_is_better(served, page) -> None:
    open_page(page, served.url)
    ask(page, "name a colour", agent="scripted")
    last_answer(page)
    page.click("button.regenerate")
    expect(page.locator(".answer[data-status=done]")).to_have_count(2)
    texts = page.locator(".answer .body").all_inner_texts()
    assert len(set(texts)) == 2 and all(t.startswith("Echo: name a colour") for t in texts)
    page.click(".preference >> text=#2")
    page.wait_for_selector(".preference.saved")
    pairs = served.feedback.pairwise()
    assert pairs == [{"prompt": "name a colour", "chosen": texts[1], "rejected": texts[0]}]


def test_conversations_are_listed_reopened_and_deleted(served, page) -> None:
    open_page(page, served.url)
    ask(page, "first question", agent="scripted")
    last_answer(page)
    ask(page, "second question", agent="scripted")
    expect(page.locator(".answer[data-status=done]")).to_have_count(2)
    page.click("#new-chat")
    ask(page, "another topic", agent="scripted")
    last_answer(page)
    expect(page.locator("#conversations li[data-id]")).to_have_count(2)
    titles = page.locator("#conversations .open").all_inner_texts()
    assert titles == ["another topic", "first question"]
    page.click("#conversations >> text=first question")
    expect(page.locator(".turn")).to_have_count(2)
    questions = page.locator(".question .text").all_inner_texts()
    assert questions == ["first question", "second question"]
    assert "Echo: second question" in page.locator(".answer").last.inner_text()
    page.click("#conversations li:has-text('another topic') button.delete")
    expect(page.locator("#conversations li[data-id]")).to_have_count(1)
    assert [c["title"] for c in served.conversations.summaries(None)] == ["first question"]
    # the reopened conversation goes on with its history on the server
    ask(page, "third question", agent="scripted")
    expect(page.locator(".answer[data-status=done]")).to_have_count(3)
    conversation = served.conversations.summaries(None)[0]
    assert conversation["messages"] == 6


def test_a_reopened_conversation_shows_its_citations_again(served, page) -> None:
    open_page(page, served.url)
    ask(page, "Which module needs zlib?")
    chips = last_answer(page).locator("button.cite")
    expect(chips).to_have_count(1)
    page.click("#new-chat")
    expect(page.locator(".turn")).to_have_count(0)
    page.click("#conversations >> text=Which module needs zlib?")
    answer = last_answer(page)
    expect(answer.locator("button.cite")).to_have_count(1)  # the chips, as they streamed
    assert "[9]" in answer.locator(".note.invalid").inner_text()
    answer.locator("button.cite").first.click()
    card = page.locator(".sources article.source.focused")
    expect(card.locator(".location")).to_contain_text("install.md")
    [kept] = served.conversations.transcript(served.conversations.summaries(None)[0]["id"])[1:]
    assert kept["agent"] == "agentkit-rag" and kept["agentkit"]["citations"]


@pytest.fixture
def keyed(tmp_path: Path):
    running = start(tmp_path, api_keys=("alice:user:secret-a",))
    yield running
    running.stop()


def test_with_keys_the_page_asks_for_one_and_says_when_it_is_wrong(keyed, page) -> None:
    page.goto(keyed.url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "wrong")
    page.click("#key-form button")
    page.wait_for_selector("#key-error:has-text('not accepted')")
    assert page.locator("#key-dialog[open]").count() == 1
    page.fill("#key-input", "secret-a")
    page.click("#key-form button")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#identity").inner_text() == "key: alice (user)"
    assert page.input_value("#labeler") == "alice"
    ask(page, "Which module needs zlib?")
    assert "aardvark" in last_answer(page).inner_text()
    assert page.evaluate("sessionStorage.getItem('agentkit.key')") == "secret-a"
    assert page.evaluate("localStorage.getItem('agentkit.key')") is None
    conversations = httpx.get(
        keyed.url + "/v1/conversations", headers={"Authorization": "Bearer secret-a"}
    ).json()["data"]
    assert len(conversations) == 1  # owned by alice's key: the page sent it
