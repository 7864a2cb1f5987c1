"""The pictures: forward (noising) and backward (denoising) strips, the noise schedule, a denoising animation, and the
training curves of a run.

Time is shown as in Ho et al.: t = 0 is the clean digit and t = T (50) pure noise. diffusers counts the same
noise levels as timesteps 0 ... T-1, so picture time t is diffusers timestep t - 1.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from PIL import Image  # noqa: E402

from .pipeline_mnist_diffusion import MNISTDiffusionPipeline  # noqa: E402
from .sampling import image_grid  # noqa: E402


def evenly_spaced_times(num_train_timesteps: int, num_frames: int) -> list[int]:
    """`num_frames` picture times from 0 to T inclusive, e.g. 0, 5, ..., 50."""
    return sorted({round(i * num_train_timesteps / (num_frames - 1)) for i in range(num_frames)})


def forward_frames(
    scheduler: DDPMScheduler, digits: torch.Tensor, times: list[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise uint8 digits `(N, 1, H, W)` to each picture time with `scheduler.add_noise` (one noise draw per digit,
    as training sees it); returns `(N, len(times), H, W)` in model space ([-1, 1] for t = 0)."""
    clean = digits.float() / 127.5 - 1
    noise = randn_tensor(clean.shape, generator=generator)
    frames = [
        clean if t == 0 else scheduler.add_noise(clean, noise, torch.full((len(clean),), t - 1, dtype=torch.long))
        for t in times
    ]
    return torch.stack(frames, dim=1)[:, :, 0]


def backward_frames(
    pipe: MNISTDiffusionPipeline, seeds: list[int], times: list[int]
) -> tuple[torch.Tensor, np.ndarray]:
    """Denoise one digit per seed, keeping x_t at each picture time; returns `(N, len(times), H, W)` in model space,
    newest (t = 0) last, and the pipeline's own output `(N, H, W, 1)` in [0, 1]."""
    T = pipe.scheduler.config.num_train_timesteps
    generators = [torch.Generator(pipe.device).manual_seed(seed) for seed in seeds]
    unet = pipe.unet.config
    shape = (len(seeds), unet.in_channels, unet.sample_size, unet.sample_size)
    # The same draw the pipeline makes for its starting noise; it then goes on with the same generators.
    latents = randn_tensor(shape, generator=generators, device=pipe.device)
    kept = {T: latents[:, 0].float().cpu()}

    def keep(pipeline: MNISTDiffusionPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        if int(t) in times:  # after denoising diffusers timestep t the image is at picture time t
            kept[int(t)] = tensors["latents"][:, 0].float().cpu()
        return {}

    output = pipe(
        batch_size=len(seeds),
        generator=generators,
        latents=latents,
        num_inference_steps=T,
        output_type="np",
        callback_on_step_end=keep,
    ).images
    return torch.stack([kept[t] for t in sorted(times, reverse=True)], dim=1), output


def strip_figure(frames: torch.Tensor, times: list[int], title: str, scale: float = 0.9) -> plt.Figure:
    """Rows of 28x28 frames, white on black, one column per picture time titled with t; never interpolated."""
    rows, cols = frames.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * scale + 0.6), squeeze=False, facecolor="black")
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            # Model space [-1, 1] shown as MNIST pixels; noise beyond that range saturates, as it would in a PNG.
            ax.imshow(frames[r, c].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
            if r == 0:
                ax.set_title(f"t={times[c]}", color="white", fontsize=9)
    fig.suptitle(title, color="white", fontsize=11)
    fig.tight_layout(pad=0.3)
    return fig


def schedule_figure(scheduler: DDPMScheduler) -> plt.Figure:
    """alphas_cumprod and the image (sqrt(alpha_bar)) and noise (sqrt(1 - alpha_bar)) scales against picture time."""
    alpha_bar = torch.cat([torch.ones(1), scheduler.alphas_cumprod.float()]).numpy()
    t = np.arange(len(alpha_bar))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(t, alpha_bar, label=r"$\bar\alpha_t$")
    ax.plot(t, np.sqrt(alpha_bar), label=r"image scale $\sqrt{\bar\alpha_t}$")
    ax.plot(t, np.sqrt(1 - alpha_bar), label=r"noise scale $\sqrt{1-\bar\alpha_t}$")
    ax.set_xlabel("t")
    ax.set_xlim(0, t[-1])
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    schedule = scheduler.config.beta_schedule
    ax.set_title(f"{schedule}, T = {t[-1]}: " + r"$\bar\alpha_T$" + f" = {alpha_bar[-1]:.1e}")
    fig.tight_layout()
    return fig


def latents_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-space images `(N, 1, H, W)` in [-1, 1] as `(N, H, W)` uint8 pixels, rounded as the pipeline rounds."""
    return ((x[:, 0].float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def animation_frames(pipe: MNISTDiffusionPipeline, num_images: int, seed: int, scale: int = 4) -> list[Image.Image]:
    """One grid image per denoising step (pure noise first, digits last) for an animated GIF."""
    generator = torch.Generator().manual_seed(seed)
    grids = []

    def to_grid(x: torch.Tensor) -> Image.Image:
        return image_grid(latents_to_uint8(x), nrow=int(np.ceil(np.sqrt(num_images))), scale=scale)

    unet = pipe.unet.config
    latents = randn_tensor(
        (num_images, unet.in_channels, unet.sample_size, unet.sample_size),
        generator=generator,
        device=pipe.device,
    )
    grids.append(to_grid(latents))
    pipe(
        batch_size=num_images,
        generator=generator,
        latents=latents,
        output_type="np",
        callback_on_step_end=lambda p, i, t, tensors: grids.append(to_grid(tensors["latents"])) or {},
    )
    return grids


def training_figure(run_dir: str, reference_fid: dict[str, float] | None = None) -> plt.Figure:
    """Training loss against step (TensorBoard logs) and, if the run evaluated (`--eval_epochs`), FID against
    training minutes, with optional reference levels such as {"original model": 74.8}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = [os.path.join(root) for root, _, files in os.walk(run_dir) if any("tfevents" in f for f in files)]
    if not logs:
        raise ValueError(f"{run_dir} holds no TensorBoard logs; train with --logger tensorboard.")
    losses = {}
    for log in logs:  # a resumed run writes several event files; later steps win
        events = EventAccumulator(log, size_guidance={"scalars": 0})
        events.Reload()
        if "loss" in events.Tags()["scalars"]:
            losses.update({e.step: e.value for e in events.Scalars("loss")})
    evaluations = []
    if os.path.isfile(os.path.join(run_dir, "eval.jsonl")):
        with open(os.path.join(run_dir, "eval.jsonl")) as f:
            evaluations = [json.loads(line) for line in f if line.strip()]
    fig, axes = plt.subplots(1, 2 if evaluations else 1, figsize=(11 if evaluations else 6, 3.6), squeeze=False)
    steps = np.array(sorted(losses))
    values = np.array([losses[s] for s in steps])
    window = max(1, len(values) // 50)  # a moving average shows the trend through the per-batch noise
    axes[0, 0].plot(steps, values, alpha=0.3, lw=0.8, label="per step")
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    axes[0, 0].plot(steps[window - 1 :], smooth, label=f"mean of {window}")
    axes[0, 0].set(xlabel="step", ylabel="loss", yscale="log", title="Training loss")
    axes[0, 0].legend()
    axes[0, 0].grid(alpha=0.3)
    if evaluations:
        ax = axes[0, 1]
        ax.plot([e["train_minutes"] for e in evaluations], [e["fid"] for e in evaluations], "o-", label="this run")
        for name, fid in (reference_fid or {}).items():
            ax.axhline(fid, ls="--", color="gray", lw=1)
            ax.text(0, fid, f" {name}", va="bottom", fontsize=8, color="gray")
        ax.set(xlabel="training minutes", ylabel="FID (classifier features)", yscale="log", xlim=(0, None))
        ax.set_title(f"FID on {evaluations[-1]['num_samples']} samples against training time")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
