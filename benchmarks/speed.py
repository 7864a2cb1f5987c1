#!/usr/bin/env python
"""Training and sampling speed of this project against the way diffusers' example does them, side by side.

    python benchmarks/speed.py --dataset_name ylecun/mnist           # everything
    python benchmarks/speed.py --dataset_name ylecun/mnist --quick   # the two headline ratios

Training, images/s of whole optimizer steps (data, forward, backward, clipping, AdamW, EMA) on the default UNet:
  baseline  diffusers' examples/unconditional_image_generation/train_unconditional.py: PIL images through torchvision
            Compose([Resize, CenterCrop, ToTensor, Normalize]) per item in a DataLoader, fp32, stock attention, AdamW;
  ours      train_ddpm.py: slices of a uint8 tensor scaled on the fly, bf16 autocast where the hardware has it, the
            plain attention processor on CPU, foreach EMA;
  and, without --quick, one lever at a time on top of ours (fp32, stock attention, channels_last, torch.compile,
  fused AdamW, batch 256).
Sampling, images/s: the stock `DDPMPipeline` (50 steps, fp32) against this project's default way
(`mnist-diffusion sample`), with the same weights; and every shipped pipeline (--models) with the sampler and steps
`mnist-diffusion sample` gives it by default, as seconds per 10,000 digits.
Throughput is the median of several timed windows after a warm-up, the windows of the runs compared taking turns
and glibc told to keep freed memory (so that no run re-faults pages the others do not); memory is the peak (CUDA:
allocated; CPU: the process's resident set). It prints a table, `train_speedup: X` and `sample_speedup: Y`, and
writes a JSON.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import datasets
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler
from diffusers.training_utils import EMAModel
from machine import describe, write_result
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from pipeline import MNISTDiffusionPipeline, create_model_and_scheduler
from pipeline.data import load_images
from pipeline.sampling import (
    DEFAULT_SAMPLER,
    default_mixed_precision,
    digit_cycle,
    generate,
    load_pipeline,
    load_sampler,
    sampling_precision,
)
from pipeline.training import use_plain_attention

PRETRAINED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pretrained")
SHIPPED = sorted(
    os.path.join(PRETRAINED, name)
    for name in os.listdir(PRETRAINED)
    if os.path.isfile(os.path.join(PRETRAINED, name, "model_index.json"))
)
LEVERS = ["fp32", "stock attention", "channels_last", "torch.compile", "fused AdamW", "batch 256"]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size (VmHWM)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak memory since the last reset, in MiB (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    return None


def throughputs(
    steps: dict[str, Callable[[], int]], device: torch.device, warmup: dict[str, int], windows: int, calls: int
) -> dict[str, dict]:
    """Median images/s of each `steps[name]` (a callable returning its image count) over timed windows of `calls` calls.

    The windows of all steps take turns, so that drifts of a shared, noisy machine hit each of them alike."""
    for name, step in steps.items():
        for _ in range(warmup[name]):
            step()
    rates, peaks = {name: [] for name in steps}, dict.fromkeys(steps)
    for _ in range(windows):
        for name, step in steps.items():
            reset_peak_memory(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, images = time.perf_counter(), 0
            for _ in range(calls):
                images += step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(images / (time.perf_counter() - start))
            peak = peak_memory_mib(device)
            peaks[name] = max(peaks[name] or 0, peak) if peak is not None else None
    return {
        name: {"images_per_s": statistics.median(rates[name]), "windows": rates[name], "peak_memory_mib": peaks[name]}
        for name in steps
    }


def keep_freed_memory() -> None:
    """Stop glibc from handing freed memory back to the OS between steps (a no-op elsewhere).

    Otherwise each run's speed depends on the heap the runs before it left: the fp32 baseline, whose buffers are
    the largest, measured 79 images/s with two runs in the process and 138 with eight, from re-faulting its pages."""
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is None:
        return
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve buffers up to 1 GiB from the heap, not fresh mappings


def baseline_train_step(dataset_name: str, batch_size: int, device: torch.device, num_workers: int) -> Callable:
    """One optimizer step as diffusers' train_unconditional.py takes it."""
    dataset = datasets.load_dataset(dataset_name, split="train")
    augmentations = transforms.Compose(
        [
            transforms.Resize(28, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(28),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    dataset.set_transform(lambda examples: {"input": [augmentations(im.convert("L")) for im in examples["image"]]})
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True)
    torch.manual_seed(0)
    model, scheduler = create_model_and_scheduler()
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, power=3 / 4)
    ema.to(device)
    batches = iter(())

    def step() -> int:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        clean = batch["input"].to(device)
        noise = torch.randn_like(clean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), device=device)
        loss = F.mse_loss(
            model(scheduler.add_noise(clean, noise, t), t).sample, scheduler.get_velocity(clean, noise, t)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        return len(clean)

    return step


def our_train_step(images: torch.Tensor, batch_size: int, device: torch.device, lever: str | None) -> Callable:
    """One optimizer step as train_ddpm.py takes it, optionally with one lever changed."""
    torch.manual_seed(0)
    model, scheduler = create_model_and_scheduler()
    model.to(device).train()
    if lever != "stock attention":
        use_plain_attention(model, device)
    memory_format = torch.channels_last if lever == "channels_last" else torch.contiguous_format
    model.to(memory_format=memory_format)
    forward = torch.compile(model) if lever == "torch.compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if lever == "fused AdamW" else None)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, power=3 / 4, foreach=True)
    ema.to(device)
    precision = "no" if lever == "fp32" else default_mixed_precision()
    autocast = (
        torch.autocast(device.type, torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision != "no"
        else contextlib.nullcontext()
    )
    images = images.to(device)
    generator = torch.Generator().manual_seed(0)
    position, permutation = len(images), None

    def step() -> int:
        nonlocal position, permutation
        if position + batch_size > len(images):
            permutation, position = torch.randperm(len(images), generator=generator).to(device), 0
        clean = images[permutation[position : position + batch_size]].float() / 127.5 - 1
        clean = clean.contiguous(memory_format=memory_format)
        position += batch_size
        noise = torch.randn_like(clean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), device=device)
        with autocast:
            output = forward(scheduler.add_noise(clean, noise, t), t).sample
        loss = F.mse_loss(output.float(), scheduler.get_velocity(clean, noise, t))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return len(clean)

    return step


def flops_per_image() -> tuple[float, float, float]:
    """FLOPs of the default UNet for one 28x28 image: a training step, its convolutions alone, and one forward."""
    model, _ = create_model_and_scheduler()
    x, t = torch.randn(8, 1, 28, 28), torch.randint(0, 50, (8,))
    with FlopCounterMode(display=False) as counter:
        model(x, t).sample.sum().backward()
    train = counter.get_total_flops() / 8
    convolutions = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)) / 8
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return train, convolutions, counter.get_total_flops() / 8


def convolution_share(step: Callable[[], int], device: torch.device) -> float:
    """Fraction of a training step's time spent in convolutions, forward and backward (torch.profiler, 3 steps)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
    own_time = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    return sum(getattr(e, own_time) for e in events if "conv" in e.key) / sum(getattr(e, own_time) for e in events)


def main() -> None:
    """Measure, print the table and the two ratios, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Hub id or local copy of MNIST.")
    parser.add_argument("--model", default="pretrained/ddpm-mnist", help="Weights for the sampling comparison.")
    parser.add_argument("--train_batch_size", type=int, default=128)
    parser.add_argument("--sample_batch_size", type=int, default=125)
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="For the baseline's DataLoader.")
    parser.add_argument("--quick", action="store_true", help="Baseline and ours only, fewer windows.")
    parser.add_argument(
        "--models", nargs="*", default=SHIPPED, help="Pipelines timed with their default sampler: the shipped ones."
    )
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_memory()
    windows, steps = (3, 3) if args.quick else (5, 5)
    machine = describe(device)
    print(json.dumps(machine), flush=True)
    results = {
        "machine": machine,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": args.quick,
        "train": {},
        "sample": {},
    }

    started = time.perf_counter()
    images, _ = load_images(args.dataset_name)
    results["decode_dataset_s"] = time.perf_counter() - started
    runs = {"baseline": lambda: baseline_train_step(args.dataset_name, args.train_batch_size, device,
                                                    args.dataloader_num_workers),
            "ours": lambda: our_train_step(images, args.train_batch_size, device, None)}  # fmt: skip
    if not args.quick:
        for lever in LEVERS:
            batch = 256 if lever == "batch 256" else args.train_batch_size
            runs[f"ours + {lever}"] = lambda lever=lever, batch=batch: our_train_step(images, batch, device, lever)
    # torch.compile compiles in its first calls.
    warmup = {name: 6 if name == "ours + torch.compile" else 3 for name in runs}
    train_steps = {name: build() for name, build in runs.items()}
    results["train"] = throughputs(train_steps, device, warmup, windows, steps)
    for name, figures in results["train"].items():
        print(f"train  {name:<24} {figures['images_per_s']:8.1f} images/s", flush=True)

    # Sampling: the same weights, the stock pipeline against this project's default way.
    scheduler_name, num_steps = DEFAULT_SAMPLER
    ours = load_pipeline(args.model, scheduler_name)
    stock = DDPMPipeline(unet=ours.unet, scheduler=DDPMScheduler.from_config(ours.scheduler.config))
    stock.set_progress_bar_config(disable=True)
    batch = args.sample_batch_size

    def our_sampling() -> int:
        with sampling_precision(ours.device):
            return len(generate(ours, batch, 0, batch, num_steps, progress=False))

    label = f"ours: {scheduler_name}, {num_steps} steps, {default_mixed_precision()}"
    sampling = {
        "stock DDPMPipeline, 50 steps, fp32": lambda: len(
            stock(batch_size=batch, num_inference_steps=50, output_type="np").images
        ),
        label: our_sampling,
    }
    results["sample"] = throughputs(sampling, device, dict.fromkeys(sampling, 1), windows, 1)
    for name, figures in results["sample"].items():
        print(f"sample {name:<40} {figures['images_per_s']:8.1f} images/s", flush=True)

    # Every shipped model with the sampler and steps `mnist-diffusion sample` gives it by default.
    shipped = {}
    for model in args.models:
        pipe, sampler, num_steps = load_sampler(model)
        pipe.set_progress_bar_config(disable=True)
        labels = digit_cycle(batch) if pipe.conditioning != "none" else None

        def model_sampling(pipe: MNISTDiffusionPipeline = pipe, steps: int = num_steps, labels=labels) -> int:
            with sampling_precision(pipe.device):
                return len(generate(pipe, batch, 0, batch, steps, labels, progress=False))

        shipped[f"{os.path.basename(os.path.normpath(model))}: {sampler}, {num_steps} steps"] = model_sampling
    results["shipped"] = throughputs(shipped, device, dict.fromkeys(shipped, 1), windows, 1)
    for figures in results["shipped"].values():
        figures["seconds_per_10000"] = 10000 / figures["images_per_s"]

    train_flops, convolution_flops, forward_flops = flops_per_image()
    share = convolution_share(train_steps["ours"], device)
    peak_dtype = "bf16" if default_mixed_precision() == "bf16" else "fp32"  # the precision ours trains in
    peak = 1e12 * machine["matmul_tflops"][peak_dtype]
    ours_train = results["train"]["ours"]["images_per_s"]
    results.update(
        train_gflop_per_image=train_flops / 1e9,
        forward_gflop_per_image=forward_flops / 1e9,
        peak_dtype=peak_dtype,
        train_fraction_of_peak=ours_train * train_flops / peak,
        # Convolutions are nearly all the FLOPs: their speed bounds ours even if everything else took no time.
        convolution_share_of_train_time=share,
        convolution_fraction_of_peak=ours_train * convolution_flops / share / peak,
        train_speedup_if_only_convolutions=ours_train / share / results["train"]["baseline"]["images_per_s"],
        train_speedup=ours_train / results["train"]["baseline"]["images_per_s"],
        sample_speedup=results["sample"][label]["images_per_s"]
        / results["sample"]["stock DDPMPipeline, 50 steps, fp32"]["images_per_s"],
    )

    print(f"\n{results['device']}, {results['threads']} threads, torch {results['torch']}")
    print("| what | images/s | x baseline | peak memory (MiB) |\n| --- | --- | --- | --- |")
    for kind, reference in (("train", "baseline"), ("sample", "stock DDPMPipeline, 50 steps, fp32")):
        for name, figures in results[kind].items():
            memory = f"{figures['peak_memory_mib']:.0f}" if figures["peak_memory_mib"] else "-"
            ratio = figures["images_per_s"] / results[kind][reference]["images_per_s"]
            print(f"| {kind}: {name} | {figures['images_per_s']:.1f} | {ratio:.2f} | {memory} |")
    print("\n| shipped model: default sampler | seconds per 10,000 digits | digits/s |\n| --- | --- | --- |")
    for name, figures in results["shipped"].items():
        print(f"| {name} | {figures['seconds_per_10000']:.0f} | {figures['images_per_s']:.1f} |")
    print(f"\nUNet: {train_flops / 1e9:.2f} GFLOP per image per training step, {forward_flops / 1e9:.2f} per forward")
    print("matmul peak: " + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in machine["matmul_tflops"].items() if v))
    print(f"ours trains at {results['train_fraction_of_peak']:.0%} of the {peak_dtype} matmul peak")
    print(
        f"convolutions take {share:.0%} of ours' step, at {results['convolution_fraction_of_peak']:.0%} of the "
        f"{peak_dtype} peak; with all else free, ours would be {results['train_speedup_if_only_convolutions']:.2f}x the baseline"
    )
    print(f"train_speedup: {results['train_speedup']:.2f}")
    print(f"sample_speedup: {results['sample_speedup']:.2f}")
    write_result(results, args.out)


if __name__ == "__main__":
    main()
