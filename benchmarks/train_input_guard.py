"""Issue 14: train the learned input guard (agentkit/guard_model.py) and score it.

1. Training prompts: ours (``input_guard_prompts.jsonl``: clearly unsafe requests in XSTest's
   categories with their safe look-alikes, and everyday questions) and the tuning half of
   XSTest's dev prompts. No held-out prompt is among them, nor a paraphrase of one (checked:
   the normalised text, and a cosine of the embeddings above 0.85).
2. Features and ``C`` by 5-fold cross-validation with three fold seeds, scored by the unsafe
   recall at the threshold that blocks at most ``--max-false-positive-rate`` of the safe
   look-alikes (every safe training prompt but our everyday questions), out of fold.
3. The best setting refit on everything, its threshold from the out-of-fold probabilities
   (mean of the seeds), saved to ``prompts/input_guard.npz``.
4. Unless ``--no-held-out``: the saved guard's verdicts on every held-out prompt against the
   ``label`` column (confusion matrix, blocked by type). Figures in ``results/input_guard.json``.

The embeddings come from the configured backend (recorded with the weights; the shipped ones:
``onnx-fp32``, which ``AGENTKIT_EMBEDDING_BACKEND=onnx-fp32`` picks where ``auto`` would not).

    flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/train_input_guard.py
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, ROOT, SHARED, write_result

from agentkit.guard_model import (
    MODEL_FILE,
    PromptClassifier,
    PromptFeatures,
    embed_prompts,
    out_of_fold_probabilities,
    threshold_for,
    train_prompt_classifier,
)
from agentkit.refusal import held_out, read_csv
from agentkit.refusal_model import normalize
from agentkit.retrievers.embedding import Embedder
from agentkit.settings import get_settings

PROMPTS = SHARED / "data" / "xstest" / "xstest_dev.csv"
OURS = Path(__file__).with_name("input_guard_prompts.jsonl")
GRID = {"c": (0.3, 1.0, 3.0, 10.0), "max_ngram": (0, 2)}
FOLD_SEEDS = (0, 1, 2)
FOLDS = 5
NEAR_DUPLICATE = 0.85  # cosine of the embeddings: ours that close to a held-out prompt leak it


def key(prompt: str) -> str:
    return normalize(prompt).lower()


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(a random unsafe prompt scores above a random safe one)."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def rates(blocked: np.ndarray, unsafe: np.ndarray) -> dict[str, float]:
    return {"unsafe_recall": float(blocked[unsafe].mean()),
            "safe_false_positive_rate": float(blocked[~unsafe].mean())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=PROMPTS)
    parser.add_argument("--ours", type=Path, default=OURS)
    parser.add_argument("--out", type=Path, default=ROOT / "prompts" / MODEL_FILE)
    parser.add_argument("--max-false-positive-rate", type=float, default=0.05)
    parser.add_argument("--no-held-out", action="store_true", help="Train only.")
    parser.add_argument(
        "--held-out-only",
        action="store_true",
        help="Score the weights at --out on the held-out half; keep the results' CV figures.",
    )
    args = parser.parse_args()

    rows = read_csv(args.data)
    if args.held_out_only:
        report = json.loads((RESULTS / "input_guard.json").read_text())
        embedder = Embedder.from_settings(get_settings())
        report["held_out"] = score_held_out(args.out, embedder, rows)
        stamp = ("benchmark", "when", "machine", "cpus", "cpu")  # write_result adds them anew
        report = {k: v for k, v in report.items() if k not in stamp}
        print(f"wrote {write_result('input_guard', report)}")
        return
    ours = [json.loads(line) for line in args.ours.read_text().splitlines() if line.strip()]
    held = [r["prompt"] for r in rows if held_out(r["prompt"])]
    leaked = [r["prompt"] for r in ours if key(r["prompt"]) in set(map(key, held))]
    if leaked:
        raise SystemExit(f"{args.ours} holds held-out prompts, remove them: {leaked}")
    settings = get_settings()
    embedder = Embedder.from_settings(settings)
    near = embed_prompts([r["prompt"] for r in ours], embedder) @ embed_prompts(held, embedder).T
    leaked = [r["prompt"] for r, s in zip(ours, near.max(axis=1)) if s > NEAR_DUPLICATE]
    if leaked:
        raise SystemExit(f"{args.ours} paraphrases held-out prompts, remove them: {leaked}")
    tuning = [r for r in rows if not held_out(r["prompt"])]
    train = [{**r, "source": "ours"} for r in ours] + [
        {"prompt": r["prompt"], "label": r["label"], "type": r["type"], "source": "xstest"}
        for r in tuning
    ]
    prompts = [r["prompt"] for r in train]
    labels = [r["label"] for r in train]
    unsafe = np.array([label == "unsafe" for label in labels])
    lookalike = np.array([r["type"] != "general" for r in train]) & ~unsafe
    from_xstest = np.array([r["source"] == "xstest" for r in train])

    started = time.perf_counter()
    vectors = embed_prompts(prompts, embedder)
    embed_s = time.perf_counter() - started

    grid: list[dict[str, Any]] = []
    mean_oof: dict[tuple[float, int], np.ndarray] = {}
    for c, max_ngram in itertools.product(GRID["c"], GRID["max_ngram"]):
        features = PromptFeatures(max_ngram=max_ngram, embedding_model=embedder.name)
        per_seed = []
        oofs = []
        for seed in FOLD_SEEDS:
            oof = out_of_fold_probabilities(
                prompts, labels, embedder=embedder, c=c, features=features, vectors=vectors,
                k=FOLDS, seed=seed,
            )  # fmt: skip
            oofs.append(oof)
            threshold = threshold_for(oof[lookalike], args.max_false_positive_rate)
            blocked = oof > threshold
            per_seed.append({
                "threshold": threshold, "auc": auc(oof, unsafe), **rates(blocked, unsafe),
                "xstest_tuning": rates(blocked[from_xstest], unsafe[from_xstest]),
            })  # fmt: skip
        mean_oof[(c, max_ngram)] = np.mean(oofs, axis=0)
        entry = {
            "c": c,
            "max_ngram": max_ngram,
            "unsafe_recall": float(np.mean([s["unsafe_recall"] for s in per_seed])),
            "auc": float(np.mean([s["auc"] for s in per_seed])),
            "per_seed": per_seed,
        }
        grid.append(entry)
        print(f"C={c:<5} n-grams={max_ngram} recall {entry['unsafe_recall']:.3f} at ≤"
              f"{args.max_false_positive_rate:.0%} false positives, AUC {entry['auc']:.3f}",
              flush=True)  # fmt: skip
    best = max(grid, key=lambda g: (round(g["unsafe_recall"], 6), g["auc"], -g["c"]))
    oof = mean_oof[(best["c"], best["max_ngram"])]
    threshold = threshold_for(oof[lookalike], args.max_false_positive_rate)
    blocked = oof > threshold
    features = PromptFeatures(max_ngram=best["max_ngram"], embedding_model=embedder.name)
    model = train_prompt_classifier(
        prompts, labels, embedder=embedder, c=best["c"], features=features, threshold=threshold,
        categories=[r.get("category") for r in train], vectors=vectors,
    )  # fmt: skip
    model.save(args.out)
    report: dict[str, Any] = {
        "data": {"xstest": str(args.data), "ours": str(args.ours.relative_to(ROOT))},
        "train_n": {
            "ours": len(ours),
            "xstest_tuning": len(tuning),
            "safe": int((~unsafe).sum()),
            "unsafe": int(unsafe.sum()),
        },
        "features": dataclasses.asdict(features),
        "embedding_backend": model.trained_with,
        "embed_train_s": embed_s,
        "categories": list(model.categories),
        "cv": {
            "folds": FOLDS,
            "fold_seeds": list(FOLD_SEEDS),
            "max_false_positive_rate": args.max_false_positive_rate,
            "grid": grid,
            "best": {k: best[k] for k in ("c", "max_ngram", "unsafe_recall", "auc")},
            "threshold": threshold,
            "at_threshold": {
                **rates(blocked, unsafe),
                "lookalike_false_positive_rate": float(blocked[lookalike].mean()),
                "xstest_tuning": rates(blocked[from_xstest], unsafe[from_xstest]),
            },
        },
        "weights": str(args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out),
    }
    if not args.no_held_out:
        report["held_out"] = score_held_out(args.out, embedder, rows)
        matrix = report["held_out"]["confusion"]
        print(f"held-out: unsafe blocked {matrix['unsafe']['unsafe']}/"
              f"{report['held_out']['n']['unsafe']}, safe blocked {matrix['safe']['unsafe']}/"
              f"{report['held_out']['n']['safe']}", flush=True)  # fmt: skip
    print(f"wrote {write_result('input_guard', report)}")


def score_held_out(path: Path, embedder: Embedder, rows: list[dict[str, str]]) -> dict[str, Any]:
    """The saved guard's verdicts on every held-out prompt against the ``label`` column."""
    guard = PromptClassifier.load(path, embedder=embedder)
    held = [r for r in rows if held_out(r["prompt"])]
    started = time.perf_counter()
    probabilities = guard.unsafe_probability([r["prompt"] for r in held])
    seconds = time.perf_counter() - started
    unsafe = np.array([r["label"] == "unsafe" for r in held])
    blocked = probabilities > guard.threshold
    matrix = {gold: {verdict: 0 for verdict in ("safe", "unsafe")} for gold in ("safe", "unsafe")}
    for gold, verdict in zip(unsafe, blocked):
        matrix["unsafe" if gold else "safe"]["unsafe" if verdict else "safe"] += 1
    return {
        "n": {"safe": int((~unsafe).sum()), "unsafe": int(unsafe.sum())},
        "threshold": guard.threshold,
        "confusion": matrix,  # matrix[label][verdict]
        **rates(blocked, unsafe),
        "accuracy": float((blocked == unsafe).mean()),
        "auc": auc(probabilities, unsafe),
        "blocked_by_type": dict(Counter(r["type"] for r, b in zip(held, blocked) if b)),
        "n_by_type": dict(Counter(r["type"] for r in held)),
        "at_0_5": rates(probabilities > 0.5, unsafe),  # for reference only: not used to choose
        "seconds_per_prompt": seconds / len(held),
    }


if __name__ == "__main__":
    main()
