#!/usr/bin/env python
"""The few-step student's sampling noise against its quality: does re-noising less, or with smaller noise, pay?

    python benchmarks/student_noise.py --model pretrained/ddpm-mnist-fast --dataset_name ylecun/mnist \
        --settings 1:1 0.7:1 0.5:1 0.3:1 0:1 1:0.95 1:0.9 1:0.85

Each setting `gamma:scale` samples --num_samples digits (seeds 0..N-1) in the student's default steps and scores them
against the test split. `gamma` is TCD's (Zheng et al. 2024, diffusers' `TCDScheduler`): after each jump to a digit the
sampler keeps the predicted noise down to timestep (1 - gamma) t_next and draws fresh noise only from there, so 1 is
LCM's full re-noising and 0 a deterministic DDIM-like step. `scale` multiplies the starting noise and every fresh draw
(a sampling temperature, the truncation trick of GANs). LCMScheduler's clipping and boundary scalings are kept, and
`1:1` is exactly the shipped sampler. Prints a table, writes JSON.
"""

import argparse
import json
import os
import sys

import torch
from diffusers import LCMScheduler
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor
from machine import describe

from pipeline.evaluate import evaluate_digits, reference_features
from pipeline.sampling import generate, load_sampler, sampling_precision


class NoiseLCMScheduler(LCMScheduler):
    """LCMScheduler whose step keeps part of the predicted noise (`gamma`) and scales its fresh noise (`noise_scale`)."""

    gamma: float = 1.0
    noise_scale: float = 1.0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> LCMSchedulerOutput:
        """LCMScheduler.step, with TCD's gamma and a scaled fresh noise."""
        if self.step_index is None:
            self._init_step_index(timestep)
        alphas_cumprod, index = self.alphas_cumprod, self.step_index + 1
        alpha_t = alphas_cumprod[timestep]
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)
        x_0 = self._predicted_digit(model_output, sample, alpha_t)
        if self.config.clip_sample:
            x_0 = x_0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        denoised = c_skip * sample + c_out * x_0
        prev_sample = denoised
        if index < len(self.timesteps):
            t_next = int(self.timesteps[index])
            noise = (sample - alpha_t.sqrt() * denoised) / (1 - alpha_t).sqrt()
            alpha_s = alphas_cumprod[int((1 - self.gamma) * t_next)] if self.gamma < 1 else torch.tensor(1.0)
            kept = alpha_s.sqrt() * denoised + (1 - alpha_s).sqrt() * noise
            fresh = randn_tensor(model_output.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            ratio = alphas_cumprod[t_next] / alpha_s
            prev_sample = ratio.sqrt() * kept + (1 - ratio).sqrt() * self.noise_scale * fresh
        self._step_index += 1
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def _predicted_digit(
        self, model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor
    ) -> torch.Tensor:
        """x_0 from the model's output, for the prediction types distillation trains."""
        if self.config.prediction_type == "v_prediction":
            return alpha_t.sqrt() * sample - (1 - alpha_t).sqrt() * model_output
        if self.config.prediction_type == "epsilon":
            return (sample - (1 - alpha_t).sqrt() * model_output) / alpha_t.sqrt()
        return model_output


def main() -> None:
    """Sample and score each setting, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pretrained/ddpm-mnist-fast", help="A distilled (LCM) pipeline.")
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="The real digits to compare with.")
    parser.add_argument("--num_samples", type=int, default=2000, help="Digits per setting.")
    parser.add_argument("--settings", nargs="+", default=["1:1", "0.5:1", "0:1", "1:0.9"], help="gamma:noise_scale")
    parser.add_argument("--batch_size", type=int, default=125)
    parser.add_argument("--out", default="benchmarks/results/student_noise.json")
    args = parser.parse_args()
    settings = [tuple(float(v) for v in setting.split(":")) for setting in args.settings]
    if any(len(s) != 2 or not 0 <= s[0] <= 1 or s[1] <= 0 for s in settings):
        raise SystemExit(
            f"--settings are gamma:noise_scale with gamma in [0, 1] and a positive scale: {args.settings}"
        )
    machine = describe(torch.device("cpu"))
    print(json.dumps(machine), flush=True)
    real = reference_features(args.dataset_name, "test")
    rows = []
    for gamma, noise_scale in settings:
        # The row's scale replaces the folder's saved one: the pipeline would otherwise multiply the two.
        pipe, sampler, steps = load_sampler(args.model, noise_scale=1.0)
        if sampler != "lcm":
            raise SystemExit(f"{args.model} samples with {sampler}, not a distilled model's LCM sampler.")
        pipe.scheduler = NoiseLCMScheduler.from_config(pipe.scheduler.config)
        pipe.scheduler.gamma, pipe.scheduler.noise_scale = gamma, noise_scale
        pipe.scheduler.init_noise_sigma = noise_scale  # the pipeline scales its starting noise by this
        with sampling_precision(pipe.device):
            digits = generate(pipe, args.num_samples, 0, args.batch_size, steps, progress=False)
        scores = {k: v for k, v in evaluate_digits(digits, real).items() if k != "class_histogram"}
        rows.append({"gamma": gamma, "noise_scale": noise_scale, "steps": steps, **scores})
        print(f"gamma {gamma}, noise scale {noise_scale}: FID {scores['fid']:.2f}", flush=True)
    print(f"\n{machine['cpu']} ({', '.join(machine.get('cpu_flags', []))}), {args.num_samples:,} digits per row")
    print("| gamma | noise scale | FID | precision | recall |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        scores = f"{row['fid']:.2f} | {row['precision']:.3f} | {row['recall']:.3f}"
        print(f"| {row['gamma']} | {row['noise_scale']} | {scores} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"machine": machine, "model": args.model, "num_samples": args.num_samples, "rows": rows}, f, indent=2
        )
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
