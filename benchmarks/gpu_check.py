#!/usr/bin/env python
"""The checks to run whenever a CUDA GPU is at hand: the test modules that train and sample (on the GPU there), one
epoch of the default recipe in bf16 with and without torch.compile, and sampling speed. JSON for docs/speed.md.

    python benchmarks/gpu_check.py --dataset_name ylecun/mnist
    python benchmarks/gpu_check.py --dry_run --dataset_name <tiny copy> --model <tiny pipeline> \\
        --train_args "--model_config_name_or_path <tiny unet> --max_train_steps 2"    # on the CPU, as the suite does
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import torch
from machine import describe, write_result

from pipeline.sampling import DEFAULT_SAMPLER, default_mixed_precision, generate, load_pipeline, sampling_precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_MODULES = ["tests/test_train.py", "tests/test_pipeline.py", "tests/test_diffusers_conformance.py"]


def timed(command: list[str], env: dict | None = None) -> dict:
    """Run a command from the repository root; its exit code, wall seconds and last lines."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    print(f"{shlex.join(command)}: exit {result.returncode}", flush=True)
    tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
    return {"command": shlex.join(command), "exit_code": result.returncode, "seconds": time.perf_counter() - started,
            "tail": tail}  # fmt: skip


def main() -> None:
    """Run every check, print a summary, write the JSON; exit non-zero if any check failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="ylecun/mnist")
    parser.add_argument("--model", default="pretrained/ddpm-mnist", help="The pipeline whose sampling is timed.")
    parser.add_argument("--num_images", type=int, default=10000, help="Digits sampled for the speed figure.")
    parser.add_argument("--train_args", default="", help="Extra train_ddpm.py flags for both training runs.")
    parser.add_argument(
        "--dry_run", action="store_true", help="On the CPU, with tiny settings: no test modules, no torch.compile."
    )
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA GPU here; --dry_run runs the same steps on the CPU.")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    results = {"machine": describe(device), "dry_run": args.dry_run}
    env = {"HF_HUB_OFFLINE": "1"} if args.dry_run else {}
    if args.dry_run:
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        results["tests"] = timed([sys.executable, "-m", "pytest", "-q", *TEST_MODULES])
    with tempfile.TemporaryDirectory() as runs:
        # A CPU without native bf16 (AVX2 alone) would emulate it, minutes even for the dry run's tiny UNet.
        precision = "bf16" if not args.dry_run or default_mixed_precision() == "bf16" else "no"
        # Compiling takes minutes on a CPU: the dry run checks the eager path only.
        for name, dynamo in (("eager", "no"), ("torch.compile", "inductor"))[: 1 if args.dry_run else 2]:
            command = [sys.executable, "train_ddpm.py", "--dataset_name", args.dataset_name, "--num_epochs", "1",
                       "--mixed_precision", precision, "--output_dir", os.path.join(runs, name),
                       *shlex.split(args.train_args)]  # fmt: skip
            results[f"train_one_epoch_{name}"] = timed(command, {**env, "ACCELERATE_DYNAMO_BACKEND": dynamo})
    pipe = load_pipeline(args.model, DEFAULT_SAMPLER[0]).to(device)
    started = time.perf_counter()
    with sampling_precision(device):
        generate(pipe, args.num_images, 0, 500 if device.type == "cuda" else 128, DEFAULT_SAMPLER[1], progress=False)
    seconds = time.perf_counter() - started
    results["sample"] = {"sampler": DEFAULT_SAMPLER, "num_images": args.num_images, "seconds": seconds,
                         "images_per_s": args.num_images / seconds}  # fmt: skip
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("exit_code", 0) != 0]
    results["failed"] = failed
    write_result(results, args.out)
    print(json.dumps({k: v.get("seconds") for k, v in results.items() if isinstance(v, dict) and "seconds" in v}))
    print(f"Wrote {args.out}" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
