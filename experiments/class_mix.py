#!/usr/bin/env python
"""What a model's class mix alone costs in FID: real digits drawn in the proportions of its generated ones.

    python benchmarks/class_mix.py --dataset_name ylecun/mnist \
        --evals shipped=pretrained/ddpm-mnist/eval.json eight=benchmarks/results/eight_epochs.json:end_10000 ...

Each `mnist-diffusion evaluate` JSON (or, after a colon, the key of one inside a results JSON) holds the classifier's
predicted-class mix of the generated digits. For each, --num_samples digits of the train split are drawn in that mix
by their labels, without replacement (--repeats draws, seeds 0..R-1), and scored against the test split with the
project's evaluator: the FID of perfect digits in the wrong proportions. The train split in its own mix is the floor.
Prints a table, writes JSON.
"""

import argparse
import json
import os
import shlex
import sys

import numpy as np
import torch
from machine import describe, write_result

from pipeline.data import load_images
from pipeline.evaluate import frechet_distance, precision_recall, reference_features


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Real digits: train to draw, test to compare.")
    parser.add_argument("--evals", nargs="+", required=True, help="NAME=PATH[:KEY] of evaluate JSONs.")
    parser.add_argument("--num_samples", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/class_mix.json")
    args = parser.parse_args()
    args.mixes = {}
    for item in args.evals:
        name, _, path = item.partition("=")
        path, _, key = path.partition(":")
        if not path or not os.path.isfile(path):
            parser.error(f"--evals takes NAME=PATH[:KEY] of an evaluate JSON; {item!r} names no file.")
        with open(path) as f:
            evaluation = json.load(f)
        evaluation = evaluation.get(key, {}) if key else evaluation
        if "class_histogram" not in evaluation:
            parser.error(
                f"--evals {item!r}: no class_histogram there; name an evaluate JSON, or KEY of one inside it."
            )
        args.mixes[name] = np.asarray(evaluation["class_histogram"])
    return args


def main() -> None:
    """Score the train split drawn in each mix against the test split."""
    args = parse_args()
    machine = describe(torch.device("cpu"))
    print(json.dumps(machine))
    test = reference_features(args.dataset_name, split="test")
    train = reference_features(args.dataset_name, split="train")
    labels = load_images(args.dataset_name, split="train")[1]
    if labels is None:
        raise SystemExit(f"{args.dataset_name}'s train split has no labels to draw digits by; name a labelled copy.")
    labels = labels.numpy()
    available = np.bincount(labels, minlength=10)
    mixes = {"train split (its own mix)": available / len(labels), **args.mixes}
    counts = {name: np.round(mix / mix.sum() * args.num_samples).astype(int) for name, mix in mixes.items()}
    for name, count in counts.items():  # before any scoring, so that no row's work is lost
        if (count > available).any():
            raise SystemExit(
                f"{name}: {args.num_samples} digits in this mix need more of a class than the train split has; "
                "lower --num_samples."
            )
    rows = []
    for name, mix in mixes.items():
        fids, precisions, recalls = [], [], []
        for seed in range(args.repeats):
            rng = np.random.default_rng(seed)
            index = np.concatenate(
                [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in enumerate(counts[name])]
            )
            fids.append(frechet_distance(train[index], test))
            precision, recall = precision_recall(test, train[index])
            precisions.append(precision)
            recalls.append(recall)
        rows.append({"name": name, "class_mix": mix.round(4).tolist(), "fid": float(np.mean(fids)),
                     "fid_std": float(np.std(fids)), "precision": float(np.mean(precisions)),
                     "recall": float(np.mean(recalls))})  # fmt: skip
    print(
        "\n| class mix of | FID (mean of draws) | precision | recall | mix of 0-9 |\n| --- | --- | --- | --- | --- |"
    )
    for r in rows:
        mix = " ".join(f"{x:.3f}" for x in r["class_mix"])
        print(
            f"| {r['name']} | {r['fid']:.2f} ± {r['fid_std']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {mix} |"
        )
    result = {"machine": machine, "command": shlex.join(["python", *sys.argv]), "num_samples": args.num_samples,
              "repeats": args.repeats, "rows": rows}  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()
