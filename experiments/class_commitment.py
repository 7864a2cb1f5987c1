#!/usr/bin/env python
"""Where along sampling a digit's class is settled, and how much training each noise level gets.

    python benchmarks/class_commitment.py --model pretrained/ddpm-mnist --num_samples 1000 \
        --out benchmarks/results/class_commitment.json

Draws --num_samples digits (seeds 0..N-1) with the model's pipeline, by default unguided with 50 ancestral DDPM steps
(one per training timestep). After each step the UNet's prediction of the clean digit is classified; the table gives,
per timestep, how often that class is already the final digit's and the share of each class so far. Beside it, the
share of training draws at each timestep under uniform and logit-normal sampling (`DiffusionLoss`, default flags).
Prints a table, writes JSON.
"""

import argparse
import json
import shlex
import sys

import numpy as np
import torch
from diffusers.callbacks import PipelineCallback
from machine import describe, write_result

from pipeline import MNISTDiffusionPipeline
from pipeline.classifier import classify, load_classifier
from pipeline.loss import DiffusionLoss, predicted_digit_and_noise
from pipeline.sampling import generate, load_sampler, sampling_precision, to_uint8


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrained/ddpm-mnist", help="A pipeline folder or Hub id.")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--scheduler", default="ddpm", help="The sampler (`mnist-diffusion sample --scheduler`).")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="1: the UNet alone.")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--out", default="benchmarks/results/class_commitment.json")
    args = parser.parse_args()
    if args.num_samples < 1:
        parser.error(f"--num_samples must be at least 1, got {args.num_samples}.")
    return args


class ClassRecorder(PipelineCallback):
    """After each sampling step, the classifier's class of the UNet's predicted clean digit, kept by timestep."""

    tensor_inputs = ["latents", "model_output"]

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier, self.predicted, self.latents = classifier, {}, None

    def callback_fn(
        self, pipeline: MNISTDiffusionPipeline, step_index: int, timestep: torch.Tensor, callback_kwargs: dict
    ) -> dict:
        """Classify x_0 predicted from the step's input (the previous step's output) and the model's output."""
        # The first step's input is the starting noise, which a callback does not see; from the second on it is the
        # previous step's output. A batch starts at step 0, so `latents` never leaks between batches.
        if step_index > 0:
            x_0, _ = predicted_digit_and_noise(
                pipeline.scheduler, callback_kwargs["model_output"], self.latents, timestep
            )
            digits = to_uint8((x_0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
            probs = classify(self.classifier, torch.from_numpy(digits))[1]
            self.predicted.setdefault(int(timestep), []).append(probs.argmax(-1))
        self.latents = callback_kwargs["latents"]
        return {}


def main() -> None:
    """Classify the predicted clean digit after every sampling step; print a table, write JSON."""
    args = parse_args()
    machine = describe(torch.device("cpu"))
    print(json.dumps(machine))
    pipe, _, _ = load_sampler(args.model, args.scheduler, args.num_inference_steps)
    classifier = load_classifier()
    recorder = ClassRecorder(classifier)

    with sampling_precision(pipe.device):
        final = generate(
            pipe, args.num_samples, 0, args.batch_size, args.num_inference_steps,
            guidance_scale=args.guidance_scale, callback_on_step_end=recorder,
        )  # fmt: skip
    final_class = classify(classifier, torch.from_numpy(final))[1].argmax(-1)

    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(0)
    training = {
        scheme: np.bincount(
            DiffusionLoss(pipe.scheduler, weighting_scheme=scheme).sample_timesteps(10**6, generator, "cpu").numpy(),
            minlength=num_train_timesteps,
        )
        / 10**6
        for scheme in ("none", "logit_normal")
    }
    rows = []
    for t, batches in sorted(recorder.predicted.items(), reverse=True):
        classes = torch.cat(batches)
        rows.append({"timestep": t, "agreement": float((classes == final_class).double().mean()),
                     "class_shares": (np.bincount(classes.numpy(), minlength=10) / len(classes)).tolist(),
                     "training_share_uniform": float(training["none"][t]),
                     "training_share_logit_normal": float(training["logit_normal"][t])})  # fmt: skip
    final_shares = np.bincount(final_class.numpy(), minlength=10) / len(final_class)
    print("\n| timestep | class is the final one | share of 1s | training draws, uniform | logit-normal |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['timestep']} | {r['agreement']:.3f} | {r['class_shares'][1]:.3f} | "
            f"{r['training_share_uniform']:.3f} | {r['training_share_logit_normal']:.3f} |"
        )
    print(f"| final digits | 1 | {final_shares[1]:.3f} | | |")
    result = {"machine": machine, "command": shlex.join(["python", *sys.argv]), "model": args.model,
              "scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps,
              "guidance_scale": args.guidance_scale, "num_samples": args.num_samples,
              "final_class_shares": final_shares.tolist(), "rows": rows}  # fmt: skip
    write_result(result, args.out)


if __name__ == "__main__":
    main()
