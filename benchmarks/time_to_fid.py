#!/usr/bin/env python
"""FID against training minutes for training recipes, on this machine: one run at a time, each scored after every
epoch on the same seeds with the default sampler of `mnist-diffusion evaluate`.

    python benchmarks/time_to_fid.py --dataset_name ylecun/mnist --eval_num_samples 2000 \\
        --recipe default "" --recipe previous "--weighting_scheme none --num_epochs 5"

A recipe is a name and the `train_ddpm.py` flags it adds to the defaults. Runs go to `--runs_dir/NAME`; a finished
run is collected as it is, an unfinished one resumed (its training minutes go on from its checkpoint), so the
command can be repeated. `--run NAME DIR` adds a run trained elsewhere with `--eval_epochs 1` (a shipped
pipeline, by its documented command) as it is. Results: `benchmarks/results/time_to_fid.json` and the curves in
`images/time_to_fid.png`.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from machine import describe, write_result  # noqa: E402

from pipeline.sampling import DEFAULT_SAMPLER  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("step", "epoch", "train_minutes", "num_samples", "fid", "kid", "precision", "recall", "class_entropy")


def train(name: str, flags: str, args: argparse.Namespace) -> list[dict]:
    """Run (or finish) one recipe and return its evaluations, one per epoch."""
    output_dir = os.path.join(args.runs_dir, name)
    log = os.path.join(args.runs_dir, f"{name}.log")
    done = os.path.join(output_dir, "time_to_fid.done")
    if not os.path.isfile(done):
        command = [sys.executable, os.path.join(ROOT, "train_ddpm.py"), "--dataset_name", args.dataset_name,
                   "--output_dir", output_dir, "--eval_epochs", "1", "--eval_num_samples", str(args.eval_num_samples),
                   "--resume_from_checkpoint", "latest", *shlex.split(flags)]  # fmt: skip
        print(f"{name}: {shlex.join(command)}  (log: {log})", flush=True)
        os.makedirs(args.runs_dir, exist_ok=True)
        with open(log, "a") as f:
            subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=True)
        open(done, "w").close()
    return collect(output_dir, args.eval_num_samples)


def collect(output_dir: str, num_samples: int) -> list[dict]:
    """A finished run's evaluations (its `eval.jsonl`), one per step, checked to be on `num_samples` digits."""
    path = os.path.join(output_dir, "eval.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{output_dir} has no eval.jsonl: train it with --eval_epochs 1.")
    with open(path) as f:
        records = {r["step"]: r for r in map(json.loads, filter(str.strip, f))}  # a resumed run may score a step again
    if {r["num_samples"] for r in records.values()} != {num_samples}:
        raise SystemExit(f"{path} was scored on other than {num_samples} samples: pass --eval_num_samples to match.")
    return [{k: r[k] for k in KEYS} for _, r in sorted(records.items())]


def plot(results: dict, path: str, reference: dict[str, float]) -> None:
    """FID against training minutes, one curve per recipe."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, recipe in results["recipes"].items():
        points = recipe["evaluations"]
        ax.plot([p["train_minutes"] for p in points], [p["fid"] for p in points], "o-", label=name)
    for name, fid in reference.items():
        ax.axhline(fid, ls="--", color="gray", lw=1)
        ax.text(0, fid, f" {name}", va="bottom", fontsize=8, color="gray")
    sampler, steps = results["sampler"]
    ax.set(xlabel="training minutes", ylabel="FID (classifier features)", yscale="log", xlim=(0, None))
    ax.set_title(f"FID on {results['eval_num_samples']:,} samples ({sampler}, {steps} steps)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Train or collect every recipe, print the table, write the JSON and the picture."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Hub id or local copy of MNIST.")
    parser.add_argument("--recipe", nargs=2, action="append", default=[], metavar=("NAME", "FLAGS"))
    parser.add_argument(
        "--run", nargs=2, action="append", default=[], metavar=("NAME", "DIR"),
        help="Also collect a run trained elsewhere with --eval_epochs 1, e.g. a shipped pipeline.",
    )  # fmt: skip
    parser.add_argument("--eval_num_samples", type=int, default=2000)
    parser.add_argument("--runs_dir", default="runs/time_to_fid")
    parser.add_argument("--reference", nargs="*", default=[], help="FID levels to draw, as NAME=FID.")
    parser.add_argument("--out", default="benchmarks/results/time_to_fid.json")
    parser.add_argument("--plot", default="images/time_to_fid.png")
    args = parser.parse_args()
    if not args.recipe and not args.run:
        parser.error("give at least one --recipe NAME FLAGS or --run NAME DIR.")
    machine = describe(torch.device("cpu"))
    print(json.dumps(machine), flush=True)
    results = {
        "machine": machine,
        "sampler": DEFAULT_SAMPLER,
        "eval_num_samples": args.eval_num_samples,
        "recipes": {},
    }
    for name, flags in args.recipe:
        results["recipes"][name] = {"flags": flags, "evaluations": train(name, flags, args)}
    for name, output_dir in args.run:
        results["recipes"][name] = {"run": output_dir, "evaluations": collect(output_dir, args.eval_num_samples)}
    print(f"{'recipe':<16}{'epoch':>6}{'minutes':>9}{'FID':>8}{'precision':>11}{'recall':>8}")
    for name, recipe in results["recipes"].items():
        for p in recipe["evaluations"]:
            print(f"{name:<16}{p['epoch']:>6}{p['train_minutes']:>9.1f}{p['fid']:>8.2f}{p['precision']:>11.3f}"
                  f"{p['recall']:>8.3f}")  # fmt: skip
    write_result(results, args.out)
    reference = {k: float(v) for k, _, v in (item.rpartition("=") for item in args.reference)}
    plot(results, args.plot, reference)
    print(f"Wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
