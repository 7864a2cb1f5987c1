"""Sampling as the command line, training, evaluation and the benchmarks do it: samplers, precision, loading, batches."""

import contextlib
import functools
import multiprocessing
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from accelerate.utils import parse_flag_from_env
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, LCMScheduler, SchedulerMixin
from huggingface_hub import constants, try_to_load_from_cache
from PIL import Image
from tqdm.auto import tqdm

from .captions import EXAMPLE_PROMPT, NUMBER_WORDS
from .data import looks_like_path
from .model import NUM_CLASSES
from .pipeline_mnist_diffusion import MNISTDiffusionPipeline, scales_noise

# The samplers `--scheduler` offers: a diffusers class and the settings that differ from its defaults.
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    # DDIM (eta = 0) as first-order DPM-Solver++, the same update (Lu et al. 2022): it takes any step count, where
    # diffusers' DDIMScheduler steps by 50 // n and misses pure noise unless n divides 50.
    "ddim": (DPMSolverMultistepScheduler, {"solver_order": 1, "algorithm_type": "dpmsolver++"}),
    # Uniform steps in log-SNR, DPM-Solver's own recommendation: more steps at low noise, where strokes are refined.
    "dpm++": (DPMSolverMultistepScheduler, {"use_lu_lambdas": True}),
    "dpm++sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "use_lu_lambdas": True}),
    # The few-step sampler of consistency-distilled models (`train_distill.py`).
    "lcm": (LCMScheduler, {}),
}
# How `sample` and `evaluate` generate by default: the fastest setting that matches 50 ancestral steps (docs/speed.md).
DEFAULT_SAMPLER = ("dpm++sde", 20)


def image_grid(images: np.ndarray, nrow: int = 8, scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile `(N, H, W)` uint8 images into one grayscale PIL grid, upscaled with nearest neighbour (never blurred)."""
    n, h, w = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    return Image.fromarray(grid, mode="L").resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline `np` output `(N, H, W, 1)` in [0, 1] to `(N, H, W)` uint8, MNIST's own format."""
    return (images[..., 0] * 255).round().astype(np.uint8)


def default_sampler(pipe: MNISTDiffusionPipeline) -> tuple[str, int]:
    """The sampler and steps a model gets unless told: a distilled model's own (LCM, in its few steps), else
    DEFAULT_SAMPLER."""
    if isinstance(pipe.scheduler, LCMScheduler):
        return "lcm", pipe.default_num_inference_steps
    return DEFAULT_SAMPLER


def with_sampler(pipe: MNISTDiffusionPipeline, name: str) -> MNISTDiffusionPipeline:
    """A pipeline of its own (the components shared, the sampling settings kept) sampling with one of SCHEDULERS, so
    that swapping the sampler never touches `pipe`."""
    sampler = MNISTDiffusionPipeline(
        **{**pipe.components, "scheduler": make_scheduler(name, pipe.scheduler.config)},
        default_num_inference_steps=pipe.config.get("default_num_inference_steps"),
        guidance_interval=pipe.config.get("guidance_interval"),
        noise_scale=pipe.config.get("noise_scale"),
    )
    sampler.set_progress_bar_config(disable=True)
    return sampler


def with_default_sampler(pipe: MNISTDiffusionPipeline) -> tuple[MNISTDiffusionPipeline, str, int]:
    """`with_sampler` for the model's default sampler, its name and its steps: how `mnist-diffusion` samples, scores
    and draws pictures of a model unless told otherwise."""
    name, steps = default_sampler(pipe)
    return with_sampler(pipe, name), name, steps


def sampler_settings(pipe: MNISTDiffusionPipeline, scheduler: str | None, steps: int | None) -> tuple[str, int]:
    """The sampler and steps to use: those asked for, else the model's (`default_sampler`); a sampler asked for without
    steps takes its usual count (the training steps for ddpm, else DEFAULT_SAMPLER's)."""
    name, default_steps = default_sampler(pipe)
    if scheduler is not None and scheduler != name:
        name = scheduler
        default_steps = pipe.scheduler.config.num_train_timesteps if scheduler == "ddpm" else DEFAULT_SAMPLER[1]
    return name, steps or default_steps


def make_scheduler(name: str, config: dict, custom_timesteps: bool = False) -> SchedulerMixin:
    """One of SCHEDULERS, built from a model's scheduler config, starting from pure noise whatever the config says;
    for `custom_timesteps`, without its own spacing of the steps (diffusers takes one or the other)."""
    cls, settings = SCHEDULERS[name]
    if custom_timesteps:
        settings = {k: v for k, v in settings.items() if k != "use_lu_lambdas"}
    # Models saved with diffusers' default "leading" spacing would start fast samplers short of pure noise.
    return cls.from_config(config, timestep_spacing="trailing", **settings)


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags, where the system lists them (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (Ampere+ GPUs, CPUs with AVX512-BF16 or AMX); elsewhere torch emulates
    it, several times slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    flags = cpu_flags()
    if flags is None:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # Not oneDNN's own answer: it also says yes for AVX512 without BF16, where a bf16 matmul is 4x slower than fp32.
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_mixed_precision() -> str:
    """bf16 where the device that training would use runs it natively, else no."""
    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        device = torch.device("cuda")
    else:
        device = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return "bf16" if native_bf16(device) else "no"


def sampling_precision(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast for sampling where `device` has it ("auto") or when asked ("bf16"); else nothing."""
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(
            f"This {device.type} has no native bf16 (a CPU needs AVX512-BF16 or AMX): torch emulates it, several "
            "times slower than fp32. Use --precision auto or fp32.",
            stacklevel=2,
        )
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext()


def load_pipeline(model: str, scheduler: str | None = None, flag: str = "--model") -> MNISTDiffusionPipeline:
    """A saved pipeline from a folder or the Hub, on the GPU if there is one, with an optional sampler swapped in;
    what cannot be loaded is one error naming the `flag` it came from and what to do."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(
                f"{flag} {model} is not a saved pipeline (it has no model_index.json); train one with train_ddpm.py."
            )
    elif looks_like_path(model):
        raise FileNotFoundError(f"{flag} {model}: no such folder.")
    elif constants.HF_HUB_OFFLINE and try_to_load_from_cache(model, "model_index.json") is None:
        raise ValueError(
            f"{flag} {model}: no such folder, and no cached copy of that Hub id while HF_HUB_OFFLINE is set: load it "
            "once with the network on, or pass a local folder."
        )
    try:  # safetensors only: a folder without them must not fall back to unpickling .bin files
        pipe = MNISTDiffusionPipeline.from_pretrained(model, use_safetensors=True)
    except (OSError, ValueError) as e:  # diffusers' own text points at a stack trace the user does not see
        cause = str(e).splitlines()[0].split(" (")[0].split(". If you want")[0]
        if os.path.isdir(model):
            raise ValueError(
                f"{flag} {model}: a part of the saved pipeline is missing or damaged ({cause}). Copy or download the "
                "folder again, or train it again."
            ) from e
        raise ValueError(
            f"{flag} {model}: could not load it from the Hub ({cause}). Check the id and the network, or pass a "
            "local folder."
        ) from e
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def load_sampler(
    model: str,
    scheduler: str | None = None,
    steps: int | None = None,
    noise_scale: float | None = None,
    timesteps: list[int] | None = None,
) -> tuple[MNISTDiffusionPipeline, str, int]:
    """A saved pipeline with the sampler asked for swapped in (default: its own choice, `sampler_settings`), set up
    for custom `timesteps` if given, and its noise scale if given (default: the folder's), the sampler's name and the
    steps to take."""
    if timesteps is not None and steps is not None:
        raise ValueError("Give --timesteps or --num_inference_steps, not both: the timesteps set the step count.")
    pipe = load_pipeline(model)
    name, steps = sampler_settings(pipe, scheduler, len(timesteps) if timesteps else steps)
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config, custom_timesteps=timesteps is not None)
    if noise_scale is not None:
        if not scales_noise(pipe.scheduler):
            raise ValueError(f"A noise scale is for the stochastic samplers (lcm, dpm++sde), not {name}.")
        pipe.register_to_config(noise_scale=noise_scale)
    return pipe, name, steps


def digit_cycle(n: int) -> np.ndarray:
    """The labels 0, 1, ..., 9, 0, 1, ... that conditional models are asked for when scored or shown."""
    return np.arange(n) % NUM_CLASSES


def generate_batch(
    pipe: MNISTDiffusionPipeline,
    seeds: range,
    num_inference_steps: int | None = None,
    labels: list[int] | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float = 2.0,
    timesteps: list[int] | None = None,
    clip_guidance: dict | None = None,
    callback_on_step_end: Callable[[MNISTDiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
) -> np.ndarray:
    """One uint8 `(B, 28, 28)` batch: digit i from seed `seeds[i]`, asked to be `labels[i]` if given, on the
    sampler's own grid of `num_inference_steps` or on custom `timesteps`; `clip_guidance`: the pipeline's
    `clip_model`, `clip_tokenizer` and `clip_guidance_scale`."""
    device = pipe.device  # once: diffusers' `device` walks every module, which per seed slowed few-step batches
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    condition = {"prompt": prompt, "negative_prompt": negative_prompt} if prompt is not None else {}
    if labels is not None:
        if pipe.conditioning == "text":
            condition["prompt"] = [EXAMPLE_PROMPT.format(NUMBER_WORDS[label]) for label in labels]
        else:
            condition["class_labels"] = labels
    output = pipe(
        batch_size=len(generators),
        generator=generators,
        num_inference_steps=num_inference_steps,
        timesteps=timesteps,
        output_type="np",
        guidance_scale=guidance_scale,
        callback_on_step_end=callback_on_step_end,
        **condition,
        **(clip_guidance or {}),
    )
    if not np.isfinite(output.images).all():
        raise ValueError(
            f"{type(pipe).__name__} drew digits that are not finite numbers (NaN or inf): the model's weights hold "
            "them, or the guidance overflowed. Nothing was written; check the model folder, or sample with "
            "--guidance_scale 1."
        )
    return to_uint8(output.images)


_worker_pipe: MNISTDiffusionPipeline | None = None  # a sampling process's copy of the pipeline
_worker_autocast: torch.dtype | None = None


def _start_worker(pipe: MNISTDiffusionPipeline, autocast: torch.dtype | None, threads: int) -> None:
    """Set up a sampling process: its share of the threads, the pipeline (progress bar off) and the caller's autocast."""
    global _worker_pipe, _worker_autocast
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it keeps the batches done
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which a stopped worker would leak
    torch.set_num_threads(threads)
    _worker_pipe, _worker_autocast = pipe, autocast


def _worker_batch(job: tuple) -> np.ndarray:
    """`generate_batch` in a sampling process."""
    precision = torch.autocast("cpu", _worker_autocast) if _worker_autocast else contextlib.nullcontext()
    with precision:
        return generate_batch(_worker_pipe, *job)


def generate_batches(
    pipe: MNISTDiffusionPipeline,
    num_images: int,
    seed: int,
    batch_size: int,
    num_inference_steps: int | None = None,
    labels: np.ndarray | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float = 2.0,
    timesteps: list[int] | None = None,
    progress: bool = True,
    callback_on_step_end: Callable[[MNISTDiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
    num_processes: int = 1,
    clip_guidance: dict | None = None,
) -> Iterator[np.ndarray]:
    """`num_images` digits as uint8 `(B, 28, 28)` batches, in order; digit i comes from seed + i, whatever the batch
    size or the number of processes.

    Digit i is asked to be `labels[i]` (a class label, or a prompt about it for text models) or `prompt`;
    `callback_on_step_end` goes to the pipeline, as in diffusers. With `num_processes` > 1 (CPU only), the batches are
    drawn by that many processes, each with its share of torch's threads, under the caller's bf16 autocast if any."""
    if num_processes > 1 and (pipe.device.type != "cpu" or callback_on_step_end is not None):
        raise ValueError("Sampling in several processes is for the CPU, without a callback; use num_processes=1.")
    pipe.set_progress_bar_config(disable=True)
    jobs = (
        (
            range(seed + start, seed + min(start + batch_size, num_images)),
            num_inference_steps,
            None if labels is None else labels[start : start + batch_size].tolist(),
            prompt,
            negative_prompt,
            guidance_scale,
            timesteps,
            clip_guidance,
        )
        for start in range(0, num_images, batch_size)
    )
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=num_images, desc="Sampling", unit="img", disable=not progress))
        if num_processes == 1:
            batches = (generate_batch(pipe, *job, callback_on_step_end) for job in jobs)
        else:
            # Two 1-thread processes draw digits faster than one 2-thread process (docs/speed.md); spawn, as forked
            # OpenMP thread pools can hang.
            autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            threads = max(1, torch.get_num_threads() // num_processes)
            pool = multiprocessing.get_context("spawn").Pool(
                num_processes, initializer=_start_worker, initargs=(pipe, autocast, threads)
            )
            stack.callback(pool.join)
            stack.callback(pool.terminate)  # first: on Ctrl-C the workers stop at once
            batches = pool.imap(_worker_batch, jobs)
        for batch in batches:
            bar.update(len(batch))
            yield batch


def generate(pipe: MNISTDiffusionPipeline, num_images: int, seed: int, batch_size: int, *args, **kwargs) -> np.ndarray:
    """All of `generate_batches` at once: `(num_images, 28, 28)` uint8."""
    return np.concatenate(list(generate_batches(pipe, num_images, seed, batch_size, *args, **kwargs)))
