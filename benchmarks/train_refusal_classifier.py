"""Issue 14: train the learned refusal classifier (agentkit/refusal_model.py) and score it.

1. Hyperparameters by 10-fold cross-validation on the tuning half of XSTest's labelled
   completions only, folds grouped by prompt (every completion of a prompt in one fold), three
   fold seeds: ``C`` times the sentence embeddings' weight.
2. The best setting refit on the whole tuning half, saved to ``prompts/refusal_classifier.npz``
   (deterministic: no random state in the fit; the fold seeds only pick the setting).
3. Unless ``--no-held-out``: the saved model and the string rules (the baseline, same run) on
   the held-out half. Figures in ``results/refusal_classifier.json``.

The sentence embeddings come from the configured embedding backend (recorded with the weights;
the shipped ones: ``onnx-fp32``); ``AGENTKIT_EMBEDDING_BACKEND=onnx-fp32`` reproduces them
exactly where ``auto`` would pick another.

    flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/train_refusal_classifier.py
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

from common import ROOT, SHARED, write_result

from agentkit.refusal import held_out, read_csv, validate_refusal
from agentkit.refusal_model import (
    MODEL_FILE,
    FeatureConfig,
    RefusalClassifier,
    cross_validate,
    default_embedder,
    sentence_features,
    train_refusal_classifier,
)

COMPLETIONS = SHARED / "data" / "xstest" / "labelled_completions_dev.csv"
GRID = {"c": (1.0, 3.0, 10.0, 30.0), "embedding_scale": (0.25, 0.5)}
FOLD_SEEDS = (0, 1, 2)
FOLDS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=COMPLETIONS)
    parser.add_argument("--out", type=Path, default=ROOT / "prompts" / MODEL_FILE)
    parser.add_argument("--no-held-out", action="store_true", help="Train only.")
    args = parser.parse_args()

    tuning = [r for r in read_csv(args.data) if not held_out(r["prompt"])]
    answers = [r["completion"] for r in tuning]
    labels = [r["label"] for r in tuning]
    prompts = [r["prompt"] for r in tuning]
    config = FeatureConfig()
    embedder = default_embedder(config)
    started = time.perf_counter()
    unit = sentence_features(answers, embedder, dataclasses.replace(config, embedding_scale=1.0))
    embed_s = time.perf_counter() - started

    grid = []
    for c, scale in itertools.product(GRID["c"], GRID["embedding_scale"]):
        setting = dataclasses.replace(config, embedding_scale=scale)
        result = cross_validate(
            answers, labels, prompts, embedder=embedder, c=c, config=setting, k=FOLDS,
            seeds=FOLD_SEEDS, sentence_vectors=unit * scale,
        )  # fmt: skip
        grid.append({"embedding_scale": scale, **result})
        print(f"C={c:<5} scale={scale:<5} CV accuracy {result['accuracy']:.3f}", flush=True)
    best = max(grid, key=lambda g: (g["accuracy"], -g["c"]))  # ties: the stronger penalty
    config = dataclasses.replace(config, embedding_scale=best["embedding_scale"])
    model = train_refusal_classifier(
        answers, labels, embedder=embedder, c=best["c"], config=config,
        sentence_vectors=unit * config.embedding_scale,
    )  # fmt: skip
    model.save(args.out)
    report = {
        "data": str(args.data),
        "tuning_n": len(tuning),
        "features": dataclasses.asdict(config),
        "n_terms": len(model.vocabulary.terms),
        "embedding_backend": model.trained_with,
        "embed_tuning_s": embed_s,
        "cv": {
            "folds": FOLDS,
            "grouped_by": "prompt",
            "fold_seeds": list(FOLD_SEEDS),
            "grid": grid,
            "best": best,
        },  # fmt: skip
        "weights": str(args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out),
    }
    if not args.no_held_out:
        shipped = RefusalClassifier.load(args.out, embedder=embedder)
        started = time.perf_counter()
        learned = validate_refusal(
            args.data, lambda q, a: shipped.classify(q, a).label, split="held_out"
        )
        report["held_out"] = {
            "learned": {**learned, "seconds": time.perf_counter() - started},
            "rules": validate_refusal(args.data, split="held_out"),
        }
        for name, figures in report["held_out"].items():
            print(f"held-out {name}: {figures['accuracy']:.3f}", flush=True)
    print(f"wrote {write_result('refusal_classifier', report)}")


if __name__ == "__main__":
    main()
