#!/usr/bin/env python
"""Guidance: FID (and label accuracy) against the guidance scale, the guide, the guided timesteps and the sampler's
noise scale, with the sampling time. Classifier-free guidance for a conditional pipeline (digit i is asked to be
i % 10), autoguidance for one with a `guide_unet`; the default sampler of `mnist-diffusion sample` draws the digits,
seeds 0..N-1.

    python benchmarks/guidance.py --model pretrained/ddpm-mnist-cond --dataset_name ylecun/mnist --num_samples 1000
    python benchmarks/guidance.py --model pretrained/ddpm-mnist --dataset_name ylecun/mnist --num_samples 2000 \\
        --guidance_scales 1 1.5 2 2.5 --guidance_intervals 0:49 0:45 0:38 \\
        --guides epoch1=pretrained/ddpm-mnist/guide_unet epoch2=pretrained/ddpm-mnist/checkpoint-1874/unet_ema \\
        --out benchmarks/results/autoguidance.json
    python benchmarks/guidance.py --model pretrained/ddpm-mnist --dataset_name ylecun/mnist --num_samples 2000 \\
        --guidance_scales 2 --noise_scales 1 0.97 0.94 0.91 --out benchmarks/results/autoguidance_noise.json
"""

import argparse
import itertools
import json
import time

import torch
from diffusers import UNet2DModel
from machine import describe, write_result

from pipeline.evaluate import evaluate_digits, reference_features
from pipeline.sampling import DEFAULT_SAMPLER, digit_cycle, generate, load_pipeline, sampling_precision


def main() -> None:
    """Evaluate each guide, interval and scale; print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrained/ddpm-mnist-cond")
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Real digits (test split) to compare with.")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument(
        "--guides", nargs="+", default=None, help="NAME=FOLDER of UNets to try as the guide; default: the model's."
    )
    parser.add_argument(
        "--guidance_intervals", nargs="+", default=None, help="LOWEST:HIGHEST timesteps; default: the model's."
    )
    parser.add_argument(
        "--noise_scales",
        type=float,
        nargs="+",
        default=None,
        help="Factors on the sampler's noise; default: the model's.",
    )
    parser.add_argument("--out", default="benchmarks/results/guidance.json")
    args = parser.parse_args()

    machine = describe(torch.device("cpu"))
    print(f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['threads']} threads")
    real = reference_features(args.dataset_name, "test")
    pipe = load_pipeline(args.model, DEFAULT_SAMPLER[0])
    labels = digit_cycle(args.num_samples) if pipe.conditioning != "none" else None
    guides = {"own": pipe.guide_unet}
    if args.guides:
        guides = {n: UNet2DModel.from_pretrained(p).eval() for n, p in (g.split("=", 1) for g in args.guides)}
    intervals = [pipe.config.get("guidance_interval")]
    if args.guidance_intervals:
        intervals = [[int(t) for t in i.split(":")] for i in args.guidance_intervals]
    noise_scales = args.noise_scales or [pipe.default_noise_scale]
    rows, unguided = [], set()
    for name, guide in guides.items():
        for interval in intervals:
            for scale, noise_scale in itertools.product(args.guidance_scales, noise_scales):
                if scale == 1:  # no guidance: the same digits whatever the guide and interval
                    if noise_scale in unguided:
                        continue
                    unguided.add(noise_scale)
                pipe.register_modules(guide_unet=guide)
                pipe.register_to_config(guidance_interval=interval, noise_scale=noise_scale)
                start = time.perf_counter()
                with sampling_precision(pipe.device):
                    digits = generate(pipe, args.num_samples, 0, 125, DEFAULT_SAMPLER[1], labels, guidance_scale=scale)
                seconds = time.perf_counter() - start
                row = {"guide": name, "guidance_interval": interval, "guidance_scale": scale}
                row.update(noise_scale=noise_scale, seconds=seconds)
                rows.append({**row, **evaluate_digits(digits, real, labels)})
                print(json.dumps({k: rows[-1].get(k) for k in (*row, "fid", "label_accuracy")}), flush=True)
    print("\n| guide | guided timesteps | scale | noise scale | FID | precision | recall | label accuracy | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        accuracy = f"{r['label_accuracy']:.2%}" if "label_accuracy" in r else ""
        interval = "{}-{}".format(*r["guidance_interval"]) if r["guidance_interval"] else "all"
        print(f"| {r['guide']} | {interval} | {r['guidance_scale']:g} | {r['noise_scale']:g} | {r['fid']:.2f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {accuracy} | {r['seconds']:.0f} |")  # fmt: skip
    write_result({"model": args.model, "sampler": DEFAULT_SAMPLER, "machine": machine, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
