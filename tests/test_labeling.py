"""Labeling tasks: prompts files, sampling (n in one request for the served model), rankings
checked and stored once, agreement, the filtered export, the API's rules, and the CLI."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from fake_server import MODELS, fake_server
from typer.testing import CliRunner
from web_support import served  # noqa: F401

from agentkit.agents import AgentContext
from agentkit.services.feedback import FeedbackStore
from agentkit.services.labeling import (
    LEASE_S,
    LabelingError,
    LabelingStore,
    RankingConflict,
    TaskNotFound,
    check_ranking,
    compare,
    ranks,
    read_prompts,
    sample_task,
)
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel

# ruff: noqa: F811  (the fixture imported from web_support is redefined as an argument)


@pytest.fixture
def store(tmp_path: Path):
    feedback = FeedbackStore(tmp_path / "feedback.sqlite")
    labeling = LabelingStore(feedback)
    yield labeling
    labeling.close()
    feedback.close()


def ready_task(store: LabelingStore, prompts: list[str], k: int = 2, n: int = 3) -> dict:
    task = store.create_task(prompts, agent="scripted", n=n, labelers_per_prompt=k)
    for item_id, prompt in store.pending(task["id"]):
        store.set_completions(item_id, [f"{prompt} answer {i}" for i in range(n)])
    return store.task(task["id"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has no prompts"),
        ("\n  \n", "has no prompts"),
        ('{"prompt": "a"}\n{"prompt": "b"', "line 2: not JSON"),
        ('{"prompt": "a"}\n{"question": "b"}', 'line 2: expected {"prompt": "..."}'),
        ('{"prompt": "  "}', "line 1: the prompt is empty"),
        ('{"prompt": "a"}\n\n{"prompt": "a"}', "line 3: repeats the prompt of line 1"),
        ("[1, 2]", "line 1: expected"),
    ],
)
def test_a_bad_prompts_file_is_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(LabelingError, match=message.replace("{", r"\{").replace("(", r"\(")):
        read_prompts(text)


def test_prompts_are_objects_or_strings_one_a_line() -> None:
    assert read_prompts('{"prompt": "a", "id": 7}\n\n"b"\n') == ["a", "b"]


@pytest.mark.parametrize(
    ("ranking", "ties", "message"),
    [
        ([0, 1, 1], None, r"more than once"),
        ([0, 1], None, r"leaves out completions \[2\]"),
        ([0, 1, 2, 5], None, r"do not exist: \[5\]"),
        ([0, 1, 2], [[0, 2]], "next to each other"),
        ([0, 1, 2], [[0]], "two or more"),
        ([0, 1, 2], [[0, 1], [1, 2]], "two tie groups"),
    ],
)
def test_a_ranking_must_name_each_completion_once(ranking, ties, message) -> None:
    with pytest.raises(LabelingError, match=message):
        check_ranking([0, 1, 2], ranking, ties)
    assert check_ranking([0, 1, 2], [2, 0, 1], [[0, 1]]) == [[0, 1]]


def test_agreement_is_the_share_of_pairs_ordered_alike_and_kendalls_tau_b() -> None:
    a = ranks([0, 1, 2, 3], [])
    assert compare(a, a) == (6, 6, 1.0)
    assert compare(a, ranks([3, 2, 1, 0], [])) == (0, 6, -1.0)
    same, total, tau = compare(a, ranks([1, 0, 2, 3], []))  # one swapped pair
    assert (same, total) == (5, 6) and tau == pytest.approx(4 / 6)
    tied = ranks([0, 1, 2, 3], [[0, 1]])
    assert tied == {0: 0, 1: 0, 2: 2, 3: 3}
    same, total, tau = compare(a, tied)  # tau-b: (5 - 0) / sqrt(6 * 5)
    assert (same, total) == (5, 6) and tau == pytest.approx(5 / (6 * 5) ** 0.5)
    assert compare(ranks([0, 1], [[0, 1]]), a)[2] is None  # everything tied: no tau


def test_two_labelers_rank_each_prompt_once_and_conflicts_store_nothing(store) -> None:
    task = ready_task(store, ["p1", "p2"], k=2)
    first = store.next_item(task["id"], "ann")["item"]
    store.add_ranking(first["id"], [0, 1, 2], labeler="ann")
    with pytest.raises(RankingConflict, match="ann has ranked this prompt already"):
        store.add_ranking(first["id"], [2, 1, 0], labeler="ann")
    # bob is offered the prompt ann started first, so it reaches its two labelers
    assert store.next_item(task["id"], "bob")["item"]["id"] == first["id"]
    store.add_ranking(first["id"], [0, 2, 1], labeler="bob")
    with pytest.raises(RankingConflict, match="completed by others"):
        store.add_ranking(first["id"], [0, 1, 2], labeler="cy")
    with pytest.raises(LabelingError, match="leaves out"):
        store.add_ranking(first["id"], [0, 1], labeler="cy")
    task = store.task(task["id"])
    assert (task["rankings"], task["rankings_needed"], task["complete"]) == (2, 4, 1)
    assert len(store.export()) == 6  # two rankings of three: 3 pairs each, nothing twice
    agreement = store.agreement(task["id"])
    assert agreement["prompts_compared"] == 1
    assert agreement["pairwise_agreement"] == pytest.approx(2 / 3)
    assert agreement["labeler_pairs"][0]["labelers"] == ["ann", "bob"]
    progress = store.next_item(task["id"], "ann")["progress"]
    assert (progress["done"], progress["total"]) == (1, 2)


def test_a_prompt_handed_to_one_labeler_goes_to_another_one_first(store) -> None:
    task = ready_task(store, ["p1", "p2"], k=1)
    ann = store.next_item(task["id"], "ann")["item"]
    bob = store.next_item(task["id"], "bob")["item"]
    assert ann["id"] != bob["id"]
    store.add_ranking(ann["id"], [0, 1, 2], labeler="ann")
    store.add_ranking(bob["id"], [0, 1, 2], labeler="bob")
    assert store.next_item(task["id"], "cy")["item"] is None


def test_leases_hold_across_stores_on_one_database_as_across_workers(store, tmp_path) -> None:
    task = ready_task(store, ["p1", "p2"], k=1)
    other_worker = LabelingStore(tmp_path / "feedback.sqlite")
    try:
        ann = store.next_item(task["id"], "ann")["item"]
        bob = other_worker.next_item(task["id"], "bob")["item"]
        assert ann["id"] != bob["id"]  # the lease ann holds is seen by the other process
        assert store.next_item(task["id"], "ann")["item"]["id"] == ann["id"]  # kept for ann
        other_worker.add_ranking(bob["id"], [0, 1, 2], labeler="bob")
        store.add_ranking(ann["id"], [0, 1, 2], labeler="ann")
        assert other_worker.next_item(task["id"], "cy")["item"] is None
        assert sqlite3.connect(tmp_path / "feedback.sqlite").execute(
            "SELECT count(*) FROM labeling_leases"
        ).fetchone() == (0,)  # a ranking releases its lease
    finally:
        other_worker.close()


def test_an_expired_lease_frees_the_prompt(store, monkeypatch) -> None:
    task = ready_task(store, ["p1"], k=1)
    ann = store.next_item(task["id"], "ann")["item"]
    clock = time.time() + LEASE_S + 1
    monkeypatch.setattr("agentkit.services.labeling.time.time", lambda: clock)
    assert store.next_item(task["id"], "bob")["item"]["id"] == ann["id"]


def test_deleting_a_task_removes_its_prompts_and_keeps_the_feedback_it_gave(store) -> None:
    task = ready_task(store, ["p1", "p2"], k=1)
    item = store.next_item(task["id"], "ann")["item"]
    store.add_ranking(item["id"], [0, 1, 2], labeler="ann")
    kept = ready_task(store, ["q"], k=1)
    feedback_rows = FeedbackStore(store.database).count()
    assert store.delete_task(task["id"])["rankings"] == 1
    assert [t["id"] for t in store.tasks()] == [kept["id"]]
    with pytest.raises(TaskNotFound):
        store.task(task["id"])
    with pytest.raises(TaskNotFound):
        store.delete_task(task["id"])
    assert FeedbackStore(store.database).count() == feedback_rows == 1
    left = {
        table: store._read(f"SELECT count(*) FROM {table}")[0][0]
        for table in ("labeling_items", "labeling_rankings", "labeling_leases")
    }
    assert left == {"labeling_items": 1, "labeling_rankings": 0, "labeling_leases": 0}


def test_each_labeler_sees_the_completions_in_an_order_of_their_own(store) -> None:
    task = ready_task(store, ["p"], k=10, n=8)
    orders = {
        tuple(c["id"] for c in store.next_item(task["id"], name)["item"]["completions"])
        for name in ("ann", "bob", "cy", "dee")
    }
    assert len(orders) > 1
    again = store.next_item(task["id"], "ann")["item"]["completions"]
    assert tuple(c["id"] for c in again) in orders  # stable on reload


def test_the_export_filters_by_labeler_agent_date_task_and_owner(store) -> None:
    task = ready_task(store, ["p1"], k=2)
    item = store.next_item(task["id"], "ann")["item"]
    store.add_ranking(item["id"], [0, 1, 2], labeler="ann", owner="alice")
    store.add_ranking(item["id"], [2, 1, 0], labeler="bob", owner="bob")
    middle = time.time()
    store.add_feedback(prompt="q", completion="good", rating=1, labeler="ann", agent="agentkit-rag")
    store.add_feedback(prompt="q", completion="bad", rating=-1, labeler="ann", agent=None)
    assert len(store.export()) == 3 + 3 + 1
    assert len(store.export(labeler="bob")) == 3
    assert len(store.export(agent="scripted")) == 6
    assert store.export(agent="agentkit-rag") == []  # one rating alone makes no pair
    assert len(store.export(since=middle)) == 1
    assert len(store.export(until=middle)) == 6
    assert len(store.export(task_id=task["id"])) == 6
    assert len(store.export(owner="alice")) == 3
    assert store.export_options() == {
        "labelers": ["ann", "bob"],
        "agents": ["agentkit-rag", "scripted"],
    }
    # the rankings are ordinary feedback records: the store's own export has them
    assert len(FeedbackStore(store.path).pairwise()) == 7


def test_sampling_uses_n_in_one_request_for_the_served_model(store, tmp_path: Path) -> None:
    texts = iter(f"answer {i}" for i in range(100))
    model = ScriptedChatModel(lambda messages, **kw: next(texts))
    context = AgentContext(model, Settings(index=tmp_path / "none"))
    task = store.create_task(["a", "b"], agent="scripted", n=4, temperature=0.9)
    done = sample_task(store, context, task["id"], threads=1)
    assert (done["ready"], done["pending"], done["failed"]) == (2, 0, 0)
    assert [c.kwargs["n"] for c in model.calls] == [
        4
    ] * 8  # the scripted double answers n once each
    assert all(c.kwargs["temperature"] == 0.9 for c in model.calls)


def test_an_agent_that_fails_or_repeats_itself_fails_that_prompt_only(store, tmp_path) -> None:
    def reply(messages, **kw):
        if "broken" in messages[-1]["content"]:
            raise RuntimeError("model exploded")
        if "same" in messages[-1]["content"]:
            return "always this"
        return f"fine {len(kw)} {time.perf_counter()}"

    context = AgentContext(ScriptedChatModel(reply), Settings(index=tmp_path / "none"))
    task = store.create_task(["broken one", "same one", "good"], agent="scripted", n=2)
    done = sample_task(store, context, task["id"])
    assert (done["ready"], done["failed"]) == (1, 2)
    errors = {f["prompt"]: f["error"] for f in done["failures"]}
    assert "model exploded" in errors[1] and "higher temperature" in errors[2]


def test_a_thumb_turned_over_changes_the_same_record(store) -> None:
    row = store.add_feedback(
        prompt="q", completion="a", rating=1, labeler="ann", agent="x", owner="alice"
    )
    store.update_feedback(row, owner="alice", rating=-1, comment="wrong file")
    with pytest.raises(LabelingError, match="no rating"):
        store.update_feedback(row, owner="mallory", rating=1)
    rows = sqlite3.connect(store.path).execute("SELECT rating, comment FROM feedback").fetchall()
    assert rows == [(-1, "wrong file")]


# --- the API ----------------------------------------------------------------------------------


def test_tasks_through_the_api_sample_rank_and_export(served) -> None:
    api = httpx.Client(base_url=served.url, timeout=10)
    bad = api.post("/v1/labeling/tasks", json={"agent": "scripted", "jsonl": '{"prompt": 1}'})
    assert bad.status_code == 400 and "line 1" in bad.json()["error"]["message"]
    empty = api.post("/v1/labeling/tasks", json={"agent": "scripted", "jsonl": ""})
    assert empty.status_code == 400 and "no prompts" in empty.json()["error"]["message"]
    jsonl = '{"prompt": "colour?"}\n{"prompt": "shape?"}\n'
    created = api.post(
        "/v1/labeling/tasks",
        json={"agent": "scripted", "jsonl": jsonl, "n": 3, "labelers_per_prompt": 2},
    )
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    deadline = time.monotonic() + 10
    while (
        api.get(f"/v1/labeling/tasks/{task_id}").json()["pending"] and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert api.get(f"/v1/labeling/tasks/{task_id}").json()["ready"] == 2
    n_calls = [c.kwargs.get("n") for c in served.model.calls]
    assert n_calls.count(3) == 6  # one request with n=3 per prompt (the double answers each)
    for labeler in ("ann", "bob"):
        for _ in range(2):
            item = api.get(f"/v1/labeling/tasks/{task_id}/next", params={"labeler": labeler})
            item = item.json()["item"]
            ids = [c["id"] for c in item["completions"]]
            ranked = api.post(
                f"/v1/labeling/items/{item['id']}/rankings",
                json={"ranking": ids, "labeler": labeler, "reason": "first is best"},
            )
            assert ranked.status_code == 200, ranked.text
    again = api.post(
        f"/v1/labeling/items/{item['id']}/rankings", json={"ranking": ids, "labeler": "cy"}
    )
    assert again.status_code == 409 and "completed by others" in again.json()["error"]["message"]
    duplicate = api.post(
        f"/v1/labeling/items/{item['id']}/rankings",
        json={"ranking": [ids[0], ids[0], ids[1]], "labeler": "bob"},
    )
    assert duplicate.status_code == 400
    export = api.get("/v1/labeling/export", params={"task": task_id})
    assert export.headers["content-disposition"].startswith("attachment")
    rows = [json.loads(line) for line in export.text.splitlines()]
    assert len(rows) == 2 * 2 * 3 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert len(api.get("/v1/labeling/export", params={"labeler": "ann"}).text.splitlines()) == 6
    assert len(api.get("/v1/feedback/export").text.splitlines()) == 12
    agreement = api.get(f"/v1/labeling/tasks/{task_id}/agreement").json()
    assert agreement["prompts_compared"] == 2


def test_with_keys_a_user_exports_only_their_own_and_the_labeler_is_the_key(tmp_path) -> None:
    from web_support import start

    running = start(tmp_path, api_keys=("ann:user:k-ann", "boss:admin:k-boss"))
    try:
        ann = httpx.Client(base_url=running.url, headers={"Authorization": "Bearer k-ann"})
        boss = httpx.Client(base_url=running.url, headers={"Authorization": "Bearer k-boss"})
        assert httpx.get(running.url + "/v1/labeling/tasks").status_code == 401
        store = LabelingStore(running.feedback)
        task = ready_task(store, ["p"], k=2)
        for client in (ann, boss):
            item = client.get(f"/v1/labeling/tasks/{task['id']}/next").json()["item"]
            ids = [c["id"] for c in item["completions"]]
            assert client.post(
                f"/v1/labeling/items/{item['id']}/rankings", json={"ranking": ids}
            ).is_success
        labelers = sqlite3.connect(running.feedback.path).execute(
            "SELECT labeler, owner FROM labeling_rankings ORDER BY id"
        )
        assert labelers.fetchall() == [("ann", "ann"), ("boss", "boss")]
        assert len(ann.get("/v1/labeling/export").text.splitlines()) == 3
        assert len(boss.get("/v1/labeling/export").text.splitlines()) == 6
        assert ann.get("/v1/labeling/export/options").json()["labelers"] == ["ann"]
        store.close()
    finally:
        running.stop()


def test_a_task_is_deleted_by_the_key_that_made_it_or_an_admin(tmp_path) -> None:
    from web_support import start

    running = start(tmp_path, api_keys=("ann:user:k-ann", "bob:user:k-bob", "boss:admin:k-boss"))
    try:
        keys = {"ann": "k-ann", "bob": "k-bob", "boss": "k-boss"}
        client = {
            name: httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {key}"})
            for name, key in keys.items()
        }
        made = [
            client[name].post("/v1/labeling/tasks", json={"agent": "scripted", "prompts": ["p"]})
            for name in ("ann", "ann")
        ]
        first, second = (m.json()["id"] for m in made)
        refused = client["bob"].delete(f"/v1/labeling/tasks/{first}")
        assert refused.status_code == 403 and "made this task" in refused.json()["error"]["message"]
        assert client["ann"].delete(f"/v1/labeling/tasks/{first}").json()["deleted"] == first
        assert client["boss"].delete(f"/v1/labeling/tasks/{second}").status_code == 200
        gone = client["ann"].delete(f"/v1/labeling/tasks/{first}")
        assert gone.status_code == 404
        assert client["ann"].get("/v1/labeling/tasks").json()["data"] == []
    finally:
        running.stop()


# --- the CLI ----------------------------------------------------------------------------------


def n_completions(path: str, body: dict | None, number: int):
    if path == "/v1/models":
        return 200, {"Content-Type": "application/json"}, MODELS
    choices = [
        {"index": i, "message": {"role": "assistant", "content": f"take {number}.{i}"},
         "finish_reason": "stop"}
        for i in range(body["n"])
    ]  # fmt: skip
    payload = {"id": "x", "object": "chat.completion", "model": "fake", "choices": choices,
               "usage": {"prompt_tokens": 3, "completion_tokens": 2}}  # fmt: skip
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def test_the_cli_adds_a_task_from_a_jsonl_file(tmp_path: Path, monkeypatch) -> None:
    from agentkit.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "colour?"}\n{"prompt": "shape?"}\n')
    monkeypatch.setenv("AGENTKIT_FEEDBACK_DB", str(tmp_path / "feedback.sqlite"))
    with fake_server(n_completions) as (url, log):
        monkeypatch.setenv("AGENTKIT_LLM_URL", url)
        args = ["feedback", "tasks", "add", str(prompts), "--agent", "fake", "--n", "4"]
        result = CliRunner().invoke(app, [*args, "--labelers", "2", "--json"])
    assert result.exit_code == 0, result.output
    task = json.loads(result.output)
    assert (task["ready"], task["n"], task["labelers_per_prompt"]) == (2, 4, 2)
    chats = [body for path, body in log if path == "/v1/chat/completions"]
    assert len(chats) == 2 and {b["n"] for b in chats} == {4}  # one request per prompt
    listed = CliRunner().invoke(app, ["feedback", "tasks", "list", "--json"])
    assert json.loads(listed.output)[0]["id"] == task["id"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    result = CliRunner().invoke(app, ["feedback", "tasks", "add", str(bad), "--agent", "fake"])
    assert result.exit_code == 1 and "line 2: not JSON" in result.output
    listed = CliRunner().invoke(app, ["feedback", "tasks", "list", "--json"])
    assert len(json.loads(listed.output)) == 1  # nothing stored for the bad file
    deleted = CliRunner().invoke(app, ["feedback", "tasks", "delete", task["id"]])
    assert deleted.exit_code == 0 and f"deleted task {task['id']}" in deleted.output
    listed = CliRunner().invoke(app, ["feedback", "tasks", "list", "--json"])
    assert json.loads(listed.output) == []
    again = CliRunner().invoke(app, ["feedback", "tasks", "delete", task["id"]])
    assert again.exit_code == 1 and "no labeling task" in again.output


def test_ids_too_large_for_sqlite_are_a_400_not_a_server_error(served) -> None:
    api = httpx.Client(base_url=served.url, timeout=10)
    too_large = 2**63
    ranked = api.post(f"/v1/labeling/items/{too_large}/rankings", json={"ranking": [0, 0]})
    changed = api.patch(f"/v1/labeling/feedback/{too_large}", json={})
    assert (ranked.status_code, changed.status_code) == (400, 400), (ranked.text, changed.text)
