"""The training objectives: denoising (which noise levels, what noise, what target, what weights) and consistency
distillation of a trained model into a few-step one, with optional adversarial and distribution-matching terms and the
networks they train beside the student."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, LCMScheduler, SchedulerMixin
from diffusers.training_utils import compute_density_for_timestep_sampling
from scipy.optimize import linear_sum_assignment
from torch.func import functional_call


def immiscible_noise(clean_images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Reorder a batch's noise draws so that each image gets a near one (Immiscible Diffusion, Li et al. 2024)."""
    cost = torch.cdist(clean_images.flatten(1).float(), noise.flatten(1).float())
    _, order = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.from_numpy(order).to(noise.device)]


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

    `weighting_scheme` draws the timesteps: "none" uniformly, "logit_normal" or "mode" from the densities of
    diffusers' `compute_density_for_timestep_sampling` (SD3); `stratified` draws one timestep from each of the batch's
    equal slices of that density instead of each independently (stratified sampling: the same density, less noise in
    each batch's mix of noise levels). `snr_gamma` caps the weight of the easy, low-noise
    steps (min-SNR-γ, Hang et al. 2023, in the form that only lowers weights, safe for every prediction type).
    Given a `reference` batch of clean digits, the target is the one that the posterior mean of x_0 over the digit and
    the reference implies (Stable Target Field, Xu et al. 2023), not the digit's own: where the noise hides which digit
    it was, the target averages over the digits it could have been, with less variance. `reference_match` keeps each
    digit's posterior to the reference digits of its own condition (its class), except where the condition is dropped.
    `condition_dropout` replaces conditions by the null condition this often (classifier-free guidance)."""

    scheduler: DDPMScheduler
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    snr_gamma: float | None = None
    immiscible: bool = False
    condition_dropout: float = 0.0
    stratified: bool = False

    def __post_init__(self) -> None:
        if self.weighting_scheme not in ("none", "logit_normal", "mode"):
            raise ValueError(
                f"weighting_scheme must be 'none', 'logit_normal' or 'mode', got {self.weighting_scheme!r}."
            )

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Training timesteps for one batch, drawn from the density `weighting_scheme` names."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if self.stratified:
            # One draw in each of batch_size equal slices of [0, 1), shuffled: the batch covers the density evenly.
            strata = torch.randperm(batch_size, generator=generator, device=device)
            u = (strata + torch.rand(batch_size, generator=generator, device=device)) / batch_size
            if self.weighting_scheme == "logit_normal":
                u = torch.sigmoid(self.logit_mean + self.logit_std * 2**0.5 * torch.erfinv(2 * u - 1))
            elif self.weighting_scheme == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
        elif self.weighting_scheme == "none":
            return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
        else:
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
        if self.immiscible:
            noise = immiscible_noise(clean_images, noise)
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
        if self.snr_gamma is None:
            return F.mse_loss(model_output.float(), target)
        losses = F.mse_loss(model_output.float(), target, reduction="none").mean(dim=(1, 2, 3))
        return (losses * self.weights(timesteps)).mean()


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
    disjoint (the student's term sees the discriminator's weights detached), so one backward pass trains both.

    With a `fake_score` (a trainable copy of the teacher's UNet), the same digits are also pulled towards the guided
    teacher's distribution by distribution matching (DMD, Yin et al. 2023, as DMD2 does it): noised to a random
    timestep, the difference between the fake score's denoised digit and the teacher's is the gradient of the KL
    divergence between the student's distribution and the teacher's, applied at `distribution_matching_weight`;
    the fake score learns the denoising loss on the student's digits (detached) in the same backward pass, so that
    it keeps tracking what the student draws."""

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
    fake_score: torch.nn.Module | None = None
    distribution_matching_weight: float = 0.0

    def __post_init__(self) -> None:
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if not 1 <= self.num_ddim_timesteps <= num_train_timesteps or num_train_timesteps % self.num_ddim_timesteps:
            raise ValueError(
                f"num_ddim_timesteps must divide the teacher's {num_train_timesteps} training steps, "
                f"got {self.num_ddim_timesteps}."
            )
        if (self.discriminator is not None or self.fake_score is not None) and not self.sampling_timesteps:
            raise ValueError(
                "Adversarial and distribution-matching terms need the student's sampling_timesteps, where its fake "
                "digits come from."
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
        condition: dict[str, torch.Tensor] | None = None,
        null_condition: dict[str, torch.Tensor] | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:
        """The mean consistency loss of `model` on one batch, drawn as `DiffusionLoss` draws (exact resume, shards)."""
        device, size = clean_images.device, len(clean_images)
        part = slice(shard[0] * size, (shard[0] + 1) * size)
        noise = torch.randn((size * shard[1], *clean_images.shape[1:]), generator=generator, device=device)[part]
        index = torch.randint(0, self.num_ddim_timesteps, (size * shard[1],), generator=generator, device=device)[part]
        start = self.grid.to(device)[index]
        previous = (start - self.skip).clamp(min=0)
        condition = condition or {}
        noisy_images = self.scheduler.add_noise(clean_images, noise, start)
        inputs, timesteps = noisy_images, start
        judged = self.discriminator is not None or self.fake_score is not None
        if judged:
            chain, chain_timesteps = self.student_chain(model, clean_images, generator, shard)
            inputs, timesteps = torch.cat([noisy_images, chain]), torch.cat([start, chain_timesteps])
        output = model(inputs, timesteps, **condition).sample.float()  # one call: DDP allows one per backward
        prediction, _, _ = self.consistency(output[:size], noisy_images, start)
        with torch.no_grad():
            teacher_output = self.guided_teacher(noisy_images, start, condition)
            _, x_0, teacher_noise = self.consistency(teacher_output, noisy_images, start)
            # One DDIM step of the teacher, from the start point to the previous point on the grid.
            alphas_cumprod = self.scheduler.alphas_cumprod.to(device)[previous].view(-1, 1, 1, 1)
            previous_images = alphas_cumprod.sqrt() * x_0 + (1 - alphas_cumprod).sqrt() * teacher_noise
            target, _, _ = self.consistency(
                self.target(previous_images, previous, **condition).sample.float(), previous_images, previous
            )
        if self.huber_c is None:
            loss = F.mse_loss(prediction, target)
        else:
            loss = (torch.sqrt((prediction - target) ** 2 + self.huber_c**2) - self.huber_c).mean()
        if not judged:
            return loss
        fake = self.consistency(output[size:], chain, chain_timesteps)[1]
        if self.discriminator is not None:
            loss = loss + self.adversarial_loss(clean_images, fake)
        if self.fake_score is not None:
            loss = loss + self.distribution_matching_loss(fake, generator, shard)
        return loss

    def guided_teacher(self, sample: torch.Tensor, timesteps: torch.Tensor, condition: dict) -> torch.Tensor:
        """The teacher's prediction, autoguided at `guidance_scale` on the timesteps of `guidance_interval`."""
        output = self.teacher(sample, timesteps, **condition).sample.float()
        if self.guide is None or self.guidance_scale == 1:
            return output
        weak = self.guide(sample, timesteps, **condition).sample.float()
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

    def distribution_matching_loss(
        self, fake: torch.Tensor, generator: torch.Generator, shard: tuple[int, int]
    ) -> torch.Tensor:
        """The student's distribution-matching loss at `distribution_matching_weight` plus the fake score's
        denoising loss, on the student's digits `fake`."""
        digits = fake.detach()
        noisy, timesteps, fake_output, denoising = self.fake_score_denoising(digits, generator, shard)
        with torch.no_grad():
            real_x_0 = self.consistency(self.guided_teacher(noisy, timesteps, {}), noisy, timesteps)[1]
            fake_x_0 = self.consistency(fake_output.detach(), noisy, timesteps)[1]
            # DMD's normalisation: the step is relative to how far the teacher's digit is from the student's.
            scale = (digits - real_x_0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-4)
            gradient = (fake_x_0 - real_x_0) / scale
        matching = 0.5 * F.mse_loss(fake.float(), (fake - gradient).detach().float())
        return self.distribution_matching_weight * matching + denoising

    def fake_score_loss(
        self, model: torch.nn.Module, clean_images: torch.Tensor, generator: torch.Generator, shard: tuple[int, int]
    ) -> torch.Tensor:
        """The fake score's denoising loss alone, on fresh digits of the student's sampler: DMD2's extra fake-score
        updates between two of the student's, so that the fake score keeps up with it."""
        with torch.no_grad():
            chain, timesteps = self.student_chain(model, clean_images, generator, shard)
            fake = self.consistency(model(chain, timesteps).sample.float(), chain, timesteps)[1]
        return self.fake_score_denoising(fake, generator, shard)[3]

    def fake_score_denoising(self, digits: torch.Tensor, generator: torch.Generator, shard: tuple[int, int]) -> tuple:
        """`digits` noised to random timesteps, the timesteps, the fake score's output there and its denoising loss."""
        device, size = digits.device, len(digits)
        part = slice(shard[0] * size, (shard[0] + 1) * size)
        noise = torch.randn((size * shard[1], *digits.shape[1:]), generator=generator, device=device)[part]
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train_timesteps, (size * shard[1],), generator=generator, device=device)[part]
        noisy = self.scheduler.add_noise(digits, noise, timesteps)
        fake_output = self.fake_score(noisy, timesteps).sample.float()  # one call: DDP allows one per backward
        denoising = F.mse_loss(fake_output, DiffusionLoss(self.scheduler).target(digits, noise, timesteps))
        return noisy, timesteps, fake_output, denoising

    def adversarial_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The student's GAN loss at `adversarial_weight` plus the discriminator's own, on one batch."""
        module = getattr(self.discriminator, "module", self.discriminator)  # under DDP, its weights are the module's
        frozen = {name: p.detach() for name, p in module.named_parameters()}
        student = F.softplus(-functional_call(module, frozen, (fake,)).float()).mean()
        # One call on both halves: DDP allows one forward per backward.
        real_logits, fake_logits = self.discriminator(torch.cat([real, fake.detach()])).float().chunk(2)
        critic = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        return self.adversarial_weight * student + critic
