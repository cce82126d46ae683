"""Labeling tasks: prompts with N sampled completions each, ranked by several labelers.

A task is a list of prompts (from a JSONL file: ``agentkit feedback tasks add FILE``, or
``POST /v1/labeling/tasks``), an agent that answers them, N, a temperature, and how many
labelers each prompt needs (k). Each prompt's N completions are sampled once (with ``n`` in one
request where the agent is the served model; one run per sample for RAG, PAL and ReAct); then
labelers rank them, best first, ties allowed. A ranking is written in one transaction with its
row of the feedback table (``FeedbackStore``'s format), so ``GET /v1/feedback/export`` yields its
pairs, and the agreement between labelers is computed from the rankings of prompts that several
ranked (pairwise agreement and Kendall's tau-b).

The tables live in the feedback database (``AGENTKIT_FEEDBACK_DB``), beside ``feedback``; a side
table records which agent produced the completions of a feedback row, for the filtered export.
Tasks are shared work: every key sees and labels every task; each ranking records its labeler
(a name, or the API key's name) and its owner (the key).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi import Path as PathParameter
from fastapi.responses import Response
from pydantic import Field, field_validator
from starlette.exceptions import HTTPException

from agentkit.agents import (
    PASS_THROUGH,
    AgentContext,
    AgentRequest,
    agent_names,
    get_agent,
    run_agent,
)
from agentkit.errors import AgentkitError
from agentkit.services.auth import AUTHORIZED, Caller
from agentkit.services.feedback import FeedbackStore, to_pairs
from agentkit.services.schemas import (
    RankingFeedback,
    RatingFeedback,
    StrictModel,
    errors,
    whole_number,
)
from agentkit.services.storage import (
    Connection,
    Database,
    Migration,
    migrate,
    open_database,
    statements,
)

MIGRATIONS = [
    Migration(
        1,
        "tasks, their prompts and completions, rankings, the agent of a feedback row",
        statements(
            """CREATE TABLE IF NOT EXISTS labeling_tasks (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, agent TEXT NOT NULL, n INTEGER NOT NULL,
    temperature {real} NOT NULL, labelers_per_prompt INTEGER NOT NULL, owner TEXT,
    created {real} NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS labeling_items (
    id {id}, task_id TEXT NOT NULL REFERENCES labeling_tasks(id),
    ordinal INTEGER NOT NULL, prompt TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'failed')), error TEXT,
    completions TEXT, UNIQUE (task_id, ordinal))""",
            """CREATE TABLE IF NOT EXISTS labeling_rankings (
    id {id}, item_id BIGINT NOT NULL REFERENCES labeling_items(id),
    labeler TEXT NOT NULL, owner TEXT, ranking TEXT NOT NULL, ties TEXT NOT NULL, reason TEXT,
    feedback_id BIGINT NOT NULL, created {real} NOT NULL, UNIQUE (item_id, labeler))""",
            "CREATE TABLE IF NOT EXISTS feedback_agents (feedback_id BIGINT PRIMARY KEY, "
            "agent TEXT)",
        ),
    ),
    Migration(
        2,
        "leases of prompts to labelers in the database (shared by workers and replicas)",
        statements(
            """CREATE TABLE IF NOT EXISTS labeling_leases (
    item_id BIGINT NOT NULL, labeler TEXT NOT NULL, until {real} NOT NULL,
    PRIMARY KEY (item_id, labeler))""",
        ),
    ),
]
MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 100_000
LEASE_S = 600.0  # a prompt handed to a labeler is kept from others this long (unless needed)
SAMPLING_THREADS = 4  # prompts of one task sampled at once

# An id in a path is a SQLite rowid: a larger number is a 400 (validation), never an overflow.
RowId = Annotated[int, PathParameter(ge=1, le=2**63 - 1)]


class LabelingError(AgentkitError):
    """A labeling request that cannot be served; ``status`` is its HTTP status."""

    status = 400


class TaskNotFound(LabelingError):
    status = 404


class UnknownAgent(LabelingError):
    status = 404


class RankingConflict(LabelingError):
    """The prompt was completed by others, or this labeler ranked it already: nothing stored."""

    status = 409


def read_prompts(text: str, *, source: str = "the prompts file") -> list[str]:
    """The prompts of a JSONL text: one ``{"prompt": "..."}`` object (or a JSON string) a line,
    blank lines skipped. LabelingError naming the line when one is malformed, empty or repeated,
    or when there is no prompt at all."""
    prompts: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as error:
            raise LabelingError(f"{source}, line {number}: not JSON ({error.msg})") from None
        prompt = value.get("prompt") if isinstance(value, dict) else value
        if not isinstance(prompt, str):
            raise LabelingError(
                f'{source}, line {number}: expected {{"prompt": "..."}} (or a JSON string)'
            )
        if not prompt.strip():
            raise LabelingError(f"{source}, line {number}: the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise LabelingError(
                f"{source}, line {number}: the prompt is longer than {MAX_PROMPT_CHARS} characters"
            )
        if prompt in first_line:
            raise LabelingError(
                f"{source}, line {number}: repeats the prompt of line {first_line[prompt]}"
            )
        first_line[prompt] = number
        prompts.append(prompt)
        if len(prompts) > MAX_PROMPTS:
            raise LabelingError(f"{source} has more than {MAX_PROMPTS} prompts; split it")
    if not prompts:
        raise LabelingError(f'{source} has no prompts: write one {{"prompt": "..."}} per line')
    return prompts


def check_ranking(
    ids: list[int], ranking: list[int], ties: list[list[int]] | None
) -> list[list[int]]:
    """The tie groups, once ``ranking`` is checked to name each completion of ``ids`` exactly
    once and each tie group to be two or more neighbours in it; else a LabelingError that says
    what is wrong."""
    known = set(ids)
    unknown = sorted({c for c in ranking if c not in known})
    if unknown:
        raise LabelingError(f"the ranking names completions that do not exist: {unknown}")
    twice = sorted({c for c in ranking if ranking.count(c) > 1})
    if twice:
        raise LabelingError(f"the ranking names completions {twice} more than once")
    missing = sorted(known - set(ranking))
    if missing:
        raise LabelingError(
            f"the ranking leaves out completions {missing}: rank every one (ties are allowed)"
        )
    groups = [list(group) for group in ties or []]
    position = {c: i for i, c in enumerate(ranking)}
    seen: set[int] = set()
    for group in groups:
        if len(group) < 2 or not set(group) <= known or len(set(group)) != len(group):
            raise LabelingError("each tie group must name two or more different completions")
        if seen & set(group):
            raise LabelingError("a completion is in two tie groups; merge them into one")
        seen |= set(group)
        places = sorted(position[c] for c in group)
        if places[-1] - places[0] != len(group) - 1:
            raise LabelingError(
                "completions tied together must be next to each other in the ranking"
            )
    return groups


def ranks(ranking: list[Any], ties: list[list[Any]]) -> dict[Any, int]:
    """Each item's rank: its place in ``ranking``, shared by a tie group (its first place)."""
    group_of = {c: i for i, group in enumerate(ties) for c in group}
    rank: dict[Any, int] = {}
    first: dict[int, int] = {}
    for place, item in enumerate(ranking):
        group = group_of.get(item)
        rank[item] = place if group is None else first.setdefault(group, place)
    return rank


def compare(a: dict[Any, int], b: dict[Any, int]) -> tuple[int, int, float | None]:
    """Two labelers' ranks of the same items: (pairs of items they order alike, pairs, Kendall's
    tau-b or None when either ranking ties everything)."""
    same = concordant = discordant = tied_a = tied_b = total = 0
    for x, y in itertools.combinations(sorted(a), 2):
        sa = (a[x] > a[y]) - (a[x] < a[y])
        sb = (b[x] > b[y]) - (b[x] < b[y])
        total += 1
        same += sa == sb
        concordant += sa * sb > 0
        discordant += sa * sb < 0
        tied_a += sa == 0
        tied_b += sb == 0
    room = math.sqrt((total - tied_a) * (total - tied_b))
    return same, total, (concordant - discordant) / room if room else None


def shuffled(ids: list[int], labeler: str, item_id: int) -> list[int]:
    """A fixed order of ``ids`` per labeler and prompt, so position says nothing about which
    sample came first, and a reload shows the same order."""

    def key(c: int) -> bytes:
        return hashlib.sha256(f"{labeler}\0{item_id}\0{c}".encode()).digest()

    return sorted(ids, key=key)


def check_agent_name(agent: str, context: AgentContext) -> None:
    """LabelingError unless ``agent`` is a registered agent that can run here, or the served
    model's name (when the model says it)."""
    spec = get_agent(agent)
    served = getattr(context.model, "model", None)
    if spec is PASS_THROUGH and isinstance(served, str) and agent != served:
        names = ", ".join([*agent_names(), served])
        raise UnknownAgent(f"no agent or model {agent!r} here; use one of {names}")
    if spec.needs_index and context.index is None:
        raise LabelingError(f"{agent} needs an index: start the API with --index")


def sample_completions(
    context: AgentContext, agent: str, prompt: str, n: int, temperature: float
) -> list[str]:
    """``n`` answers of ``agent`` to ``prompt``, duplicates dropped: the served model samples
    them in one request (``n``), other agents run once per sample."""
    if get_agent(agent) is PASS_THROUGH:
        texts = run_agent(
            agent, context, AgentRequest.ask(prompt, n=n, temperature=temperature)
        ).texts
    else:
        request = AgentRequest.ask(prompt, temperature=temperature)
        texts = [run_agent(agent, context, request).text for _ in range(n)]
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


class LabelingStore:
    """Tasks, their prompts and completions, and rankings, in the feedback database."""

    def __init__(self, feedback: FeedbackStore | Database | Path | str) -> None:
        """On ``feedback``'s database (a FeedbackStore, or anything with ``database`` or
        ``path``), or on a Database, a SQLite path or a PostgreSQL URL of its own."""
        target = getattr(feedback, "database", None) or getattr(feedback, "path", None) or feedback
        self.database = open_database(target)
        self._owns_database = self.database is not target
        self.path = getattr(self.database, "path", None)
        if not isinstance(feedback, FeedbackStore):
            FeedbackStore(self.database)  # the feedback table, as the feedback store makes it
        migrate(self.database, "labeling", MIGRATIONS)

    def _writing(self) -> AbstractContextManager[Connection]:
        return self.database.transaction()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.database.read() as db:
            return db.execute(sql, args).fetchall()

    # --- tasks -----------------------------------------------------------------------------

    def create_task(
        self,
        prompts: list[str],
        *,
        agent: str,
        n: int = 4,
        temperature: float = 0.8,
        labelers_per_prompt: int = 1,
        name: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """A new task whose prompts wait for their completions (``sample_task``)."""
        if not 2 <= n <= 16:
            raise LabelingError("n must be between 2 and 16 completions per prompt")
        if not 1 <= labelers_per_prompt <= 50:
            raise LabelingError("labelers_per_prompt must be between 1 and 50")
        if not 0 <= temperature <= 2:
            raise LabelingError("temperature must be between 0 and 2")
        if not prompts:
            raise LabelingError("a task needs at least one prompt")
        task_id = uuid.uuid4().hex[:12]
        name = (name or "").strip() or f"{agent} · {time.strftime('%Y-%m-%d %H:%M')}"
        with self._writing() as db:
            db.execute(
                "INSERT INTO labeling_tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (task_id, name, agent, n, temperature, labelers_per_prompt, owner, time.time()),
            )
            db.executemany(
                "INSERT INTO labeling_items (task_id, ordinal, prompt, state) "
                "VALUES (?, ?, ?, 'pending')",
                [(task_id, i, p) for i, p in enumerate(prompts)],
            )
        return self.task(task_id)

    def tasks(self) -> list[dict[str, Any]]:
        """Every task with its counts, newest first."""
        ids = self._read("SELECT id FROM labeling_tasks ORDER BY created DESC, id DESC")
        return [self.task(task_id) for (task_id,) in ids]

    def task(self, task_id: str) -> dict[str, Any]:
        row = self._read("SELECT * FROM labeling_tasks WHERE id = ?", (task_id,))
        if not row:
            raise TaskNotFound(f"no labeling task {task_id!r}")
        id_, name, agent, n, temperature, k, owner, created = row[0]
        states = dict(
            self._read(
                "SELECT state, count(*) FROM labeling_items WHERE task_id = ? GROUP BY state",
                (task_id,),
            )
        )
        per_item = [
            count
            for (count,) in self._read(
                "SELECT (SELECT count(*) FROM labeling_rankings r WHERE r.item_id = i.id) "
                "FROM labeling_items i WHERE i.task_id = ? AND i.state = 'ready'",
                (task_id,),
            )
        ]
        errors = self._read(
            "SELECT ordinal, error FROM labeling_items WHERE task_id = ? AND state = 'failed' "
            "ORDER BY ordinal LIMIT 5",
            (task_id,),
        )
        return {
            "id": id_,
            "name": name,
            "agent": agent,
            "n": n,
            "temperature": temperature,
            "labelers_per_prompt": k,
            "owner": owner,
            "created": created,
            "prompts": sum(states.values()),
            "ready": states.get("ready", 0),
            "pending": states.get("pending", 0),
            "failed": states.get("failed", 0),
            "failures": [{"prompt": o + 1, "error": e} for o, e in errors],
            "rankings": sum(per_item),
            "rankings_needed": k * len(per_item),
            "complete": sum(c >= k for c in per_item),
        }

    def delete_task(self, task_id: str) -> dict[str, Any]:
        """Remove a task: its prompts, completions, rankings and leases. The feedback its
        rankings gave stays in the feedback store (the export keeps it)."""
        task = self.task(task_id)
        items = "SELECT id FROM labeling_items WHERE task_id = ?"
        with self._writing() as db:
            db.execute(f"DELETE FROM labeling_leases WHERE item_id IN ({items})", (task_id,))
            db.execute(f"DELETE FROM labeling_rankings WHERE item_id IN ({items})", (task_id,))
            db.execute("DELETE FROM labeling_items WHERE task_id = ?", (task_id,))
            db.execute("DELETE FROM labeling_tasks WHERE id = ?", (task_id,))
        return task

    def pending(self, task_id: str, *, failed_too: bool = False) -> list[tuple[int, str]]:
        """(item id, prompt) of the prompts still waiting for completions (and of those whose
        sampling failed, with ``failed_too``)."""
        states = "('pending', 'failed')" if failed_too else "('pending')"
        return self._read(
            f"SELECT id, prompt FROM labeling_items WHERE task_id = ? AND state IN {states} "
            "ORDER BY ordinal",
            (task_id,),
        )  # type: ignore[return-value]

    def set_completions(self, item_id: int, texts: list[str]) -> None:
        """The item's completions; fewer than two different ones fail it (nothing to rank)."""
        with self._writing() as db:
            if len(texts) < 2:
                error = (
                    "the agent gave the same answer every time; create the task again with a "
                    "higher temperature"
                )
                db.execute(
                    "UPDATE labeling_items SET state = 'failed', error = ? WHERE id = ?",
                    (error, item_id),
                )
            else:
                db.execute(
                    "UPDATE labeling_items SET state = 'ready', error = NULL, completions = ? "
                    "WHERE id = ?",
                    (json.dumps(texts), item_id),
                )

    def set_failed(self, item_id: int, error: str) -> None:
        with self._writing() as db:
            db.execute(
                "UPDATE labeling_items SET state = 'failed', error = ? WHERE id = ?",
                (error[:1000], item_id),
            )

    # --- labeling ---------------------------------------------------------------------------

    def next_item(
        self, task_id: str, labeler: str, exclude: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        """The next prompt for ``labeler`` (``item`` None when none is left) and their progress.

        Prompts others have started come first (so each reaches its k labelers soon); a prompt
        just handed to another labeler is kept from this one while others are free."""
        task = self.task(task_id)
        k = task["labelers_per_prompt"]
        rows = self._read(
            "SELECT i.id, i.prompt, i.completions, "
            "(SELECT count(*) FROM labeling_rankings r WHERE r.item_id = i.id), "
            "EXISTS (SELECT 1 FROM labeling_rankings r WHERE r.item_id = i.id AND r.labeler = ?) "
            "FROM labeling_items i WHERE i.task_id = ? AND i.state = 'ready' ORDER BY i.ordinal",
            (labeler, task_id),
        )
        done = sum(mine for *_, mine in rows)
        open_items = [r for r in rows if not r[4] and r[3] < k]
        now = time.time()  # leases are shared by processes: wall-clock time
        with self._writing() as db:  # one writer at a time: two labelers never take one lease
            db.execute("DELETE FROM labeling_leases WHERE until < ?", (now,))
            leased: dict[int, int] = defaultdict(int)  # item → labelers other than this one
            for (item_id,) in db.execute(
                "SELECT l.item_id FROM labeling_leases l JOIN labeling_items i "
                "ON i.id = l.item_id WHERE i.task_id = ? AND l.labeler != ?",
                (task_id, labeler),
            ).fetchall():
                leased[item_id] += 1
            candidates = [r for r in open_items if r[0] not in exclude]
            free = [r for r in candidates if r[3] + leased[r[0]] < k] or candidates
            free.sort(key=lambda r: -r[3])  # stable: the file's order among equals
            chosen = free[0] if free else None
            if chosen is not None:
                db.execute(
                    "INSERT INTO labeling_leases (item_id, labeler, until) VALUES (?, ?, ?) "
                    "ON CONFLICT (item_id, labeler) DO UPDATE SET until = excluded.until",
                    (chosen[0], labeler, now + LEASE_S),
                )
        progress = {
            "done": done,
            "total": done + len(open_items),
            "pending": task["pending"],
            "task_rankings": task["rankings"],
            "task_rankings_needed": task["rankings_needed"],
        }
        if chosen is None:
            return {"task": task, "item": None, "progress": progress}
        item_id, prompt, completions, count, _ = chosen
        texts = json.loads(completions)
        order = shuffled(list(range(len(texts))), labeler, item_id)
        item = {
            "id": item_id,
            "prompt": prompt,
            "completions": [{"id": c, "text": texts[c]} for c in order],
            "rankings": count,
            "labelers_per_prompt": k,
        }
        return {"task": task, "item": item, "progress": progress}

    def add_ranking(
        self,
        item_id: int,
        ranking: list[int],
        *,
        labeler: str,
        ties: list[list[int]] | None = None,
        reason: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Store ``labeler``'s ranking of the item's completions (ids, best first) and its row of
        the feedback table, in one transaction. RankingConflict, storing nothing, when the
        prompt already has its k rankings or this labeler ranked it already."""
        labeler = labeler.strip()
        if not labeler:
            raise LabelingError("a ranking needs the labeler's name")
        with self._writing() as db:
            row = db.execute(
                "SELECT i.prompt, i.completions, i.state, t.labelers_per_prompt, t.agent "
                "FROM labeling_items i JOIN labeling_tasks t ON t.id = i.task_id WHERE i.id = ?",
                (item_id,),
            ).fetchone()
            if row is None or row[2] != "ready":
                raise TaskNotFound(f"no prompt {item_id} ready for ranking")
            prompt, completions, _, k, agent = row
            texts = json.loads(completions)
            groups = check_ranking(list(range(len(texts))), ranking, ties)
            labelers = [
                name
                for (name,) in db.execute(
                    "SELECT labeler FROM labeling_rankings WHERE item_id = ?", (item_id,)
                )
            ]
            if labeler in labelers:
                raise RankingConflict(
                    f"{labeler} has ranked this prompt already; the first ranking is kept"
                )
            if len(labelers) >= k:
                raise RankingConflict(
                    f"this prompt was completed by others ({len(labelers)} of {k} labelers) while "
                    "you were ranking it; your ranking was not stored: go on to the next prompt"
                )
            feedback_id = self._insert_feedback(
                db,
                kind="ranking",
                prompt=prompt,
                ranking=json.dumps([texts[c] for c in ranking]),
                ties=json.dumps([[texts[c] for c in group] for group in groups]),
                comment=reason,
                labeler=labeler,
                owner=owner,
                agent=agent,
            )
            ranking_id = db.execute(
                "INSERT INTO labeling_rankings (item_id, labeler, owner, ranking, ties, reason, "
                "feedback_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    item_id,
                    labeler,
                    owner,
                    json.dumps(ranking),
                    json.dumps(groups),
                    reason,
                    feedback_id,
                    time.time(),
                ),
            ).fetchone()[0]
            db.execute(
                "DELETE FROM labeling_leases WHERE item_id = ? AND labeler = ?", (item_id, labeler)
            )
        return {"id": ranking_id, "feedback_id": feedback_id, "labeler": labeler}

    def add_feedback(
        self,
        *,
        prompt: str,
        labeler: str,
        agent: str | None,
        completion: str | None = None,
        rating: int | None = None,
        ranking: list[str] | None = None,
        ties: list[list[str]] | None = None,
        comment: str | None = None,
        owner: str | None = None,
    ) -> int:
        """A rating or a ranking from the chat (as ``FeedbackStore`` takes them), with the agent
        that answered recorded for the export's filter."""
        if ranking is None:
            if rating not in (1, -1) or completion is None:
                raise LabelingError("a rating needs a completion and rating 1 or -1")
            row = {"kind": "rating", "completion": completion, "rating": rating}
        else:
            if len(ranking) < 2 or len(set(ranking)) != len(ranking):
                raise LabelingError("a ranking needs at least two different completions")
            for group in ties or []:
                if len(group) < 2 or not set(group) <= set(ranking):
                    raise LabelingError(
                        "each tie group must name two or more completions of the ranking"
                    )
            row = {
                "kind": "ranking",
                "ranking": json.dumps(ranking),
                "ties": json.dumps(ties or []),
            }
        with self._writing() as db:
            return self._insert_feedback(
                db, prompt=prompt, comment=comment, labeler=labeler, owner=owner, agent=agent, **row
            )

    def update_feedback(
        self,
        feedback_id: int,
        *,
        owner: str | None,
        rating: int | None = None,
        comment: str | None = None,
    ) -> None:
        """Change the rating or the comment of a rating the same key (``owner``) gave: a thumb
        turned over, a comment added later, without a second record."""
        if rating is not None and rating not in (1, -1):
            raise LabelingError("rating must be 1 or -1")
        with self._writing() as db:
            found = db.execute(
                "SELECT 1 FROM feedback WHERE id = ? AND kind = 'rating' "
                "AND owner IS NOT DISTINCT FROM ?",
                (feedback_id, owner),
            ).fetchone()
            if found is None:
                raise TaskNotFound(f"no rating {feedback_id} given with this API key")
            if rating is not None:
                db.execute("UPDATE feedback SET rating = ? WHERE id = ?", (rating, feedback_id))
            if comment is not None:
                db.execute(
                    "UPDATE feedback SET comment = ? WHERE id = ?",
                    (comment.strip() or None, feedback_id),
                )

    @staticmethod
    def _insert_feedback(db: Connection, *, agent: str | None, **row: Any) -> int:
        """One row of ``FeedbackStore``'s table (and its agent) inside the caller's transaction."""
        row["created"] = time.time()
        feedback_id = int(
            db.execute(
                f"INSERT INTO feedback ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}) "
                "RETURNING id",
                list(row.values()),
            ).fetchone()[0]
        )
        if agent:
            db.execute("INSERT INTO feedback_agents VALUES (?, ?)", (feedback_id, agent))
        return feedback_id

    # --- what the labels say ----------------------------------------------------------------

    def agreement(self, task_id: str) -> dict[str, Any]:
        """Agreement between labelers on the task's prompts that two or more ranked: the share
        of completion pairs two labelers order alike (a tie counts as an order), and Kendall's
        tau-b, over every two labelers of every such prompt, and per two labelers."""
        self.task(task_id)
        rows = self._read(
            "SELECT r.item_id, r.labeler, r.ranking, r.ties FROM labeling_rankings r "
            "JOIN labeling_items i ON i.id = r.item_id WHERE i.task_id = ? ORDER BY r.id",
            (task_id,),
        )
        by_item: dict[int, dict[str, dict[int, int]]] = defaultdict(dict)
        for item_id, labeler, ranking, ties in rows:
            by_item[item_id][labeler] = ranks(json.loads(ranking), json.loads(ties))
        pairs: dict[tuple[str, str], list[Any]] = defaultdict(lambda: [0, 0, [], 0])
        for labels in by_item.values():
            for a, b in itertools.combinations(sorted(labels), 2):
                same, total, tau = compare(labels[a], labels[b])
                entry = pairs[(a, b)]
                entry[0] += same
                entry[1] += total
                entry[3] += 1
                if tau is not None:
                    entry[2].append(tau)
        same = sum(e[0] for e in pairs.values())
        total = sum(e[1] for e in pairs.values())
        taus = [t for e in pairs.values() for t in e[2]]
        return {
            "prompts_compared": sum(len(labels) >= 2 for labels in by_item.values()),
            "pairwise_agreement": same / total if total else None,
            "kendall_tau": sum(taus) / len(taus) if taus else None,
            "labeler_pairs": [
                {
                    "labelers": list(names),
                    "prompts": e[3],
                    "pairwise_agreement": e[0] / e[1] if e[1] else None,
                    "kendall_tau": sum(e[2]) / len(e[2]) if e[2] else None,
                }
                for names, e in sorted(pairs.items())
            ],
        }

    def export(
        self,
        *,
        owner: str | None = None,
        labeler: str | None = None,
        agent: str | None = None,
        since: float | None = None,
        until: float | None = None,
        task_id: str | None = None,
    ) -> list[dict[str, str]]:
        """Pairwise preferences (``{prompt, chosen, rejected}``) from the feedback records that
        match every filter given: ``owner`` (the key; None: everyone's), labeler, agent,
        created in [since, until), and from one task's rankings."""
        where, args = ["1 = 1"], []
        for clause, value in (
            ("f.owner = ?", owner),
            ("f.labeler = ?", labeler),
            ("a.agent = ?", agent),
            ("f.created >= ?", since),
            ("f.created < ?", until),
            (
                "f.id IN (SELECT r.feedback_id FROM labeling_rankings r JOIN labeling_items i "
                "ON i.id = r.item_id WHERE i.task_id = ?)",
                task_id,
            ),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        with self.database.snapshot() as db:
            rows = db.execute(
                "SELECT f.kind, f.prompt, f.completion, f.rating, f.ranking, f.ties "
                "FROM feedback f LEFT JOIN feedback_agents a ON a.feedback_id = f.id "
                f"WHERE {' AND '.join(where)} ORDER BY f.id",
                args,
            ).fetchall()
        rankings = [(p, r, t) for kind, p, _, _, r, t in rows if kind == "ranking"]
        ratings = [(p, c, v) for kind, p, c, v, _, _ in rows if kind == "rating"]
        return to_pairs(rankings, ratings)

    def export_options(self, owner: str | None = None) -> dict[str, list[str]]:
        """The labelers and agents found in the feedback an export by ``owner`` would read."""
        where, args = ("", ()) if owner is None else (" WHERE f.owner = ?", (owner,))
        labelers = self._read(f"SELECT DISTINCT f.labeler FROM feedback f{where} ORDER BY 1", args)
        agents = self._read(
            "SELECT DISTINCT a.agent FROM feedback_agents a JOIN feedback f ON f.id = "
            f"a.feedback_id{where} ORDER BY 1",
            args,
        )
        return {"labelers": [r[0] for r in labelers], "agents": [r[0] for r in agents]}

    def close(self) -> None:
        """Close the database unless it came from the feedback store or was handed in."""
        if self._owns_database:
            self.database.close()


def sample_task(
    store: LabelingStore,
    context: AgentContext,
    task_id: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    threads: int = SAMPLING_THREADS,
    failed_too: bool = False,
    cancel: threading.Event | None = None,
) -> dict[str, Any] | None:
    """Sample the completions of every prompt of the task still waiting for them (and of those
    that failed, with ``failed_too``), a few at once; a prompt whose agent fails is marked
    failed with the error, the others go on. ``progress(done, total)`` after each prompt.
    Returns the task; None when ``cancel`` was set (the task was deleted): prompts not started
    by then are not sampled."""
    task = store.task(task_id)
    waiting = store.pending(task_id, failed_too=failed_too)
    done = 0
    lock = threading.Lock()

    def sample(item: tuple[int, str]) -> None:
        nonlocal done
        item_id, prompt = item
        if cancel is not None and cancel.is_set():
            return
        try:
            texts = sample_completions(
                context, task["agent"], prompt, task["n"], task["temperature"]
            )
        except AgentkitError as error:
            store.set_failed(item_id, str(error))
        except Exception as error:  # the prompt fails, the task goes on
            store.set_failed(item_id, f"{type(error).__name__}: {error}")
        else:
            store.set_completions(item_id, texts)
        with lock:
            done += 1
            if progress is not None:
                progress(done, len(waiting))

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="agentkit-sample") as pool:
        list(pool.map(sample, waiting))
    if cancel is not None and cancel.is_set():
        return None
    return store.task(task_id)


# --- the REST API ----------------------------------------------------------------------------


def labeling_router(store: LabelingStore, context: AgentContext) -> APIRouter:
    """``/v1/labeling/...``: tasks, the next prompt for a labeler, rankings, agreement, the
    filtered export, and feedback from the chat page with its agent."""
    router = APIRouter(prefix="/v1/labeling", tags=["labeling"])
    samplers: dict[str, threading.Thread] = {}
    cancels: dict[str, threading.Event] = {}  # of the samplers, for a task being deleted

    def served(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except LabelingError as error:
            raise HTTPException(error.status, str(error)) from None

    def start_sampling(task_id: str, failed_too: bool = False) -> None:
        running = samplers.get(task_id)
        if running is not None and running.is_alive():
            return
        cancel = cancels.setdefault(task_id, threading.Event())
        thread = threading.Thread(
            target=sample_task,
            args=(store, context, task_id),
            kwargs={"failed_too": failed_too, "cancel": cancel},
            name="agentkit-label",
            daemon=True,
        )
        samplers[task_id] = thread
        thread.start()

    def labeler_of(name: str | None, caller: Caller) -> str:
        return (name or "").strip() or caller.name

    @router.get("/tasks", responses=errors(401, 429))
    def list_tasks(_: Caller = AUTHORIZED) -> dict[str, Any]:
        return {"object": "list", "data": store.tasks()}

    @router.post("/tasks", status_code=202, responses=errors(400, 401, 404, 413, 429))
    def create_task(body: TaskRequest, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """Prompts as a list or as the text of a JSONL file; their completions are sampled in
        the background (watch ``pending`` in ``GET /v1/labeling/tasks/ID``)."""
        if (body.prompts is None) == (body.jsonl is None):
            raise HTTPException(400, "send either prompts (a list) or jsonl (a file's text)")

        def create() -> dict[str, Any]:
            check_agent_name(body.agent, context)
            prompts = body.prompts if body.jsonl is None else read_prompts(body.jsonl)
            if body.prompts is not None:
                read_prompts("\n".join(json.dumps(p) for p in prompts), source="prompts")
            return store.create_task(
                prompts,  # type: ignore[arg-type]
                agent=body.agent,
                n=body.n,
                temperature=body.temperature,
                labelers_per_prompt=body.labelers_per_prompt,
                name=body.name,
                owner=caller.owner,
            )

        task = served(create)
        start_sampling(task["id"])
        return task

    @router.get("/tasks/{task_id}", responses=errors(401, 404, 429))
    def get_task(task_id: str, _: Caller = AUTHORIZED) -> dict[str, Any]:
        return served(lambda: store.task(task_id))

    @router.delete("/tasks/{task_id}", responses=errors(401, 403, 404, 429))
    def delete_task(task_id: str, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """The key that made a task, or an admin, deletes it (its prompts, completions and
        rankings; the feedback it gave stays in the export). Sampling still running stops."""
        task = served(lambda: store.task(task_id))
        if not caller.admin and task.get("owner") != caller.owner:
            raise HTTPException(403, "only the key that made this task, or an admin, deletes it")
        cancel = cancels.pop(task_id, None)
        if cancel is not None:
            cancel.set()
        served(lambda: store.delete_task(task_id))
        return {"deleted": task_id, "object": "labeling.task"}

    @router.post("/tasks/{task_id}/sample", status_code=202, responses=errors(401, 404, 429))
    def resume_sampling(task_id: str, _: Caller = AUTHORIZED) -> dict[str, Any]:
        """Sample what is still pending (after a restart stopped it) and what failed."""
        task = served(lambda: store.task(task_id))
        start_sampling(task_id, failed_too=True)
        return task

    @router.get("/tasks/{task_id}/next", responses=errors(401, 404, 429))
    def next_item(
        task_id: str,
        labeler: str | None = None,
        exclude: str = "",
        caller: Caller = AUTHORIZED,
    ) -> dict[str, Any]:
        """The next prompt for the labeler (default: the key's name); ``exclude``: item ids
        to skip, comma-separated."""
        skipped = tuple(int(i) for i in exclude.split(",") if i.strip().isdigit())
        name = labeler_of(labeler, caller)
        return {**served(lambda: store.next_item(task_id, name, skipped)), "labeler": name}

    @router.get("/tasks/{task_id}/agreement", responses=errors(401, 404, 429))
    def agreement(task_id: str, _: Caller = AUTHORIZED) -> dict[str, Any]:
        return served(lambda: store.agreement(task_id))

    @router.post("/items/{item_id}/rankings", responses=errors(400, 401, 404, 409, 413, 429))
    def rank(item_id: RowId, body: RankingRequest, caller: Caller = AUTHORIZED) -> dict[str, Any]:
        """A labeler's ranking of a prompt's completions by id, best first; 409 (nothing
        stored) when the prompt was completed by others or this labeler ranked it already."""
        return served(
            lambda: store.add_ranking(
                item_id,
                body.ranking,
                labeler=labeler_of(body.labeler, caller),
                ties=body.ties,
                reason=body.reason,
                owner=caller.owner,
            )
        )

    @router.post("/feedback", responses=errors(400, 401, 413, 429))
    def chat_feedback(
        body: ChatRating | ChatRanking, caller: Caller = AUTHORIZED
    ) -> dict[str, Any]:
        """As ``POST /v1/feedback``, with the agent that answered (for the export's filter);
        the labeler defaults to the key's name."""
        kind = (
            {"completion": body.completion, "rating": body.rating}
            if isinstance(body, ChatRating)
            else {"ranking": body.ranking, "ties": body.ties}
        )
        row = served(
            lambda: store.add_feedback(
                prompt=body.prompt,
                labeler=labeler_of(body.labeler, caller),
                agent=body.agent,
                comment=body.comment,
                owner=caller.owner,
                **kind,
            )
        )
        return {"id": row, "object": "feedback"}

    @router.patch("/feedback/{feedback_id}", responses=errors(400, 401, 404, 413, 429))
    def change_feedback(
        feedback_id: RowId, body: FeedbackChange, caller: Caller = AUTHORIZED
    ) -> dict[str, Any]:
        """Turn a thumb over or add a comment to a rating this key gave."""
        served(
            lambda: store.update_feedback(
                feedback_id, owner=caller.owner, rating=body.rating, comment=body.comment
            )
        )
        return {"id": feedback_id, "object": "feedback"}

    def export_owner(caller: Caller) -> str | None:
        return None if caller.admin else caller.name

    @router.get("/export/options", responses=errors(401, 429))
    def export_options(caller: Caller = AUTHORIZED) -> dict[str, list[str]]:
        return store.export_options(export_owner(caller))

    @router.get(
        "/export",
        response_class=Response,
        responses={
            200: {
                "description": "Pairwise preferences, one JSON object a line",
                "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            },
            **errors(400, 401, 429),
        },
    )
    def export(
        labeler: str | None = None,
        agent: str | None = None,
        since: float | None = None,
        until: float | None = None,
        task: str | None = None,
        caller: Caller = AUTHORIZED,
    ) -> Response:
        """``{prompt, chosen, rejected}`` JSONL (TRL's reward and DPO trainers) of the feedback
        matching every filter given (``since``/``until``: Unix seconds); an admin exports
        everyone's, any other key its own."""
        pairs = store.export(
            owner=export_owner(caller),
            labeler=labeler or None,
            agent=agent or None,
            since=since,
            until=until,
            task_id=task or None,
        )
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        return Response(
            lines,
            media_type="application/x-ndjson",
            headers={"Content-Disposition": 'attachment; filename="preferences.jsonl"'},
        )

    return router


def not_a_boolean(rating: object) -> object:
    """``true`` would pass as 1: a rating is the number 1 or -1."""
    if isinstance(rating, bool):
        raise ValueError("rating must be the number 1 or -1")
    return rating


class TaskRequest(StrictModel):
    agent: str = Field(min_length=1, max_length=200)
    prompts: list[str] | None = Field(None, min_length=1, max_length=MAX_PROMPTS)
    jsonl: str | None = Field(None, max_length=50_000_000)
    n: int = Field(4, ge=2, le=16)
    temperature: float = Field(0.8, ge=0, le=2)
    labelers_per_prompt: int = Field(1, ge=1, le=50)
    name: str | None = Field(None, max_length=200)

    _whole_numbers = field_validator("n", "labelers_per_prompt", mode="before")(whole_number)


class RankingRequest(StrictModel):
    ranking: list[int] = Field(min_length=2, max_length=16)
    ties: list[list[int]] | None = None
    reason: str | None = Field(None, max_length=10_000)
    labeler: str | None = Field(None, max_length=200)


class ChatRating(RatingFeedback):
    """A rating as ``POST /v1/feedback`` takes it, the labeler optional, the agent recorded."""

    labeler: str | None = Field(None, max_length=200)  # type: ignore[assignment]
    agent: str | None = Field(None, max_length=200)


class ChatRanking(RankingFeedback):
    """A ranking as ``POST /v1/feedback`` takes it, the labeler optional, the agent recorded."""

    labeler: str | None = Field(None, max_length=200)  # type: ignore[assignment]
    agent: str | None = Field(None, max_length=200)


class FeedbackChange(StrictModel):
    rating: Literal[1, -1] | None = None
    comment: str | None = Field(None, max_length=10_000)

    _not_a_boolean = field_validator("rating", mode="before")(not_a_boolean)
