"""Guardrails around any agent: input moderation → agent (best-of-n) → output moderation →
critique and revision. The runner (``agentkit.agents``) calls ``guarded_run``/``guarded_stream``
when ``AgentContext.guardrails`` is set, so the CLI, the API and the SDK get the same behaviour:

    guardrails = Guardrails([GuardRule(JudgeGuard(model), stage="both", policy="block")])
    context = AgentContext(model, settings, guardrails=guardrails)
    result = run_agent("agentkit-rag", context, AgentRequest.ask("..."))
    result.data["guardrails"]   # action, verdicts, and critique + original when revised

Policies, per rule: ``block`` answers with a short, polite refusal that says why in general
terms; ``flag`` answers and marks the result (``action: "flagged"``); ``revise`` critiques the
answer against the constitution and rewrites it. A guard that fails gives a fail-open (safe) or
fail-closed (unsafe) verdict by the rule's ``on_error``; either way the verdict carries the error.

Streaming: with only input guards the agent streams as usual after the input check. When the
answer is checked (output guards, revision, best-of-n) nothing of it can be shown before the
check, so the stream holds the agent's events and sends the final answer in one piece after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from agentkit.critique import Critic
from agentkit.guards import Guard, Stage, Verdict
from agentkit.llm import Message, Usage
from agentkit.prompts import load_prompt, render
from agentkit.rewards import Reward, best_index
from agentkit.tracing import guard_span

if TYPE_CHECKING:
    from agentkit.agents import AgentContext, AgentEvent, AgentRequest, AgentResult, AgentSpec
    from agentkit.settings import Settings

Policy = Literal["block", "flag", "revise"]
BEST_OF_TEMPERATURE = 0.8  # when the request gives none: n samples at 0 would be one answer
REASONS = {
    "input": "the request looks like it asks for help with {category}.",
    "output": "the answer could have included content about {category}.",
    "error": "the safety check could not be run right now.",
}


@dataclass
class GuardRule:
    """A guard, where it checks, what an unsafe verdict does, and what a failed check means."""

    guard: Guard
    stage: Literal["input", "output", "both"] = "both"
    policy: Policy = "block"
    on_error: Literal["open", "closed"] = "closed"

    def applies(self, stage: Stage) -> bool:
        return self.stage in (stage, "both")


@dataclass
class Guardrails:
    rules: list[GuardRule] = field(default_factory=list)
    critic: Critic | None = None  # used by policy revise, and for every answer with revise_all
    revise_all: bool = False
    best_of: int = 1
    reward: Reward | None = None

    def checks_output(self) -> bool:
        return (
            self.revise_all
            or self.best_of > 1
            or any(r.applies("output") or r.policy == "revise" for r in self.rules)
        )

    def revises(self) -> bool:
        """Some rule may ask for a revision."""
        return any(r.policy == "revise" for r in self.rules)

    def with_options(self, *, best_of: int | None = None, revise: bool | None = None) -> Guardrails:
        """A copy with per-request options (the API's ``agentkit`` body, the CLI's flags)."""
        return replace(
            self,
            best_of=self.best_of if best_of is None else best_of,
            revise_all=self.revise_all if revise is None else revise,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, model: Any, *, best_of: int = 1
    ) -> Guardrails | None:
        """What ``AGENTKIT_GUARD*``, ``AGENTKIT_REVISE`` and ``AGENTKIT_REWARD_*`` ask for (and
        ``best_of``); None when they ask for nothing (the runner then adds no work at all)."""
        from agentkit.constitution import load_constitution
        from agentkit.rewards import RewardModel

        rules = guard_rules(settings, model)
        reward = None
        if settings.reward_url:
            reward = RewardModel(settings.reward_url, settings.reward_model or "",
                                 api_key=settings.llm_api_key)  # fmt: skip
        if not rules and not settings.revise and best_of <= 1 and reward is None:
            return None
        critic = Critic(model, load_constitution(settings.constitution))
        return cls(rules, critic, settings.revise, best_of, reward)


def guard_rules(settings: Settings, model: Any) -> list[GuardRule]:
    """The rules ``AGENTKIT_GUARD*`` ask for: one guard, or for a layered kind
    (``learned+judge``, ``learned+llama-guard``) the learned guard on the message first (no
    model call for what it blocks), then the other guard where ``AGENTKIT_GUARD`` says."""
    if settings.guard == "none":
        return []
    kinds = settings.guard_kind.split("+")
    rules = []
    for kind in kinds:
        stage = "input" if kind == "learned" and len(kinds) > 1 else settings.guard
        guard = make_guard(kind, stage, settings, model)
        rules.append(GuardRule(guard, stage, settings.guard_policy, settings.guard_on_error))
    return rules


def make_guard(kind: str, stage: str, settings: Settings, model: Any) -> Guard:
    """The guard ``kind`` names (auto: Llama Guard at ``AGENTKIT_GUARD_URL`` when set, else the
    served model as judge) for ``stage``. ConfigError for a combination that cannot work."""
    from agentkit.errors import ConfigError
    from agentkit.guards import JudgeGuard, LlamaGuard

    if kind == "auto":
        kind = "llama-guard" if settings.guard_url else "judge"
    if kind == "learned":
        if stage != "input":
            raise ConfigError(
                f"the learned guard reads the user's message only, so it cannot guard "
                f"'{stage}'; set AGENTKIT_GUARD=input (or --guard input), or layer it with "
                "AGENTKIT_GUARD_KIND=learned+judge"
            )
        from agentkit.guard_model import LearnedGuard

        return LearnedGuard.from_settings(settings)
    if kind == "llama-guard":
        if not settings.guard_url:
            raise ConfigError("AGENTKIT_GUARD_KIND=llama-guard needs AGENTKIT_GUARD_URL, the "
                              "server that serves the guard model")  # fmt: skip
        return LlamaGuard(settings.guard_url, settings.guard_model, api_key=settings.llm_api_key)
    return JudgeGuard(model)


@dataclass
class GuardReport:
    """What the guardrails did to one request, sent as ``agentkit.guardrails``."""

    action: Literal["passed", "flagged", "blocked", "revised"] = "passed"
    verdicts: list[Verdict] = field(default_factory=list)
    revision: dict[str, Any] | None = None  # critique, original
    best_of: dict[str, Any] | None = None
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "action": self.action,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "latency_s": round(self.latency_s, 4),
        }
        if self.revision is not None:
            data.update(self.revision)
        if self.best_of is not None:
            data["best_of"] = self.best_of
        return data


def check_stage(
    rules: Sequence[GuardRule], messages: Sequence[Message], stage: Stage, report: GuardReport
) -> list[tuple[GuardRule, Verdict]]:
    """Run the stage's rules in order until one blocks; the unsafe verdicts with their rules
    (failed guards give their rule's fail-open/closed verdict)."""
    unsafe = []
    for rule in rules:
        if not rule.applies(stage):
            continue
        started = time.perf_counter()
        name = getattr(rule.guard, "name", type(rule.guard).__name__)
        with guard_span(name, stage=stage, policy=rule.policy) as traced:
            try:
                verdict = rule.guard.check(messages, stage)
            except Exception as error:  # a guard is a plug-in: any failure is rule.on_error
                verdict = Verdict(
                    rule.on_error == "open",
                    None if rule.on_error == "open" else "guard unavailable",
                    name,
                    stage,
                    f"{type(error).__name__}: {error}",
                    time.perf_counter() - started,
                )
            traced.set("agentkit.guard.verdict", "safe" if verdict.safe else "unsafe")
            traced.set("agentkit.guard.category", verdict.category)
            traced.set("agentkit.guard.error", verdict.error)
        verdict.stage = stage
        report.verdicts.append(verdict)
        report.usage += verdict.usage
        if not verdict.safe:
            unsafe.append((rule, verdict))
            if rule.policy == "block":  # the answer is decided: later guards would cost only
                break
    return unsafe


def refusal_text(verdict: Verdict) -> str:
    """The polite refusal for a blocked request or answer: why, in general terms."""
    if verdict.error is not None:
        reason = REASONS["error"]
    else:
        category = verdict.category or "something harmful"
        reason = REASONS[verdict.stage].format(category=category)
    return render(load_prompt("guard_refusal").strip(), reason=reason)


def guarded_run(spec: AgentSpec, context: AgentContext, request: AgentRequest) -> AgentResult:
    """The agent's run inside the context's guardrails."""
    from agentkit.agents import AgentResult

    rails: Guardrails = context.guardrails
    started = time.perf_counter()
    report = GuardReport()
    flagged, block = check_input(rails, request, report)
    if block is not None:
        return finish(AgentResult([refusal_text(block)]), report, started)
    result = sample(spec, context, request, rails, report)
    must_revise = any(r.policy == "revise" for r, _ in flagged)
    if rails.critic is None and (must_revise or rails.revise_all or rails.revises()):
        rails.critic = Critic(context.model)  # the default constitution, made once
    texts = [
        check_answer(rails, request, text, report, must_revise, bool(flagged))
        for text in result.texts
    ]
    if report.action == "blocked":
        result = AgentResult(texts, {}, result.usage, None)
    else:
        result = AgentResult(texts, result.data, result.usage, result.detail)
    return finish(result, report, started)


def check_input(
    rails: Guardrails, request: AgentRequest, report: GuardReport
) -> tuple[list[tuple[GuardRule, Verdict]], Verdict | None]:
    """The input rules that flagged the request, and the verdict of the first that blocks it
    (the report then says ``blocked``), if one does."""
    flagged = check_stage(rails.rules, request.messages, "input", report)
    block = next((v for r, v in flagged if r.policy == "block"), None)
    if block is not None:
        report.action = "blocked"
    return flagged, block


def whole(result: AgentResult) -> Iterator[AgentEvent]:
    """A finished result as a stream's events: its data, then its text and usage."""
    from agentkit.agents import AgentEvent

    yield AgentEvent(data=result.data)
    yield AgentEvent(text=result.text, usage=result.usage)


def check_answer(
    rails: Guardrails,
    request: AgentRequest,
    text: str,
    report: GuardReport,
    must_revise: bool,
    flagged: bool,
) -> str:
    """One answer after the output guards and the critique; updates ``report.action``."""
    answer = [*request.messages, {"role": "assistant", "content": text}]
    unsafe = check_stage(rails.rules, answer, "output", report)
    block = next((v for r, v in unsafe if r.policy == "block"), None)
    if block is not None:
        report.action = "blocked"
        return refusal_text(block)
    must_revise = must_revise or any(r.policy == "revise" for r, _ in unsafe)
    if (must_revise or rails.revise_all) and rails.critic is not None:
        with guard_span("critique", forced=must_revise) as traced:
            revision = rails.critic.revise(request.question, text, force=must_revise)
            traced.set("agentkit.guard.verdict", "revised" if revision.revised else "kept")
        report.usage += revision.usage
        if revision.revised:
            report.action = "revised"
            report.revision = revision.to_dict()
            return revision.final
        report.revision = revision.to_dict()
    if (flagged or unsafe) and report.action == "passed":
        report.action = "flagged"
    return text


def sample(
    spec: AgentSpec,
    context: AgentContext,
    request: AgentRequest,
    rails: Guardrails,
    report: GuardReport,
) -> AgentResult:
    """The agent's answer; with best-of-n, the best of n by the reward (the served model samples
    the n in one request, other agents run n times)."""
    from agentkit.agents import PASS_THROUGH, AgentResult

    n = rails.best_of
    if n <= 1:
        return spec.run(context, request)
    if rails.reward is None:
        from agentkit.rewards import JudgeReward

        rails.reward = JudgeReward(
            context.model, rails.critic.constitution if rails.critic else None
        )
    temperature = BEST_OF_TEMPERATURE if request.temperature is None else request.temperature
    sampled = replace(request, temperature=temperature)
    if spec is PASS_THROUGH:
        whole = spec.run(context, replace(sampled, n=n))
        results = [AgentResult([t], whole.data, Usage(), whole.detail) for t in whole.texts]
        usage = whole.usage
    else:
        results = [spec.run(context, sampled) for _ in range(n)]
        usage = sum((r.usage for r in results), Usage())
    scores = rails.reward.score(request.question, [r.text for r in results])
    report.usage += scores.usage
    chosen = best_index(scores.values)
    report.best_of = {"n": n, "scores": scores.values, "chosen": chosen,
                      "reward": rails.reward.name, "unscored": scores.unscored}  # fmt: skip
    best = results[chosen]
    return AgentResult([best.text], best.data, usage, best.detail)


def finish(result: AgentResult, report: GuardReport, started: float) -> AgentResult:
    report.latency_s = time.perf_counter() - started
    result.data = {**result.data, "guardrails": report.to_dict()}
    result.usage = result.usage + report.usage
    return result


def guarded_stream(
    spec: AgentSpec, context: AgentContext, request: AgentRequest
) -> Iterator[AgentEvent]:
    """The agent's events inside the guardrails: streamed after the input check when only the
    input is checked; held and sent after the check when the answer is checked."""
    from agentkit.agents import AgentEvent, AgentResult, stream_spec

    rails: Guardrails = context.guardrails
    if rails.checks_output():
        yield from whole(guarded_run(spec, context, request))
        return
    started = time.perf_counter()
    report = GuardReport()
    flagged, block = check_input(rails, request, report)
    if block is not None:
        yield from whole(finish(AgentResult([refusal_text(block)]), report, started))
        return
    if flagged:
        report.action = "flagged"
    report.latency_s = time.perf_counter() - started
    yield AgentEvent(data={"guardrails": report.to_dict()}, usage=report.usage)
    yield from stream_spec(spec, context, request)
