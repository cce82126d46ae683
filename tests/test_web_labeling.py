"""The labeling workbench in Chromium: a task from a JSONL file, two labelers ranking the same
prompts by keyboard, agreement, the filtered export download, ties, drag, stale prompts and a
malformed file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from playwright.sync_api import expect
from web_support import browser, open_page, page, served  # noqa: F401

from agentkit.services.labeling import LabelingStore

# ruff: noqa: F811  (the fixtures imported from web_support are redefined as arguments)
pytestmark = pytest.mark.browser

PROMPTS = b'{"prompt": "Name a colour"}\n{"prompt": "Name a shape"}\n'


def labeling(page, url: str, labeler: str):
    open_page(page, url, "#label")
    page.fill("#labeler", labeler)
    page.locator("#labeler").dispatch_event("change")
    return page


def create_task(page, content: bytes = PROMPTS, n: int = 3, k: int = 2) -> None:
    if not page.is_visible("form.new-task"):
        page.click("summary:has-text('New task')")
    page.set_input_files(
        "form.new-task input[type=file]",
        files=[{"name": "prompts.jsonl", "mimeType": "application/x-ndjson", "buffer": content}],
    )
    page.select_option("form.new-task select", "scripted")
    page.fill("form.new-task input[aria-label='Completions per prompt']", str(n))
    page.fill("form.new-task input[aria-label='Labelers per prompt']", str(k))
    page.fill("form.new-task input[aria-label='Task name']", "colours and shapes")
    page.click("form.new-task button[type=submit]")


def rank_by_keys(page, *keys: str) -> None:
    """Press the keys, then wait for the saved ranking to count in the labeler's progress."""
    done = int(page.locator("#workbench .progress").inner_text().split()[1])
    for key in keys:
        page.keyboard.press(key)
    expect(page.locator("#workbench .progress")).to_contain_text(f"You: {done + 1} /")


def stored_rankings(path: Path) -> list[tuple[str, list[int], list[list[int]]]]:
    rows = sqlite3.connect(path).execute(
        "SELECT labeler, ranking, ties FROM labeling_rankings ORDER BY id"
    )
    return [(labeler, json.loads(r), json.loads(t)) for labeler, r, t in rows]


def displayed_ids(page) -> list[int]:
    cards = page.locator("#workbench article.completion")
    return [int(cards.nth(i).get_attribute("data-id")) for i in range(cards.count())]


def test_two_labelers_rank_the_same_prompts_and_see_agreement_and_export(
    served, page, browser
) -> None:
    ann = labeling(page, served.url, "ann")
    create_task(ann)
    expect(ann.locator("table.tasks tbody tr")).to_contain_text("2 ready")
    ann.click("table.tasks button:text-is('Label')")
    ann.wait_for_selector("#workbench .prompt")
    orders = {"ann": [], "bob": []}
    for _ in range(2):  # keys 1, 2, Enter: the third place is implied
        orders["ann"].append(displayed_ids(ann))
        rank_by_keys(ann, "1", "2", "Enter")
    expect(ann.locator("#workbench .done")).to_contain_text("Nothing left for you")
    expect(ann.locator("#workbench .progress")).to_have_text("You: 2 / 2")

    context = browser.new_context(accept_downloads=True)
    bob = labeling(context.new_page(), served.url, "bob")
    bob.click("table.tasks button:text-is('Label')")
    bob.wait_for_selector("#workbench .prompt")
    orders["bob"].append(displayed_ids(bob))
    rank_by_keys(bob, "3", "2", "Enter")
    orders["bob"].append(displayed_ids(bob))
    rank_by_keys(bob, "1", "2", "Enter")
    expect(bob.locator("#workbench .done")).to_be_visible()
    context.close()

    rankings = stored_rankings(served.feedback.path)
    assert [(name, ranking) for name, ranking, _ in rankings] == [
        ("ann", orders["ann"][0]),
        ("ann", orders["ann"][1]),
        ("bob", [orders["bob"][0][i] for i in (2, 1, 0)]),
        ("bob", orders["bob"][1]),
    ]
    store = LabelingStore(served.feedback)
    task_id = store.tasks()[0]["id"]
    expected = store.agreement(task_id)
    store.close()
    assert expected["prompts_compared"] == 2
    ann.click("table.tasks >> text=Agreement")
    expect(ann.locator("#prompts-compared")).to_have_text("2")
    shown = round(expected["pairwise_agreement"] * 100)
    expect(ann.locator("#pairwise-agreement")).to_have_text(f"{shown}%")
    expect(ann.locator("#kendall-tau")).to_have_text(f"{expected['kendall_tau']:.2f}")

    ann.click("summary:has-text('Export preferences')")
    with ann.expect_download() as everything:
        ann.click("form.export >> text=Download JSONL")
    rows = Path(everything.value.path()).read_text().splitlines()
    assert len(rows) == 2 * 2 * 3  # 2 prompts × 2 labelers × 3 pairs of 3 completions
    assert set(json.loads(rows[0])) == {"prompt", "chosen", "rejected"}
    ann.select_option("form.export select[name=labeler]", "bob")
    with ann.expect_download() as bobs:
        ann.click("form.export >> text=Download JSONL")
    assert len(Path(bobs.value.path()).read_text().splitlines()) == 6
    expect(ann.locator("form.export .message")).to_have_text("Downloaded 6 preference pairs.")


def ready_task(served, prompts: list[str], n: int, k: int) -> str:
    store = LabelingStore(served.feedback)
    task = store.create_task(prompts, agent="scripted", n=n, labelers_per_prompt=k)
    for item_id, prompt in store.pending(task["id"]):
        store.set_completions(item_id, [f"**{prompt}** answer {i}" for i in range(n)])
    store.close()
    return task["id"]


def test_ties_undo_and_drag_from_the_keyboard_and_mouse(served, page) -> None:
    ready_task(served, ["rank four"], n=4, k=1)
    labeler = labeling(page, served.url, "ann")
    labeler.click("table.tasks button:text-is('Label')")
    labeler.wait_for_selector("#workbench .prompt")
    ids = displayed_ids(labeler)
    assert labeler.locator("#workbench article.completion strong").count() == 4  # Markdown
    for key in ("3", "Backspace", "2", "=", "4", "1"):
        labeler.keyboard.press(key)
    expect(labeler.locator("ol.ranking")).to_have_text("#2=#4>#1")
    badges = labeler.locator("#workbench .rank-badge").all_inner_texts()
    assert badges == ["3rd", "tied 1st", "", "tied 1st"]
    labeler.drag_and_drop("ol.ranking li.ranked >> nth=2", "ol.ranking li.ranked >> nth=0")
    expect(labeler.locator("ol.ranking")).to_have_text("#1>#2=#4")
    labeler.keyboard.press("Enter")  # #3 is last, implied
    expect(labeler.locator("#workbench .done")).to_be_visible()
    [(_, ranking, ties)] = stored_rankings(served.feedback.path)
    assert ranking == [ids[0], ids[1], ids[3], ids[2]] and ties == [[ids[1], ids[3]]]


def test_a_prompt_completed_by_another_labeler_meanwhile_is_not_stored_twice(
    served, page, browser
) -> None:
    ready_task(served, ["only one"], n=2, k=1)
    ann = labeling(page, served.url, "ann")
    ann.click("table.tasks button:text-is('Label')")
    ann.wait_for_selector("#workbench .prompt")
    context = browser.new_context()
    bob = labeling(context.new_page(), served.url, "bob")
    bob.click("table.tasks button:text-is('Label')")
    bob.wait_for_selector("#workbench .prompt")  # the same prompt: no other is left
    ann.keyboard.press("1")
    ann.keyboard.press("Enter")
    expect(ann.locator("#workbench .done")).to_be_visible()
    bob.keyboard.press("2")
    bob.keyboard.press("Enter")
    expect(bob.locator("#workbench .message")).to_contain_text("completed by others")
    expect(bob.locator("#workbench .done")).to_be_visible()
    context.close()
    assert [name for name, _, _ in stored_rankings(served.feedback.path)] == ["ann"]
    assert len(served.feedback.pairwise()) == 1


def test_a_malformed_prompts_file_gets_a_clear_message(served, page) -> None:
    labeler = labeling(page, served.url, "ann")
    create_task(labeler, b'{"prompt": "fine"}\n{"prompt": "broken"\n')
    expect(labeler.locator("form.new-task .message")).to_contain_text(
        "Not created: the prompts file, line 2: not JSON"
    )
    create_task(labeler, b"")
    expect(labeler.locator("form.new-task .message")).to_contain_text("has no prompts")
    assert LabelingStore(served.feedback).tasks() == []


def test_labeling_asks_for_the_labelers_name_first(served, page) -> None:
    ready_task(served, ["p"], n=2, k=1)
    open_page(page, served.url, "#label")
    page.click("table.tasks button:text-is('Label')")
    expect(page.locator(".label-side .message").first).to_contain_text("Type your name")
    assert page.evaluate("document.activeElement.id") == "labeler"


def test_a_task_is_deleted_with_two_clicks_and_no_dialog(served, page) -> None:
    labeler = labeling(page, served.url, "ann")
    create_task(labeler)
    row = labeler.locator("table.tasks tr[data-task]")
    expect(row).to_have_count(1)
    delete = row.locator("button.delete")
    delete.click()
    expect(delete).to_have_text("Delete? Click again")
    assert len(LabelingStore(served.feedback).tasks()) == 1  # the first click only asks
    delete.click()
    expect(labeler.locator("table.tasks tr[data-task]")).to_have_count(0)
    assert LabelingStore(served.feedback).tasks() == []
    assert page.log.dialogs == [] and page.log.errors == []
