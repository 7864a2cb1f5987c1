"""The training objectives: denoising (which noise levels, what target) and consistency distillation of a trained
model into a few-step one, with an optional adversarial term and the discriminator it trains beside the student."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, LCMScheduler, SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch.func import functional_call


def predicted_digit_and_noise(
    scheduler: SchedulerMixin, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean digit x_0 and the noise that a model's output at `timesteps` predicts from `sample` (x_t), by the
    scheduler's `prediction_type`."""
    alphas_cumprod = scheduler.alphas_cumprod.to(sample.device)[timesteps].view(-1, 1, 1, 1)
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, sigma * sample + alpha * model_output
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    raise ValueError(f"Unknown prediction_type {prediction_type!r}.")


@dataclass
class DiffusionLoss:
    """The denoising loss of a `DDPMScheduler`'s forward process for any of its prediction types.

    `weighting_scheme` draws the timesteps: "none" uniformly, "logit_normal" from SD3's logit-normal density over
    noise levels (diffusers' `compute_density_for_timestep_sampling`, mean 0, standard deviation 1), which trains the
    middle noise levels more (docs/recipe.md).
    Given a `reference` batch of clean digits, the target is the one that the posterior mean of x_0 over the digit and
    the reference implies (Stable Target Field, Xu et al. 2023), not the digit's own: where the noise hides which digit
    it was, the target averages over the digits it could have been, with less variance. `reference_match` keeps each
    digit's posterior to the reference digits of its own condition (its class), except where the condition is dropped.
    `condition_dropout` replaces conditions by the null condition this often (classifier-free guidance)."""

    scheduler: DDPMScheduler
    weighting_scheme: str = "none"
    condition_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.weighting_scheme not in ("none", "logit_normal"):
            raise ValueError(f"weighting_scheme must be 'none' or 'logit_normal', got {self.weighting_scheme!r}.")

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Training timesteps for one batch, drawn from the density `weighting_scheme` names."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if self.weighting_scheme == "none":
            return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
        u = compute_density_for_timestep_sampling("logit_normal", batch_size, 0.0, 1.0, None, device, generator)
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

    def stable_target(
        self,
        clean_images: torch.Tensor,
        noisy_images: torch.Tensor,
        timesteps: torch.Tensor,
        reference: torch.Tensor,
        reference_match: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """STF's target: the posterior mean of x_0 given x_t over each digit and the reference digits it may be."""
        alphas_cumprod = self.scheduler.alphas_cumprod.to(clean_images.device)[timesteps].view(-1, 1)
        alpha, variance = alphas_cumprod.sqrt(), 1 - alphas_cumprod
        # fp32 whatever the autocast: at low noise the distances are divided by a variance near zero.
        with torch.autocast(clean_images.device.type, enabled=False):
            x_t, own, ref = (x.flatten(1).float() for x in (noisy_images, clean_images, reference))
            own_distance = ((x_t - alpha * own) ** 2).sum(1, keepdim=True)
            ref_distance = (x_t**2).sum(1, keepdim=True) - 2 * alpha * x_t @ ref.T + alpha**2 * (ref**2).sum(1)
            if reference_match is not None:
                ref_distance = ref_distance.masked_fill(~reference_match, torch.inf)
            posterior = torch.softmax(-torch.cat([own_distance, ref_distance], 1) / (2 * variance), dim=1)
            x_0 = posterior[:, :1] * own + posterior[:, 1:] @ ref
        noise = (x_t - alpha * x_0) / variance.sqrt()
        return self.target(x_0.view_as(clean_images), noise.view_as(clean_images), timesteps)

    def __call__(
        self,
        model: torch.nn.Module,
        clean_images: torch.Tensor,
        generator: torch.Generator,
        condition: dict[str, torch.Tensor] | None = None,
        null_condition: dict[str, torch.Tensor] | None = None,
        shard: tuple[int, int] = (0, 1),
        reference: torch.Tensor | None = None,
        reference_match: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean loss of `model` on one batch; every random draw comes from `generator`, so resuming is exact.

        With `shard=(index, count)` the batch is part `index` of a global batch split over `count` processes: the
        draws are made for the global batch, the same on every process, and each takes its part, so that any number
        of processes trains exactly as one process with the global batch does."""
        device, size = clean_images.device, len(clean_images)
        part = slice(shard[0] * size, (shard[0] + 1) * size)
        noise = torch.randn((size * shard[1], *clean_images.shape[1:]), generator=generator, device=device)[part]
        timesteps = self.sample_timesteps(size * shard[1], generator, device)[part]
        condition = dict(condition or {})
        dropped = torch.zeros(size, dtype=torch.bool, device=device)
        if condition and self.condition_dropout > 0:
            dropped = torch.rand(size * shard[1], generator=generator, device=device)[part] < self.condition_dropout
            for name, value in condition.items():
                keep = dropped.view(-1, *[1] * (value.dim() - 1))
                condition[name] = torch.where(keep, null_condition[name].to(value.dtype), value)
        noisy_images = self.scheduler.add_noise(clean_images, noise, timesteps)
        model_output = model(noisy_images, timesteps, **condition).sample
        if reference is None:
            target = self.target(clean_images, noise, timesteps)
        else:  # a dropped condition no longer rules out the other classes' digits
            match = None if reference_match is None else reference_match | dropped[:, None]
            target = self.stable_target(clean_images, noisy_images, timesteps, reference, match)
        return F.mse_loss(model_output.float(), target)


class Discriminator(torch.nn.Sequential):
    """A small convolutional critic of 28x28 digits (DCGAN's shape) for the adversarial term of distillation; it
    trains beside the student and is not saved with the pipeline."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)) -> None:
        layers, size = [], 28
        for in_channels, out_channels in zip((1, *channels[:-1]), channels, strict=True):
            layers += [torch.nn.Conv2d(in_channels, out_channels, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
            size //= 2
        super().__init__(*layers, torch.nn.Flatten(), torch.nn.Linear(channels[-1] * size * size, 1))


@dataclass
class ConsistencyDistillationLoss:
    """Latent-consistency distillation (Luo et al. 2023, as diffusers' `train_lcm_distill_sd_wds.py`) of a frozen
    teacher into a student that `scheduler`, an `LCMScheduler`, samples in a few steps.

    On a grid of `num_ddim_timesteps` of the teacher's timesteps, the student's consistency function at t,
    `c_skip(t) x_t + c_out(t) x_0(x_t, t)`, is pulled towards the target network's at the previous grid point, reached
    from x_t by one DDIM step of the teacher. `scheduler` supplies the noise schedule, the prediction type and the
    boundary scalings, so training and sampling share them. `huber_c` (None: squared error) sets the pseudo-Huber
    loss of improved consistency training (Song & Dhariwal 2023). With a `guide` (the teacher pipeline's
    `guide_unet`), the teacher's step follows its autoguided prediction `guide + w (teacher - guide)` at the timesteps
    of `guidance_interval`, as LCM distils classifier-free guidance into its student.

    With a `discriminator`, the student's own digits are also judged against the batch's real ones (a GAN term, as
    in CTM, Kim et al. 2023, and DMD2, Yin et al. 2024): the student samples from pure noise down a random number of
    its `sampling_timesteps` without gradients, as its sampler does (DMD2's backward simulation), then makes its
    next jump to a digit with them; the non-saturating GAN loss of that digit, at `adversarial_weight`, pushes the
    student, and the discriminator's logistic loss is added to the returned loss. The two terms' parameters are
    disjoint (the student's term sees the discriminator's weights detached), so one backward pass trains both."""

    scheduler: LCMScheduler
    teacher: torch.nn.Module
    target: torch.nn.Module
    num_ddim_timesteps: int = 50
    huber_c: float | None = None
    guide: torch.nn.Module | None = None
    guidance_scale: float = 1.0
    guidance_interval: tuple[int, int] | None = None
    discriminator: torch.nn.Module | None = None
    adversarial_weight: float = 0.0
    sampling_timesteps: list[int] | None = None

    def __post_init__(self) -> None:
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if not 1 <= self.num_ddim_timesteps <= num_train_timesteps or num_train_timesteps % self.num_ddim_timesteps:
            raise ValueError(
                f"num_ddim_timesteps must divide the teacher's {num_train_timesteps} training steps, "
                f"got {self.num_ddim_timesteps}."
            )
        if self.discriminator is not None and not self.sampling_timesteps:
            raise ValueError(
                "The adversarial term needs the student's sampling_timesteps, where its digits come from."
            )
        self.skip = num_train_timesteps // self.num_ddim_timesteps
        # The grid LCMScheduler samples on (its `original_inference_steps`): skip - 1, 2 skip - 1, ..., T - 1.
        self.grid = torch.arange(1, self.num_ddim_timesteps + 1) * self.skip - 1

    def consistency(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> tuple:
        """The consistency function's value, and the x_0 and noise that `model_output` predicts."""
        x_0, noise = predicted_digit_and_noise(self.scheduler, model_output, sample, timesteps)
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(timesteps.view(-1, 1, 1, 1))
        return c_skip * sample + c_out * x_0, x_0, noise

    def __call__(
        self,
        model: torch.nn.Module,
        clean_images: torch.Tensor,
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:
        """The mean consistency loss of `model` on one batch, drawn as `DiffusionLoss` draws (exact resume, shards)."""
        device, size = clean_images.device, len(clean_images)
        part = slice(shard[0] * size, (shard[0] + 1) * size)
        noise = torch.randn((size * shard[1], *clean_images.shape[1:]), generator=generator, device=device)[part]
        index = torch.randint(0, self.num_ddim_timesteps, (size * shard[1],), generator=generator, device=device)[part]
        start = self.grid.to(device)[index]
        previous = (start - self.skip).clamp(min=0)
        noisy_images = self.scheduler.add_noise(clean_images, noise, start)
        inputs, timesteps = noisy_images, start
        if self.discriminator is not None:
            chain, chain_timesteps = self.student_chain(model, clean_images, generator, shard)
            inputs, timesteps = torch.cat([noisy_images, chain]), torch.cat([start, chain_timesteps])
        output = model(inputs, timesteps).sample.float()  # one call: DDP allows one per backward
        prediction, _, _ = self.consistency(output[:size], noisy_images, start)
        with torch.no_grad():
            teacher_output = self.guided_teacher(noisy_images, start)
            _, x_0, teacher_noise = self.consistency(teacher_output, noisy_images, start)
            # One DDIM step of the teacher, from the start point to the previous point on the grid.
            alphas_cumprod = self.scheduler.alphas_cumprod.to(device)[previous].view(-1, 1, 1, 1)
            previous_images = alphas_cumprod.sqrt() * x_0 + (1 - alphas_cumprod).sqrt() * teacher_noise
            target, _, _ = self.consistency(
                self.target(previous_images, previous).sample.float(), previous_images, previous
            )
        if self.huber_c is None:
            loss = F.mse_loss(prediction, target)
        else:
            loss = (torch.sqrt((prediction - target) ** 2 + self.huber_c**2) - self.huber_c).mean()
        if self.discriminator is None:
            return loss
        fake = self.consistency(output[size:], chain, chain_timesteps)[1]
        return loss + self.adversarial_loss(clean_images, fake)

    def guided_teacher(self, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The teacher's prediction, autoguided at `guidance_scale` on the timesteps of `guidance_interval`."""
        output = self.teacher(sample, timesteps).sample.float()
        if self.guide is None or self.guidance_scale == 1:
            return output
        weak = self.guide(sample, timesteps).sample.float()
        lowest, highest = self.guidance_interval or (0, self.scheduler.config.num_train_timesteps)
        guided = ((timesteps >= lowest) & (timesteps <= highest)).view(-1, 1, 1, 1)
        return torch.where(guided, weak + self.guidance_scale * (output - weak), output)

    @torch.no_grad()
    def student_chain(
        self, model: torch.nn.Module, clean_images: torch.Tensor, generator: torch.Generator, shard: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the student's sampler stands after a random number of its steps from pure noise, drawn as the
        consistency loss draws: the inputs of its next jump, and their timesteps."""
        device, size = clean_images.device, len(clean_images)
        part = slice(shard[0] * size, (shard[0] + 1) * size)
        timesteps, alphas_cumprod = self.sampling_timesteps, self.scheduler.alphas_cumprod.to(device)
        steps = int(torch.randint(0, len(timesteps), (1,), generator=generator, device=device))
        draws = torch.randn((steps + 1, size * shard[1], *clean_images.shape[1:]), generator=generator, device=device)
        sample = draws[0, part]
        for i in range(steps):  # LCMScheduler.step: the clipped digit, noised again to the next timestep
            t = torch.full((size,), timesteps[i], device=device)
            _, x_0, _ = self.consistency(model(sample, t).sample.float(), sample, t)
            c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(t.view(-1, 1, 1, 1))
            denoised = c_skip * sample + c_out * x_0.clamp(-1, 1)
            alpha = alphas_cumprod[timesteps[i + 1]]
            sample = alpha.sqrt() * denoised + (1 - alpha).sqrt() * draws[i + 1, part]
        return sample, torch.full((size,), timesteps[steps], device=device)

    def adversarial_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The student's GAN loss at `adversarial_weight` plus the discriminator's own, on one batch."""
        module = getattr(self.discriminator, "module", self.discriminator)  # under DDP, its weights are the module's
        frozen = {name: p.detach() for name, p in module.named_parameters()}
        student = F.softplus(-functional_call(module, frozen, (fake,)).float()).mean()
        # One call on both halves: DDP allows one forward per backward.
        real_logits, fake_logits = self.discriminator(torch.cat([real, fake.detach()])).float().chunk(2)
        critic = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        return self.adversarial_weight * student + critic
