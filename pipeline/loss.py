"""The training objective: which noise levels are trained, with what noise, against what target, weighted how."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from scipy.optimize import linear_sum_assignment


def immiscible_noise(clean_images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Reorder a batch's noise draws so that each image gets a near one (Immiscible Diffusion, Li et al. 2024)."""
    cost = torch.cdist(clean_images.flatten(1).float(), noise.flatten(1).float())
    _, order = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.from_numpy(order).to(noise.device)]


@dataclass
class DiffusionLoss:
    """The denoising loss of a `DDPMScheduler`'s forward process for any of its prediction types.

    `weighting_scheme` draws the timesteps: "none" uniformly, "logit_normal" or "mode" from the densities of
    diffusers' `compute_density_for_timestep_sampling` (SD3). `snr_gamma` caps the weight of the easy, low-noise
    steps (min-SNR-γ, Hang et al. 2023, in the form that only lowers weights, safe for every prediction type).
    `condition_dropout` replaces conditions by the null condition this often (classifier-free guidance)."""

    scheduler: DDPMScheduler
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    snr_gamma: float | None = None
    immiscible: bool = False
    condition_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.weighting_scheme not in ("none", "logit_normal", "mode"):
            raise ValueError(
                f"weighting_scheme must be 'none', 'logit_normal' or 'mode', got {self.weighting_scheme!r}."
            )

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Training timesteps for one batch, drawn from the density `weighting_scheme` names."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if self.weighting_scheme == "none":
            return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, batch_size, self.logit_mean, self.logit_std, self.mode_scale, device, generator
        )
        return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)

    def target(self, clean_images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model should predict, by the scheduler's `prediction_type`."""
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.scheduler.get_velocity(clean_images, noise, timesteps)
        if prediction_type == "sample":
            return clean_images
        raise ValueError(f"Unknown prediction_type {prediction_type!r}.")

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-example loss weights min(1, γ / SNR) for `snr_gamma` γ."""
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = alphas_cumprod / (1 - alphas_cumprod)
        return (self.snr_gamma / snr).clamp(max=1)

    def __call__(
        self,
        model: torch.nn.Module,
        clean_images: torch.Tensor,
        generator: torch.Generator,
        condition: dict[str, torch.Tensor] | None = None,
        null_condition: dict[str, torch.Tensor] | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:
        """The mean loss of `model` on one batch; every random draw comes from `generator`, so resuming is exact.

        With `shard=(index, count)` the batch is part `index` of a global batch split over `count` processes: the
        draws are made for the global batch, the same on every process, and each takes its part, so that any number
        of processes trains exactly as one process with the global batch does."""
        device, size = clean_images.device, len(clean_images)
        part = slice(shard[0] * size, (shard[0] + 1) * size)
        noise = torch.randn((size * shard[1], *clean_images.shape[1:]), generator=generator, device=device)[part]
        timesteps = self.sample_timesteps(size * shard[1], generator, device)[part]
        if self.immiscible:
            noise = immiscible_noise(clean_images, noise)
        condition = dict(condition or {})
        if condition and self.condition_dropout > 0:
            dropped = torch.rand(size * shard[1], generator=generator, device=device)[part] < self.condition_dropout
            for name, value in condition.items():
                keep = dropped.view(-1, *[1] * (value.dim() - 1))
                condition[name] = torch.where(keep, null_condition[name].to(value.dtype), value)
        noisy_images = self.scheduler.add_noise(clean_images, noise, timesteps)
        model_output = model(noisy_images, timesteps, **condition).sample
        target = self.target(clean_images, noise, timesteps)
        if self.snr_gamma is None:
            return F.mse_loss(model_output.float(), target)
        losses = F.mse_loss(model_output.float(), target, reduction="none").mean(dim=(1, 2, 3))
        return (losses * self.weights(timesteps)).mean()
