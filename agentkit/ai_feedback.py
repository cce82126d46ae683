"""AI feedback (RLAIF): the judge ranks sampled answers by the constitution.

For each prompt the agent samples n answers; the judge compares every pair twice, once in each
order (the answer it prefers in both orders wins; a pair it decides differently by position is a
tie, which is how position bias is handled), and the answers are ranked by wins (ties share a
place). The rankings go into the feedback store with labeler ``ai:<judge model>``, beside human
ones, so ``pairwise`` exports them the same way (``kind="ai"`` for these alone).

Per prompt, what went wrong is reported (the agent failed, fewer than two different answers,
every answer a refusal, the judge's answers did not parse) and that prompt is skipped. Nothing
is stored until every prompt is done, and then all rankings go in one transaction: a run that
fails half-way writes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agentkit.agents import AgentContext
from agentkit.constitution import Constitution, load_constitution
from agentkit.errors import AgentkitError
from agentkit.llm import ChatModel, Structured, Usage
from agentkit.prompts import load_messages
from agentkit.refusal import classify_refusal


@dataclass
class PromptOutcome:
    prompt: str
    status: str  # ranked, skipped, failed
    error: str | None = None
    ranking: list[str] = field(default_factory=list)
    ties: list[list[str]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    comparisons: int = 0
    consistent: int = 0  # pairs the judge decided alike in both orders
    unparsed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PreferenceJudge:
    """Pairwise preference by the constitution: one constrained ``A``/``B`` per comparison."""

    def __init__(self, model: ChatModel, constitution: Constitution | None = None) -> None:
        self.model = model
        self.constitution = constitution or load_constitution()
        self.usage = Usage()

    def prefers_first(self, question: str, first: str, second: str) -> bool | None:
        """True when ``first`` is better, False when ``second`` is, None when unparsable."""
        done = self.model.complete(
            load_messages(
                "preference_judge",
                principles=self.constitution.summary(),
                question=question,
                first=first,
                second=second,
            ),
            max_tokens=2,
            temperature=0.0,
            structured=Structured(choice=["A", "B"]),
        )
        self.usage += done.usage
        answer = done.text.strip().upper()[:1]
        return {"A": True, "B": False}.get(answer)


def rank_answers(judge: PreferenceJudge, prompt: str, answers: Sequence[str]) -> PromptOutcome:
    """Every pair judged in both orders; wins (a tie counts a half each) rank the answers."""
    wins = [0.0] * len(answers)
    outcome = PromptOutcome(prompt, "ranked")
    for i, j in itertools.combinations(range(len(answers)), 2):
        forward = judge.prefers_first(prompt, answers[i], answers[j])
        backward = judge.prefers_first(prompt, answers[j], answers[i])
        outcome.comparisons += 2
        outcome.unparsed += (forward is None) + (backward is None)
        if forward is not None and backward is not None and forward != backward:
            wins[i if forward else j] += 1  # the same answer won in both orders
            outcome.consistent += 1
        else:  # decided by position (or undecided): a tie
            wins[i] += 0.5
            wins[j] += 0.5
    if outcome.unparsed * 2 > outcome.comparisons:
        outcome.status = "failed"
        outcome.error = (
            f"{outcome.unparsed} of {outcome.comparisons} judge answers did not parse; "
            "serve the judge with structured outputs (vLLM ≥ 0.10.2)"
        )
        return outcome
    order = sorted(range(len(answers)), key=lambda k: -wins[k])
    outcome.ranking = [answers[k] for k in order]
    outcome.scores = [wins[k] for k in order]
    for _, group in itertools.groupby(order, key=lambda k: wins[k]):
        members = [answers[k] for k in group]
        if len(members) > 1:
            outcome.ties.append(members)
    if len(outcome.ties) == 1 and len(outcome.ties[0]) == len(answers):
        outcome.status = "skipped"
        outcome.error = "the judge preferred no answer over another (all tied)"
    return outcome


def judge_name(model: ChatModel) -> str:
    name = getattr(model, "model", None)
    return name if isinstance(name, str) and name else type(model).__name__


def ai_label(
    context: AgentContext,
    prompts: Sequence[str],
    *,
    agent: str = "agentkit-rag",
    n: int = 4,
    temperature: float = 0.8,
    judge: ChatModel | None = None,
    constitution: Constitution | None = None,
    store: Any = None,
    owner: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Sample, judge and (with ``store``, a FeedbackStore) store AI rankings of ``prompts``.
    Returns the report: counts, the judge's position consistency, and each prompt's outcome."""
    from agentkit.services.labeling import sample_completions

    if n < 2:
        raise AgentkitError("ai-label needs n ≥ 2 answers per prompt to rank")
    model = judge or context.model
    preference = PreferenceJudge(model, constitution or load_constitution())
    labeler = f"ai:{judge_name(model)}"
    outcomes: list[PromptOutcome] = []
    for done, prompt in enumerate(prompts, 1):
        try:
            answers = sample_completions(context, agent, prompt, n, temperature)
        except Exception as error:  # the prompt fails, the run goes on
            outcomes.append(PromptOutcome(prompt, "failed", f"{type(error).__name__}: {error}"))
        else:
            outcomes.append(check_and_rank(preference, prompt, answers))
        if progress:
            progress(done, len(prompts))
    ranked = [o for o in outcomes if o.status == "ranked"]
    if store is not None and ranked:  # only now, and all in one transaction
        store.add_rankings(
            [
                {
                    "prompt": o.prompt,
                    "ranking": o.ranking,
                    "ties": o.ties,
                    "labeler": labeler,
                    "comment": f"agentkit ai-label: {agent}, n={n}, pairwise in both orders",
                    "owner": owner,
                }
                for o in ranked
            ]
        )
    pairs = sum(o.comparisons // 2 for o in outcomes)
    consistent = sum(o.consistent for o in outcomes)
    return {
        "labeler": labeler,
        "agent": agent,
        "n": n,
        "prompts": len(prompts),
        "ranked": len(ranked),
        "skipped": sum(o.status == "skipped" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
        "stored": len(ranked) if store is not None else 0,
        "position_consistency": consistent / pairs if pairs else None,
        "judge_usage": {
            "prompt_tokens": preference.usage.prompt_tokens,
            "completion_tokens": preference.usage.completion_tokens,
        },  # fmt: skip
        "outcomes": [o.to_dict() for o in outcomes],
    }


def check_and_rank(judge: PreferenceJudge, prompt: str, answers: list[str]) -> PromptOutcome:
    if len(answers) < 2:
        return PromptOutcome(prompt, "skipped", "the agent gave fewer than two different answers")
    if all(classify_refusal(a).label == "full_refusal" for a in answers):
        return PromptOutcome(prompt, "skipped", "every answer is a refusal: nothing to prefer")
    try:
        return rank_answers(judge, prompt, answers)
    except AgentkitError as error:
        return PromptOutcome(prompt, "failed", str(error))
