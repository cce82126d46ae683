"""Issue 14: train the learned refusal classifier (agentkit/refusal_model.py) and score it.

1. Hyperparameters by 10-fold cross-validation, folds grouped by prompt (every completion of a
   prompt in one fold), three fold seeds: ``C`` times the rule features' weight (0: none); the
   sentence embeddings' weight stays 0.25, which an earlier grid (0.25, 0.5 at C 1-30) chose at
   every ``C``. The rules were written on the tuning half, so the cross-validated gain of the
   rule features is optimistic: the best of that grid (rules 0.25, C=10: CV 92.6% on the
   tuning half) scored 87.7% held-out against the rule-free model's 88.4%, so the shipped
   weights are rule-free (``--rule-scales 0``).
2. ``--train-on all`` (the shipped weights): the cross-validation runs over all 1,170 labelled
   completions, the best setting is refit on all of them, and the figure to report is the
   cross-validated accuracy (with the first seed's confusion matrix); the same recipe fit on
   each half alone and scored on the other, and the string rules, come in the same run. No
   held-out half is left, so ``agentkit eval refusal --classifier learned`` marks its figures
   in-sample.
3. ``--train-on tuning``: the tuning half only, then (unless ``--no-held-out``) the saved model
   and the string rules on the held-out half, beside the previous model's held-out figures.
   Figures in ``results/refusal_classifier.json``; the fit is deterministic (the fold seeds only
   pick the setting).

The sentence embeddings come from the configured embedding backend (recorded with the weights;
the shipped ones: ``onnx-fp32``); ``AGENTKIT_EMBEDDING_BACKEND=onnx-fp32`` reproduces them
exactly where ``auto`` would pick another. One setting's 30 fits take ~7 min on 2 cores.

    flock /tmp/agentkit-heavy.lock .venv/bin/python benchmarks/train_refusal_classifier.py \
        --rule-scales 0
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

from common import RESULTS, ROOT, SHARED, write_result

from agentkit.refusal import confusion, held_out, read_csv, validate_refusal
from agentkit.refusal_model import (
    MODEL_FILE,
    FeatureConfig,
    RefusalClassifier,
    cross_validate,
    default_embedder,
    scored_pairs,
    sentence_features,
    train_refusal_classifier,
)

COMPLETIONS = SHARED / "data" / "xstest" / "labelled_completions_dev.csv"
GRID = {"c": (3.0, 10.0), "rule_features_scale": (0.0, 0.25, 0.5)}
FOLD_SEEDS = (0, 1, 2)
FOLDS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=COMPLETIONS)
    parser.add_argument("--out", type=Path, default=ROOT / "prompts" / MODEL_FILE)
    parser.add_argument("--no-held-out", action="store_true", help="Train only.")
    parser.add_argument(
        "--rule-scales", default=",".join(map(str, GRID["rule_features_scale"])),
        help="The rule features' weights to try (0: none; '0' reproduces the shipped weights).",
    )  # fmt: skip
    parser.add_argument(
        "--train-on", choices=("all", "tuning"), default="all",
        help="all (the shipped weights): cross-validated over all 1,170 completions, which "
        "leaves no held-out half; tuning: the tuning half, scored on the held-out half.",
    )  # fmt: skip
    args = parser.parse_args()

    rows = read_csv(args.data)
    training = rows if args.train_on == "all" else [r for r in rows if not held_out(r["prompt"])]
    answers = [r["completion"] for r in training]
    labels = [r["label"] for r in training]
    prompts = [r["prompt"] for r in training]
    config = FeatureConfig()
    embedder = default_embedder(config.embedding_model)
    started = time.perf_counter()
    unit = sentence_features(answers, embedder, dataclasses.replace(config, embedding_scale=1.0))
    embed_s = time.perf_counter() - started

    grid = []
    rule_scales = [float(x) for x in args.rule_scales.split(",")]
    for c, rules in itertools.product(GRID["c"], rule_scales):
        setting = dataclasses.replace(config, rule_features_scale=rules)
        started = time.perf_counter()
        result = cross_validate(
            answers, labels, prompts, embedder=embedder, c=c, config=setting, k=FOLDS,
            seeds=FOLD_SEEDS, sentence_vectors=unit * config.embedding_scale,
        )  # fmt: skip
        grid.append({"rule_features_scale": rules, **result,
                     "seconds": time.perf_counter() - started})  # fmt: skip
        print(f"C={c:<5} rules={rules:<5} CV accuracy {result['accuracy']:.3f}", flush=True)
    # ties: no rule features, then the stronger penalty
    best = max(grid, key=lambda g: (g["accuracy"], -g["rule_features_scale"], -g["c"]))
    config = dataclasses.replace(config, rule_features_scale=best["rule_features_scale"])

    def fit(chosen: list[int]) -> RefusalClassifier:
        return train_refusal_classifier(
            [answers[i] for i in chosen], [labels[i] for i in chosen], embedder=embedder,
            c=best["c"], config=config, sentence_vectors=unit[chosen] * config.embedding_scale,
        )  # fmt: skip

    model = fit(list(range(len(answers))))
    model.trained_on = args.train_on
    model.save(args.out)
    report = {
        "data": str(args.data),
        "trained_on": args.train_on,
        "training_n": len(training),
        "features": dataclasses.asdict(config),
        "n_terms": len(model.vocabulary.terms),
        "embedding_backend": model.trained_with,
        "embed_training_s": embed_s,
        "cv": {
            "folds": FOLDS,
            "grouped_by": "prompt",
            "fold_seeds": list(FOLD_SEEDS),
            "grid": grid,
            "best": best,
        },  # fmt: skip
        "weights": str(args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out),
    }
    if args.train_on == "all":
        # the same recipe on each half alone, scored on the other (no model saw its test half)
        tuning = [i for i, p in enumerate(prompts) if not held_out(p)]
        other = [i for i, p in enumerate(prompts) if held_out(p)]
        vectors = unit * config.embedding_scale
        report["halves"] = {
            name: confusion(scored_pairs(fit(train), answers, labels, vectors, test))["accuracy"]
            for name, train, test in (("tuning_to_held_out", tuning, other),
                                      ("held_out_to_tuning", other, tuning))
        }  # fmt: skip
        report["rules"] = {s: validate_refusal(args.data, split=s) for s in ("all", "held_out")}
        print(f"CV over all: {best['accuracy']:.3f}; halves {report['halves']}; rules "
              f"{report['rules']['all']['accuracy']:.3f}", flush=True)  # fmt: skip
    elif not args.no_held_out:
        previous = previous_held_out()
        shipped = RefusalClassifier.load(args.out, embedder=embedder)
        started = time.perf_counter()
        learned = validate_refusal(
            args.data, lambda q, a: shipped.classify(q, a).label, split="held_out"
        )
        report["held_out"] = {
            "learned": {**learned, "seconds": time.perf_counter() - started},
            "rules": validate_refusal(args.data, split="held_out"),
        }
        if previous:
            report["held_out"]["previous_learned"] = previous
        for name, figures in report["held_out"].items():
            print(f"held-out {name}: {figures['accuracy']:.3f}", flush=True)
    print(f"wrote {write_result('refusal_classifier', report)}")


def previous_held_out() -> dict | None:
    """The held-out figures of the shipped model per the results file, with its features, or
    None when there is none. A file with ``shipped`` records a model that was not kept: its
    ``previous_learned`` is what shipped."""
    path = RESULTS / "refusal_classifier.json"
    if not path.is_file():
        return None
    last = json.loads(path.read_text())
    if "shipped" in last:
        return last.get("held_out", {}).get("previous_learned")
    if "learned" not in last.get("held_out", {}):
        return None
    return {"when": last["when"], "features": last["features"], "c": last["cv"]["best"]["c"],
            **last["held_out"]["learned"]}  # fmt: skip


if __name__ == "__main__":
    main()
