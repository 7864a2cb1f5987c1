#!/usr/bin/env python
"""Few-step sampling: quality and seconds against steps for a distilled pipeline, beside its teacher's default sampler.

    python benchmarks/few_step.py --model pretrained/ddpm-mnist-fast --teacher pretrained/ddpm-mnist \
        --dataset_name ylecun/mnist

In one process, one after another: the student's own sampler (LCM) in 1, 2, 3 and 4 steps on --num_samples digits
(seeds 0..N-1): wall seconds, digits/s, FID, KID, precision and recall against the test split; the teacher's default
sampler on --teacher_num_samples digits (digits/s; its FID is the 10,000-sample one in its eval.json, if any). Then,
at the student's default steps and N digits, what speeds sampling up beyond the step count: fp32 against bf16,
batch sizes, torch.compile (inductor with `freezing`: a fresh process with an empty compile cache, then one with the
cache it left), and two single-thread processes against one two-thread process, each on --speed_num_samples digits.
Prints a table, writes JSON.
"""

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import torch
from machine import describe, write_result

from pipeline.evaluate import evaluate_digits, reference_features
from pipeline.sampling import generate, load_sampler, sampling_precision


def timed_digits(
    model: str, num_images: int, steps: int | None, batch_size: int, precision: str = "auto", seed: int = 0
) -> tuple[np.ndarray, float, tuple[str, int]]:
    """`num_images` digits from `model`'s default sampler (in `steps`), the seconds they took (loading excluded), and
    the sampler and steps."""
    pipe, sampler, steps = load_sampler(model, steps=steps)
    started = time.perf_counter()
    with sampling_precision(pipe.device, precision):
        digits = generate(pipe, num_images, seed, batch_size, steps, progress=False)
    return digits, time.perf_counter() - started, (sampler, steps)


def worker(model: str, num_images: int, batch_size: int, threads: int, seed: int, compile_unet: bool) -> dict:
    """In a fresh process: sample with `threads` threads, optionally through torch.compile; seconds for each part."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    pipe, _, steps = load_sampler(model)
    with sampling_precision(pipe.device):
        if compile_unet:
            torch._inductor.config.freezing = True  # weights become constants: folded into the kernels
            pipe.unet = torch.compile(pipe.unet)
        first = time.perf_counter()
        generate(pipe, batch_size, seed, batch_size, steps, progress=False)  # compiles, if compiling
        rest = time.perf_counter()
        generate(pipe, num_images - batch_size, seed + batch_size, batch_size, steps, progress=False)
        done = time.perf_counter()
    return {"load_s": first - started, "first_batch_s": rest - first, "rest_s": done - rest, "total_s": done - started}


def in_processes(jobs: list[tuple], env: dict | None = None) -> tuple[list[dict], float]:
    """Run `worker(*job)` for each job in its own fresh process, all at once; their results and the wall seconds."""
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        context = multiprocessing.get_context("spawn")
        with context.Pool(len(jobs)) as pool:
            started = time.perf_counter()
            results = pool.starmap(worker, jobs)
            return results, time.perf_counter() - started
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    """Measure, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrained/ddpm-mnist-fast", help="The distilled pipeline.")
    parser.add_argument("--teacher", default="pretrained/ddpm-mnist", help="The pipeline it was distilled from.")
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="The real digits to compare with.")
    parser.add_argument("--num_samples", type=int, default=10000, help="Digits per setting of the student.")
    parser.add_argument("--teacher_num_samples", type=int, default=1000, help="Digits timed for the teacher.")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batch_sizes", type=int, nargs="*", default=[64, 256], help="Also timed; [] skips.")
    parser.add_argument("--speed_num_samples", type=int, default=2000, help="Digits per speed lever.")
    parser.add_argument("--skip_speed", action="store_true", help="Only the quality against steps.")
    parser.add_argument("--out", default="benchmarks/results/few_step.json")
    args = parser.parse_args()
    machine = describe(torch.device("cpu"))
    print(json.dumps(machine), flush=True)
    results = {"machine": machine, "model": args.model, "teacher": args.teacher, "num_samples": args.num_samples}
    real = reference_features(args.dataset_name, "test")
    n = args.num_samples

    default_steps = load_sampler(args.model)[2]
    if default_steps not in args.steps:
        raise SystemExit(f"--steps must include {args.model}'s default, {default_steps}, for the speedup.")
    rows = []
    for steps in args.steps:
        digits, seconds, _ = timed_digits(args.model, n, steps, args.batch_size)
        scores = evaluate_digits(digits, real)
        rows.append({"steps": steps, "seconds": seconds, "digits_per_s": n / seconds, **scores})
        print(f"student {steps} steps: {seconds:.1f} s, FID {scores['fid']:.2f}", flush=True)
    results["steps"] = rows
    _, seconds, sampler = timed_digits(args.teacher, args.teacher_num_samples, None, args.batch_size)
    teacher = {"digits_per_s": args.teacher_num_samples / seconds, "sampler": sampler}
    eval_file = os.path.join(args.teacher, "eval.json")
    if os.path.isfile(eval_file):
        with open(eval_file) as f:
            teacher["eval"] = {k: v for k, v in json.load(f).items() if k != "class_histogram"}
    results["teacher"] = teacher
    student_rate = next(row["digits_per_s"] for row in rows if row["steps"] == default_steps)
    results["speedup_over_teacher"] = student_rate / teacher["digits_per_s"]
    print(f"teacher {teacher['sampler']}: {teacher['digits_per_s']:.1f} digits/s", flush=True)

    if not args.skip_speed:
        m = args.speed_num_samples
        speed = {f"bf16 where native, batch {args.batch_size}": timed_digits(args.model, m, None, args.batch_size)[1]}
        speed["fp32"] = timed_digits(args.model, m, None, args.batch_size, "fp32")[1]
        for batch in args.batch_sizes:
            speed[f"batch {batch}"] = timed_digits(args.model, m, None, batch)[1]
        # Timed on m digits, reported per 10,000.
        results["speed_s_per_10000"] = {name: seconds * 10000 / m for name, seconds in speed.items()}
        with tempfile.TemporaryDirectory() as cache:
            env = {"TORCHINDUCTOR_CACHE_DIR": cache}
            # A batch size that divides m: one compiled shape.
            batch = next(b for b in range(args.batch_size, 0, -1) if m % b == 0)
            job = (args.model, m, batch, torch.get_num_threads(), 0, True)
            results["compile"] = {"batch_size": batch, "num_samples": m}
            for label in ("cold cache", "warm cache"):
                (run,), wall = in_processes([job], env)
                results["compile"][label] = {**run, "wall_s": wall}
                print(f"torch.compile, {label}: {run}", flush=True)
        (run,), wall = in_processes([(args.model, m, batch, torch.get_num_threads(), 0, False)])
        results["compile"]["eager"] = {**run, "wall_s": wall}
        half = m // 2
        runs, wall = in_processes(
            [(args.model, half, batch, 1, 0, False), (args.model, m - half, batch, 1, half, False)]
        )
        results["processes"] = {"two 1-thread processes": {"runs": runs, "wall_s": wall}}
        (run,), wall = in_processes([(args.model, m, batch, 2, 0, False)])
        results["processes"]["one 2-thread process"] = {"runs": [run], "wall_s": wall}

    print(f"\n{machine['cpu']} ({', '.join(machine.get('cpu_flags', []))}), {machine['threads']} threads")
    print(f"| steps | FID | KID | precision | recall | seconds per {n:,} digits | digits/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['steps']} | {row['fid']:.2f} | {row['kid']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} "
            f"| {row['seconds']:.1f} | {row['digits_per_s']:.1f} |"
        )
    sampler, steps = teacher["sampler"]
    fid = teacher.get("eval", {}).get("fid")
    print(f"| teacher, {sampler} {steps} steps | {fid if fid is None else f'{fid:.2f}'} | | | | "
          f"{n / teacher['digits_per_s']:.1f} (from {args.teacher_num_samples:,}) | {teacher['digits_per_s']:.1f} |")  # fmt: skip
    print(f"speedup_over_teacher: {results['speedup_over_teacher']:.2f}")
    if not args.skip_speed:
        print(f"\nseconds per 10,000 digits at {default_steps} steps (timed on {m:,}):")
        for name, seconds in results["speed_s_per_10000"].items():
            print(f"  {name:<32} {seconds:7.1f}")
        print(f"torch.compile and processes, {m:,} digits at batch {batch}, wall seconds from a fresh process:")
        for name, run in results["compile"].items():
            if isinstance(run, dict):
                print(f"  {name:<32} {run['wall_s']:7.1f} (load {run['load_s']:.1f}, first batch "
                      f"{run['first_batch_s']:.1f}, the rest {run['rest_s']:.1f})")  # fmt: skip
        for name, run in results["processes"].items():
            print(f"  {name:<32} {run['wall_s']:7.1f}")
    write_result(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
