#!/usr/bin/env python
"""Wall seconds of `mnist-diffusion sample` as a user runs it: start, loading, sampling and writing the .npz.

    python benchmarks/sample_wall.py --runs pretrained/ddpm-mnist-fast:10000:2 pretrained/ddpm-mnist-fast:10000:4 \
        pretrained/ddpm-mnist:1000:20 --num_processes 1 2

Each run is MODEL:DIGITS[:STEPS] (STEPS: the model's default if left out), timed once per --num_processes, one after
another in a fresh `mnist-diffusion sample` process; seconds per 10,000 digits scale the wall time linearly. Prints a
table, writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from machine import describe


def main() -> None:
    """Time each run, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="MODEL:DIGITS[:STEPS] each.")
    parser.add_argument("--num_processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="benchmarks/results/sample_wall.json")
    args = parser.parse_args()
    machine = describe(torch.device("cpu"))
    print(json.dumps(machine), flush=True)
    cli = os.path.join(os.path.dirname(sys.executable), "mnist-diffusion")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            model, digits, *steps = run.split(":")
            for processes in args.num_processes:
                command = [cli, "sample", "--model", model, "--num_images", digits, "--num_processes", str(processes)]
                command += ["--out", os.path.join(tmp, "grid.png"), "--npz", os.path.join(tmp, "digits.npz")]
                command += ["--num_inference_steps", steps[0]] if steps else []
                started = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                seconds = time.perf_counter() - started
                rows.append({
                    "model": model, "steps": int(steps[0]) if steps else "default", "num_images": int(digits),
                    "num_processes": processes, "wall_s": seconds, "seconds_per_10000": seconds * 10000 / int(digits),
                    "command": "mnist-diffusion " + " ".join(command[1:]),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| model | steps | processes | digits | wall seconds | seconds per 10,000 |\n| --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['steps']} | {r['num_processes']} | {r['num_images']:,} | {r['wall_s']:.1f} | "
            f"{r['seconds_per_10000']:.1f} |"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=2)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
