#!/usr/bin/env python
"""Sample quality against speed: FID (and the rest of `mnist-diffusion evaluate`) for each sampler, step count and
precision, on one trained pipeline, side by side.

    python benchmarks/samplers.py --model pretrained/ddpm-mnist --dataset_name ylecun/mnist --num_samples 1000
    python benchmarks/samplers.py ... --num_samples 5000 --settings ddpm:50:fp32 dpm++sde:20:bf16   # some of them
"""

import argparse
import json
import time

import torch
from machine import describe, write_result

from pipeline.evaluate import evaluate_digits, reference_features
from pipeline.sampling import SCHEDULERS, generate, load_pipeline, sampling_precision

# (scheduler, steps, precision): 50-step ancestral DDPM in fp32 is the reference the others are measured against.
SETTINGS = [("ddpm", 50, "fp32"), ("ddpm", 50, "bf16"), ("ddpm", 25, "bf16")] + [
    (scheduler, steps, "bf16") for scheduler in ("ddim", "dpm++", "dpm++sde") for steps in (10, 18, 20, 25)
]


def setting(text: str) -> tuple[str, int, str]:
    """argparse type for "scheduler:steps:dtype", e.g. "dpm++sde:20:bf16"."""
    scheduler, steps, precision = text.split(":")
    if scheduler not in SCHEDULERS or precision not in ("fp32", "bf16"):
        raise argparse.ArgumentTypeError(f"want scheduler:steps:dtype with one of {sorted(SCHEDULERS)} and fp32/bf16")
    return scheduler, int(steps), precision


def main() -> None:
    """Evaluate every setting and print a table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrained/ddpm-mnist")
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Real digits (test split) to compare with.")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=125)
    parser.add_argument("--settings", nargs="+", type=setting, default=SETTINGS, help="Default: the whole table.")
    parser.add_argument("--out", default="benchmarks/results/samplers.json")
    args = parser.parse_args()

    machine = describe(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(json.dumps(machine), flush=True)
    real = reference_features(args.dataset_name, "test")
    rows = []
    for scheduler, steps, precision in args.settings:
        pipe = load_pipeline(args.model, scheduler)
        start = time.perf_counter()
        with sampling_precision(pipe.device, precision):
            digits = generate(pipe, args.num_samples, 0, args.batch_size, steps)
        seconds = time.perf_counter() - start
        results = evaluate_digits(digits, real)
        rows.append({"scheduler": scheduler, "steps": steps, "dtype": precision,
                     "images_per_s": args.num_samples / seconds, **results})  # fmt: skip
        print(f"{scheduler:>6} {steps:>3} {precision}: FID {results['fid']:.3f}, {rows[-1]['images_per_s']:.1f} img/s")
    print(f"\n| sampler | steps | dtype | FID | KID | precision | recall | images/s |\n|{' --- |' * 8}")
    for r in rows:
        print(f"| {r['scheduler']} | {r['steps']} | {r['dtype']} | {r['fid']:.2f} | {r['kid']:.4f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['images_per_s']:.1f} |")  # fmt: skip
    write_result({"model": args.model, "num_samples": args.num_samples, "machine": machine, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
