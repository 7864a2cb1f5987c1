#!/usr/bin/env python
"""Classifier-free guidance: FID and label accuracy against the guidance scale, for a class-conditional pipeline.
Digit i is asked to be i % 10; the default sampler of `mnist-diffusion sample` draws it.

    python benchmarks/guidance.py --model pretrained/ddpm-mnist-cond --dataset_name ylecun/mnist --num_samples 1000
"""

import argparse
import json

from pipeline.evaluate import evaluate_digits, reference_features
from pipeline.sampling import DEFAULT_SAMPLER, digit_cycle, generate, load_pipeline, sampling_precision


def main() -> None:
    """Evaluate each guidance scale, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrained/ddpm-mnist-cond")
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Real digits (test split) to compare with.")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--out", default="benchmarks/results/guidance.json")
    args = parser.parse_args()

    real = reference_features(args.dataset_name, "test")
    pipe = load_pipeline(args.model, DEFAULT_SAMPLER[0])
    labels = digit_cycle(args.num_samples)
    rows = []
    for scale in args.guidance_scales:
        with sampling_precision(pipe.device):
            digits = generate(pipe, args.num_samples, 0, 125, DEFAULT_SAMPLER[1], labels, guidance_scale=scale)
        rows.append({"guidance_scale": scale, **evaluate_digits(digits, real, labels)})
        print(f"w={scale}: FID {rows[-1]['fid']:.2f}, label accuracy {rows[-1]['label_accuracy']:.4f}", flush=True)
    print("\n| guidance scale | FID | precision | recall | label accuracy |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['guidance_scale']:g} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['label_accuracy']:.2%} |")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "sampler": DEFAULT_SAMPLER, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
