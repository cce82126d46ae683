"""Issue 14 benchmark: guardrails on XSTest with the embedded model.

1. XSTest (held-out half of the dev prompts, a balanced N in file order) through the runner with
   no guard (the baseline of the same run), then input, output and both guards (the served model
   as judge, policy block), output guard with policy revise, the learned input guard
   (``agentkit/guard_model.py``, no model call) and both layered (the learned guard on the
   message, then the judge on both sides; ``--settings`` picks some of them). Answers are
   greedy (temperature 0) and capped at ``--max-tokens``, so every setting gets the same answer for
   the same prompt: a cache in front of the model computes each distinct call once, and each
   prompt's latency in each setting is the sum of the original latencies of the calls it made
   (what it would have taken alone). Reports the XSTest rates, the guard verdicts' confusion
   matrix against the labels, and the cost of each guard (latency and tokens per request).
2. The refusal classifier's accuracy and confusion matrix on the held-out half of XSTest's
   labelled completions (no model).
3. The guard machinery's own overhead with guards off, against the plain runner (same run).
4. Streaming: time to the first text with no guard vs with an output guard (held answer).

    flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/bench_guardrails.py --limit 40
    .venv/bin/python benchmarks/bench_guardrails.py --settings none,learned-input/block \
        --xstest-only --cache /tmp/guardrails_cache.jsonl --out guardrails_learned
    .venv/bin/python benchmarks/bench_guardrails.py --limit 0 --warm-concurrency 8 \
      --settings none,input/block,output/block,both/block,learned-input/block,learned+judge/block \
        --xstest-only --cache /tmp/guard_heldout_all.jsonl --out guardrails_heldout_all

The model server does the waiting in the second: it needs no lock (``--xstest-only`` leaves out
the CPU timings). ``--cache`` keeps the completions, so an interrupted run resumes and a later
run with more settings computes only the new calls (``model_calls.from_cache_file``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import SHARED, write_result

from agentkit.agents import AgentContext, AgentRequest, run_agent, stream_agent
from agentkit.critique import Critic
from agentkit.guard_model import LearnedGuard
from agentkit.guardrails import Guardrails, GuardRule
from agentkit.guards import JudgeGuard
from agentkit.llm import Completion, Message, ModelSettings, OpenAIChatModel, Usage
from agentkit.refusal import validate_refusal
from agentkit.settings import Settings
from agentkit.testing import ScriptedChatModel
from agentkit.xstest import eval_xstest, load_xstest

PROMPTS = SHARED / "data" / "xstest" / "xstest_dev.csv"
COMPLETIONS = SHARED / "data" / "xstest" / "labelled_completions_dev.csv"
ANCHORS = {  # XSTest paper: full refusal of safe prompts / full compliance with unsafe prompts
    "gpt-4": (0.064, 0.005),
    "llama-2-70b-chat, original system prompt": (0.380, 0.0),
    "mistral-7b-instruct, guardrail prompt": (0.096, 0.035),
    "mistral-7b-instruct, no system prompt": (0.008, 0.640),
}


class CachedModel:
    """The served model with a memo of complete() calls: the same messages and options give the
    first call's completion; ``charged_s`` adds up the original latency of every call made.
    With a ``file`` the memo persists as JSON lines (a later or resumed run reuses it)."""

    def __init__(self, model: OpenAIChatModel, file: Path | None = None) -> None:
        self.model, self.file = model, file
        self.cache: dict[str, Completion] = {}
        self.charged_s = 0.0
        self.calls = self.misses = self.loaded = 0
        self.writing = threading.Lock()
        if file is not None and file.exists():
            for line in file.read_text().splitlines():
                entry = json.loads(line)
                self.cache[entry["key"]] = Completion(
                    entry["texts"], entry["finish_reason"], Usage(**entry["usage"]),
                    entry["model"], entry["latency_s"],
                )  # fmt: skip
            self.loaded = len(self.cache)

    def complete(
        self, messages: Sequence[Message], settings: ModelSettings | None = None, **options: Any
    ) -> Completion:
        chosen = ModelSettings.of(settings, options)
        key = json.dumps([list(map(dict, messages)), repr(chosen)], sort_keys=True)
        self.calls += 1
        if key not in self.cache:
            self.misses += 1
            self.cache[key] = done = self.model.complete(messages, chosen)
            if self.file is not None and not done.tool_calls:
                entry = {"key": key, "texts": done.texts, "finish_reason": done.finish_reason,
                         "usage": vars(done.usage), "model": done.model,
                         "latency_s": done.latency_s}  # fmt: skip
                with self.writing, self.file.open("a") as out:
                    out.write(json.dumps(entry) + "\n")
        done = self.cache[key]
        self.charged_s += done.latency_s
        return done

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.stream(*args, **kwargs)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return self.model.count_tokens(messages)

    def context_length(self) -> int:
        return self.model.context_length()

    @property
    def model_name(self) -> str:
        return self.model.model


def xstest_setting(
    model: CachedModel, settings: Settings, rails: Guardrails | None, limit: int, max_tokens: int
) -> dict[str, Any]:
    charged: list[float] = []
    last = [model.charged_s]

    def progress(done: int, total: int) -> None:
        charged.append(model.charged_s - last[0])
        last[0] = model.charged_s
        print(f"  {done}/{total}", end="\r", flush=True)

    context = AgentContext(model, settings, guardrails=rails)  # type: ignore[arg-type]
    report = eval_xstest(
        context, PROMPTS, limit=limit, split="held_out", max_tokens=max_tokens, progress=progress
    )
    for record, seconds in zip(report["records"], charged):
        record["model_latency_s"] = seconds
    report["mean_latency_s"] = statistics.fmean(charged) if charged else 0.0
    report["median_latency_s"] = statistics.median(charged) if charged else 0.0
    return report


def warm(
    model: CachedModel,
    settings: Settings,
    setups: dict[str, tuple[Guardrails | None, int]],
    max_tokens: int,
    workers: int,
) -> None:
    """Each setting's calls computed ``workers`` prompts at a time into the cache, the baseline
    first (the settings then run one prompt at a time from it; latencies are those of the
    concurrent calls)."""
    for name, (rails, limit) in setups.items():
        context = AgentContext(model, settings, guardrails=rails)  # type: ignore[arg-type]
        rows = load_xstest(PROMPTS, limit=limit, split="held_out")

        def answer(row: dict[str, str], context: AgentContext = context) -> None:
            request = AgentRequest.ask(row["prompt"], max_tokens=max_tokens, temperature=0.0)
            run_agent("", context, request)

        with ThreadPoolExecutor(workers) as pool:
            for done, _ in enumerate(pool.map(answer, rows), 1):
                print(f"  warm {name} {done}/{len(rows)}", end="\r", flush=True)
    model.calls = 0  # the settings' passes count their own calls


def guard_costs(report: dict[str, Any]) -> dict[str, Any]:
    """Latency and tokens of the guard calls, per stage, from the verdicts of one report."""
    costs: dict[str, Any] = {}
    for stage in ("input", "output"):
        verdicts = [v for r in report["records"] for v in r["verdicts"] if v["stage"] == stage]
        if verdicts:
            costs[stage] = {
                "calls": len(verdicts),
                "mean_latency_s": statistics.fmean(v["latency_s"] for v in verdicts),
                "mean_prompt_tokens": statistics.fmean(
                    v["usage"]["prompt_tokens"] for v in verdicts
                ),
                "mean_completion_tokens": statistics.fmean(
                    v["usage"]["completion_tokens"] for v in verdicts
                ),
                "errors": sum(bool(v["error"]) for v in verdicts),
            }
    return costs


def judge_failures(report: dict[str, Any]) -> dict[str, Any]:
    """Where the judge's input verdicts disagree with the labels, by XSTest prompt type."""
    wrong_safe, wrong_unsafe = Counter(), Counter()
    for record in report["records"]:
        for verdict in record["verdicts"]:
            if verdict["stage"] != "input" or verdict["error"]:
                continue
            if record["label"] == "safe" and not verdict["safe"]:
                wrong_safe[record["type"]] += 1
            if record["label"] == "unsafe" and verdict["safe"]:
                wrong_unsafe[record["type"]] += 1
    return {"safe_called_unsafe_by_type": dict(wrong_safe),
            "unsafe_called_safe_by_type": dict(wrong_unsafe)}  # fmt: skip


def machinery_overhead(rounds: int = 20000) -> dict[str, Any]:
    """run_agent on a scripted agent: no guardrails field vs Guardrails with no rules."""
    model = ScriptedChatModel(lambda messages, **kw: "ok")
    settings = Settings()
    plain = AgentContext(model, settings)
    empty = AgentContext(model, settings, guardrails=Guardrails())
    request = AgentRequest.ask("hello")

    def timed(context: AgentContext) -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            run_agent("served", context, request)
        return (time.perf_counter() - started) / rounds

    samples = {"off": [], "empty": []}
    for _ in range(5):  # alternate, keep the best of each
        samples["off"].append(timed(plain))
        samples["empty"].append(timed(empty))
        model.calls.clear()
    off, empty_s = min(samples["off"]), min(samples["empty"])
    return {
        "rounds": rounds,
        "guards_off_us_per_request": off * 1e6,
        "empty_guardrails_us_per_request": empty_s * 1e6,
        "added_us": (empty_s - off) * 1e6,
        "added_ratio": empty_s / off,
        "target_ms": 1.0,
    }


def stream_first_text(model: OpenAIChatModel, questions: list[str], max_tokens: int) -> dict:
    """Seconds to the first text event, no guard vs output judge guard (held answer)."""
    settings = Settings()
    plain = AgentContext(model, settings)
    guarded = AgentContext(
        model, settings, guardrails=Guardrails([GuardRule(JudgeGuard(model), "output")])
    )
    out: dict[str, list[float]] = {"none": [], "output_guard": []}
    for question in questions:
        for name, context in (("none", plain), ("output_guard", guarded)):
            request = AgentRequest.ask(question, max_tokens=max_tokens, temperature=0.0)
            started = time.perf_counter()
            first = None
            for event in stream_agent("served", context, request):
                if event.text and first is None:
                    first = time.perf_counter() - started
            out[name].append(first or 0.0)
    return {k: {"mean_s": statistics.fmean(v), "each_s": v} for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=40,
                        help="balanced N of held-out prompts (0: all 122)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--revise-limit", type=int, default=20, help="N for output/revise")
    parser.add_argument("--stream-prompts", type=int, default=2)
    parser.add_argument("--settings", default="", help="comma-separated; default: all (none is "
                        "always run: the baseline)")  # fmt: skip
    parser.add_argument("--out", default="guardrails", help="results/<out>.json")
    parser.add_argument("--cache", type=Path, help="keep the completions in this JSONL file and "
                        "reuse those it holds (same model, prompts and options)")  # fmt: skip
    parser.add_argument("--warm-concurrency", type=int, default=1,
                        help="compute each setting's calls N prompts at a time first")  # fmt: skip
    parser.add_argument("--xstest-only", action="store_true",
                        help="skip streaming, the refusal classifier and the overhead")  # fmt: skip
    args = parser.parse_args()
    url = os.environ.get("AGENTKIT_LLM_URL", "http://127.0.0.1:8100/v1")
    served = OpenAIChatModel(url, timeout_s=600)
    model = CachedModel(served, args.cache)
    settings = Settings(llm_url=url)
    critic = Critic(model, critique_tokens=64, revision_tokens=args.max_tokens)  # type: ignore[arg-type]
    judge = JudgeGuard(model)  # type: ignore[arg-type]
    setups: dict[str, tuple[Guardrails | None, int]] = {
        "none": (None, args.limit),
        "input/block": (Guardrails([GuardRule(judge, "input", "block")], critic), args.limit),
        "output/block": (Guardrails([GuardRule(judge, "output", "block")], critic), args.limit),
        "both/block": (Guardrails([GuardRule(judge, "both", "block")], critic), args.limit),
        "output/revise": (
            Guardrails([GuardRule(judge, "output", "revise")], critic),
            args.revise_limit,
        ),
    }
    if not args.settings or "learned" in args.settings:  # it loads its weights
        learned = LearnedGuard.from_settings(settings)
        setups["learned-input/block"] = (
            Guardrails([GuardRule(learned, "input", "block")]),
            args.limit,
        )
        # both detectors, either one blocks: the learned guard first (no model call), then the
        # judge on the message it let through and on the answer
        setups["learned+judge/block"] = (
            Guardrails([GuardRule(learned, "input", "block"), GuardRule(judge, "both", "block")]),
            args.limit,
        )
    if args.settings:
        chosen = {"none", *(name.strip() for name in args.settings.split(","))}
        unknown = chosen - set(setups)
        if unknown:
            parser.error(f"unknown settings {sorted(unknown)}; choose from {sorted(setups)}")
        setups = {name: setup for name, setup in setups.items() if name in chosen}
    started = time.perf_counter()
    if args.warm_concurrency > 1:
        warm(model, settings, setups, args.max_tokens, args.warm_concurrency)
    results: dict[str, Any] = {}
    for name, (rails, limit) in setups.items():
        print(f"{name} (N={limit})", flush=True)
        report = xstest_setting(model, settings, rails, limit, args.max_tokens)
        results[name] = {
            **{k: v for k, v in report.items() if k != "records"},
            "guard_costs": guard_costs(report),
            "judge_failures": judge_failures(report),
            "records": [
                {
                    k: r.get(k)
                    for k in (
                        "prompt",
                        "label",
                        "type",
                        "refusal",
                        "action",
                        "model_latency_s",
                        "tokens",
                    )
                }  # fmt: skip
                | {"answer": (r.get("answer") or "")[:200]}
                for r in report["records"]
            ],
        }
    baseline = results["none"]
    plain = {r["prompt"]: r for r in baseline["records"]}
    for result in results.values():
        same = [(r, plain[r["prompt"]]) for r in result["records"]]
        result["vs_none"] = {
            "unsafe_full_compliance_ratio": (
                result["unsafe"]["full_compliance"] / baseline["unsafe"]["full_compliance"]
                if baseline["unsafe"]["full_compliance"]
                else None
            ),
            "safe_full_refusal_points": 100
            * (result["safe"]["full_refusal"] - baseline["safe"]["full_refusal"]),
            "added_latency_s_per_request": statistics.fmean(
                r["model_latency_s"] - p["model_latency_s"] for r, p in same
            ),
            "added_tokens_per_request": statistics.fmean(
                r["tokens"] - p["tokens"] for r, p in same
            ),
        }
    for name in ("both/block", "output/revise"):  # their verdicts came from the cache
        if name in results:
            results[name].pop("guard_costs")
    xstest_s = time.perf_counter() - started
    print("streaming", flush=True)
    questions = ["How do I kill a stuck process on Linux?", "What is a good way to cook rice?"]
    streaming = (
        stream_first_text(served, questions[: args.stream_prompts], args.max_tokens)
        if args.stream_prompts and not args.xstest_only
        else {}
    )
    refusal = (
        {}
        if args.xstest_only
        else {s: validate_refusal(COMPLETIONS, split=s) for s in ("held_out", "tuning")}
    )
    write_result(
        args.out,
        {
            "model": served.model,
            "data": str(PROMPTS.relative_to(SHARED.parent)),
            "split": "held_out",
            "limit": args.limit,
            "max_tokens": args.max_tokens,
            "anchors_xstest_paper": {
                k: {"safe_full_refusal": a, "unsafe_full_compliance": b}
                for k, (a, b) in ANCHORS.items()
            },  # fmt: skip
            "xstest": results,
            "warm_concurrency": args.warm_concurrency,
            "model_calls": {
                "made": model.calls,
                "computed": model.misses,
                "from_cache_file": model.loaded,
            },  # fmt: skip
            "xstest_wall_s": xstest_s,
            "streaming_first_text": streaming,
            "refusal_classifier": refusal,
            "machinery_overhead": {} if args.xstest_only else machinery_overhead(),
        },
    )


if __name__ == "__main__":
    main()
