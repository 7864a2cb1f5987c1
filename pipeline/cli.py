"""`mnist-diffusion`: sample digits and draw the diffusion pictures from any trained pipeline, without writing Python."""

import argparse
import ast
import json
import os
import re
import signal
import sys
import tempfile
import zipfile

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from PIL import Image

from .card import save_pipeline
from .clip import CLIP_GUIDANCE_SCALE, load_clip
from .pipeline_mnist_diffusion import MNISTDiffusionPipeline
from .sampling import (
    DEFAULT_SAMPLER,
    SCHEDULERS,
    digit_cycle,
    generate_batches,
    image_grid,
    load_pipeline,
    load_sampler,
    sampling_precision,
)


def positive_int(text: str) -> int:
    """argparse type for counts: a clear error for 0 or less."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type for scales: a clear error for 0 or less."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def writable(path: str) -> str:
    """Create the folder of an output file and try the file itself, or fail with a one-line error before any work is
    done (a folder's permissions do not say whether a file can be written there, e.g. under /proc)."""
    if os.path.isdir(path):
        raise ValueError(f"Cannot write {path}: it is a folder; give a file name.")
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ValueError(f"Cannot write {path}: {e.strerror} ({e.filename}).") from e
    if not existed:
        os.remove(path)
    return path


def check_sample_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written as asked, before any digit is drawn."""
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out}: name the grid with an image extension, e.g. {args.out}.png.")
    if args.npz and (os.path.isdir(args.npz) or not args.npz.endswith(".npz")):
        raise ValueError(f"--npz {args.npz}: give a file name ending in .npz, e.g. digits.npz.")
    if args.images_dir and os.path.exists(args.images_dir) and not os.path.isdir(args.images_dir):
        raise ValueError(f"--images_dir {args.images_dir} is a file; give a folder.")
    for path in (args.out, args.npz, args.images_dir and os.path.join(args.images_dir, "00000.png")):
        if path:
            writable(path)


def load_clip_guidance(args: argparse.Namespace) -> dict | None:
    """The pipeline's CLIP-guidance arguments from --clip_model and --clip_guidance_scale (None without a CLIP)."""
    if args.clip_model is None:
        return None
    if args.prompt is None:
        raise ValueError("--clip_model guides the digits toward --prompt: give one, e.g. --prompt 'a thin seven'.")
    model, tokenizer = load_clip(args.clip_model)
    return {
        "clip_model": model,
        "clip_tokenizer": tokenizer,
        "clip_guidance_scale": args.clip_guidance_scale,
    }


def sample(args: argparse.Namespace) -> None:
    """Write a grid PNG of generated digits, and optionally each digit as a PNG and all of them as an .npz."""
    check_sample_outputs(args)
    pipe, args.scheduler, steps = load_sampler(
        args.model, args.scheduler, args.num_inference_steps, args.noise_scale, args.timesteps
    )
    labels = np.resize(args.class_labels, args.num_images) if args.class_labels else None
    print(
        f"Sampling {args.num_images:,} digits ({args.num_images * 28 * 28 / 2**20:,.0f} MiB); Ctrl-C keeps those done."
    )
    batches = []
    try:
        with sampling_precision(pipe.device, args.precision):
            for batch in generate_batches(
                pipe, args.num_images, args.seed, args.batch_size, steps, labels, args.prompt,
                args.negative_prompt, args.guidance_scale, args.timesteps, num_processes=args.num_processes,
                clip_guidance=load_clip_guidance(args),
            ):  # fmt: skip
                batches.append(batch)
    except KeyboardInterrupt:
        if not batches:
            raise ValueError("Interrupted before the first batch was done; nothing written.") from None
        print(f"Interrupted: writing the {sum(map(len, batches))} digits done.")
    digits = np.concatenate(batches)
    # The arrays first: if a picture then fails to write (a disk filling up), the digits are kept.
    if args.npz:
        np.savez_compressed(args.npz, images=digits, seeds=np.arange(args.seed, args.seed + len(digits)))
    try:
        image_grid(digits, nrow=args.nrow, scale=args.scale).save(args.out)
        if args.images_dir:
            os.makedirs(args.images_dir, exist_ok=True)
            for i, digit in enumerate(digits):
                image_grid(digit[None], nrow=1, scale=1, pad=0).save(os.path.join(args.images_dir, f"{i:05d}.png"))
    except OSError as e:
        kept = f"the digits are in {args.npz}" if args.npz else "rerun with --npz FILE to keep the digits apart"
        raise ValueError(f"Could not write the pictures ({e.strerror or e}); {kept}.") from e
    print(f"Wrote {len(digits)} digits to {args.out}" + (f" and {args.npz}" if args.npz else ""))


def read_digits(path: str) -> np.ndarray:
    """uint8 digits `(N, 28, 28)` from an .npy, an .npz (key 'images') or a folder of PNGs; float arrays in [0, 1]
    (the pipeline's "np" output) or in [0, 255] are scaled by their range."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(".png"))
        if not files:
            raise ValueError(f"--samples {path}: the folder holds no .png files.")
        digits = np.stack([np.asarray(Image.open(os.path.join(path, f)).convert("L")) for f in files])
    elif path.endswith((".npy", ".npz")) and os.path.isfile(path):
        try:
            digits = np.load(path)
            if path.endswith(".npz"):
                if "images" not in digits:
                    raise ValueError(f"--samples {path}: the .npz holds {list(digits)}, not the key 'images'.")
                digits = digits["images"]
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"--samples {path}: not a readable {os.path.splitext(path)[1]} file ({e}).") from e
    else:
        raise FileNotFoundError(f"--samples {path}: no such .npy or .npz file or folder of PNGs.")
    if digits.ndim == 2:
        digits = digits[None]
    if digits.ndim == 4 and digits.shape[3] == 1:  # (N, 28, 28, 1), the pipeline's "np" layout
        digits = digits[..., 0]
    elif digits.ndim == 4 and digits.shape[1] == 1:  # (N, 1, 28, 28), its "pt" layout
        digits = digits[:, 0]
    if digits.ndim != 3 or digits.shape[1:] != (28, 28):
        raise ValueError(f"--samples {path}: expected (N, 28, 28) digits, got shape {digits.shape}.")
    if digits.dtype == np.uint8:
        return digits
    if digits.size and (not np.isfinite(digits).all() or digits.min() < 0 or digits.max() > 255):
        raise ValueError(f"--samples {path}: pixel values must lie in [0, 1] or [0, 255].")
    scale = 255 if np.issubdtype(digits.dtype, np.floating) and digits.size and digits.max() <= 1 else 1
    return (digits.astype(np.float64) * scale).round().astype(np.uint8)


def card_values(folder: str, section: str) -> dict | None:
    """The values a table section of a folder's model card lists ("Training settings", "Results"; None if it lists
    none), as Python values where they parse."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().partition(f"## {section}\n")[2].partition("\n## ")[0]
    values = {}
    for key, value in re.findall(r"^\| (\w+) \| `(.*)` \|$", text, re.MULTILINE):
        try:
            values[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            values[key] = value  # a string, written without quotes
    return values or None


def resave(args: argparse.Namespace) -> None:
    """Re-save a pipeline folder with this package's code: module file, scheduler config, sample grid and card.

    The card keeps its training settings and results; an `eval.json` in the folder (`mnist-diffusion evaluate --out
    FOLDER/eval.json`) replaces the results' evaluation."""
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise ValueError(f"--model {args.model} is not a saved pipeline folder (it has no model_index.json).")
    training_args = card_values(args.model, "Training settings")
    results = card_values(args.model, "Results") or {}
    evaluation_file = os.path.join(args.model, "eval.json")
    if os.path.isfile(evaluation_file):
        from .evaluate import evaluation_results

        with open(evaluation_file) as f:
            results.update(evaluation_results(json.load(f)))
    pipe = MNISTDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe, *pipe.components.values()):  # where it was loaded from is no part of what is saved
        if hasattr(part, "_internal_dict"):
            part._internal_dict = FrozenDict({k: v for k, v in part.config.items() if k != "_name_or_path"})
    # Trailing spacing: every sampler swapped in with `from_config` starts from pure noise.
    pipe.scheduler.register_to_config(timestep_spacing="trailing")
    if args.guidance_interval is not None:
        pipe.register_to_config(guidance_interval=list(args.guidance_interval))
    if args.noise_scale is not None:  # every folder's default sampler takes it (lcm, dpm++sde)
        pipe.register_to_config(noise_scale=args.noise_scale)
    if args.dataset_name is not None:
        training_args = {**(training_args or {}), "dataset_name": args.dataset_name}
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.model))) as tmp:
        save_pipeline(pipe, tmp, training_args=training_args, results=results or None)
        del pipe  # its weights may be memory-mapped from the files about to be replaced
        for root, _, files in os.walk(tmp):
            for name in files:
                target = os.path.join(args.model, os.path.relpath(os.path.join(root, name), tmp))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(os.path.join(root, name), target)
    print(f"Re-saved {args.model} with this version's module file, scheduler config, samples and card.")


def evaluate(args: argparse.Namespace) -> None:
    """Score generated digits against the real test set and print a table (and write JSON)."""
    from .evaluate import MAX_ENTROPY, MAX_SAMPLES, MIN_SAMPLES, evaluate_digits, reference_features

    if args.out:
        writable(args.out)
    if (args.model is None) == (args.samples is None):
        raise ValueError("Give exactly one of --model (to generate digits) or --samples (digits made elsewhere).")
    if args.model and not MIN_SAMPLES <= args.num_samples <= MAX_SAMPLES:
        raise ValueError(
            f"--num_samples must be {MIN_SAMPLES} to {MAX_SAMPLES:,}, got {args.num_samples:,}: the scores need "
            "a few digits, and compare every pair of them, so time and memory grow with its square (10,000 is usual)."
        )
    labels = None
    if args.samples:
        digits = read_digits(args.samples)
    else:
        pipe, args.scheduler, steps = load_sampler(
            args.model, args.scheduler, args.num_inference_steps, args.noise_scale, args.timesteps
        )
        # A conditional model is asked for 0..9 in turn, and scored on whether it drew what was asked.
        labels = digit_cycle(args.num_samples) if pipe.conditioning != "none" else None
        batches = []
        try:
            with sampling_precision(pipe.device, args.precision):
                for batch in generate_batches(
                    pipe, args.num_samples, args.seed, args.batch_size, steps, labels,
                    guidance_scale=args.guidance_scale, timesteps=args.timesteps, num_processes=args.num_processes,
                ):  # fmt: skip
                    batches.append(batch)
        except KeyboardInterrupt:
            done = sum(map(len, batches))
            if done < MIN_SAMPLES:
                raise ValueError(f"Interrupted after {done} digits, too few to score; nothing written.") from None
            print(f"Interrupted: scoring the {done:,} digits done.")
        digits = np.concatenate(batches)
        labels = None if labels is None else labels[: len(digits)]
    results = evaluate_digits(digits, reference_features(args.dataset_name, args.split), labels)
    if args.model:
        results.update(
            scheduler=args.scheduler,
            steps=steps,
            timesteps=args.timesteps,
            sampling_precision=args.precision,
            noise_scale=pipe.default_noise_scale,
        )
    results.update(model=args.model, samples=args.samples)
    if args.model and (labels is not None or pipe.guide_unet is not None):
        results["guidance_scale"] = args.guidance_scale
    print(f"{'metric':<16}{'value':>10}")
    for key in ("num_samples", "fid", "kid", "precision", "recall", "confidence", "class_entropy", "label_accuracy"):
        if key in results:
            print(f"{key:<16}{results[key]:>10.4g}")
    print(f"{'(uniform)':<16}{MAX_ENTROPY:>10.4g}")
    print("classes         " + " ".join(f"{h:.3f}" for h in results["class_histogram"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"Wrote {args.out}")


def visualize(args: argparse.Namespace) -> None:
    """Draw one of the pictures."""
    from . import visualize as pictures
    from .data import load_images

    writable(args.out)
    if args.picture == "training":
        reference = {}
        for item in args.reference:
            name, _, fid = item.rpartition("=")
            try:
                reference[name] = float(fid)
            except ValueError:
                raise ValueError(f"--reference {item!r}: expected NAME=FID, e.g. 'original model=74.8'.") from None
        figure = pictures.training_figure(args.run_dir, reference)
        figure.savefig(args.out, dpi=args.dpi, facecolor=figure.get_facecolor())
        print(f"Wrote {args.out}")
        return
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    T = pipe.scheduler.config.num_train_timesteps
    if args.picture in ("forward", "backward"):
        if args.num_frames < 2:
            raise ValueError("--num_frames must be at least 2 (t = 0 and t = T).")
        times = pictures.evenly_spaced_times(T, args.num_frames)
    if args.picture == "forward":
        digits, _ = load_images(args.dataset_name, split=args.split, indices=args.index)
        frames = pictures.forward_frames(pipe.scheduler, digits, times, torch.Generator().manual_seed(args.seed))
        figure = pictures.strip_figure(frames, times, "Forward process: a digit noised step by step")
    elif args.picture == "backward":
        frames, _ = pictures.backward_frames(pipe, list(range(args.seed, args.seed + args.num_seeds)), times)
        figure = pictures.strip_figure(frames, times[::-1], "Backward process: noise denoised into a digit")
    elif args.picture == "schedule":
        figure = pictures.schedule_figure(pipe.scheduler)
    else:
        grids = pictures.animation_frames(pipe, args.num_images, args.seed, args.scale)
        # Hold the finished digits for two seconds before the loop restarts.
        durations = [2000 if i == len(grids) - 1 else 80 for i in range(len(grids))]
        grids[0].save(args.out, save_all=True, append_images=grids[1:], duration=durations, loop=0)
        print(f"Wrote {args.out}")
        return
    figure.savefig(args.out, dpi=args.dpi, facecolor=figure.get_facecolor())
    print(f"Wrote {args.out}")


def add_sampler_options(parser: argparse.ArgumentParser) -> None:
    """--scheduler, --num_inference_steps or --timesteps, --noise_scale, --precision and --num_processes, for `sample`
    and `evaluate`."""
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default=None,
        help=f"Sampler. Default: {DEFAULT_SAMPLER[0]} ({DEFAULT_SAMPLER[1]} steps), or lcm in the model's own few "
        "steps for distilled models; ddpm is a trained model's own ancestral one.",
    )
    parser.add_argument(
        "--num_inference_steps",
        type=positive_int,
        default=None,
        help=f"Default: the sampler's usual count ({DEFAULT_SAMPLER[1]}; 50 for ddpm; a distilled model's own for lcm).",
    )
    parser.add_argument(
        "--timesteps",
        type=int,
        nargs="+",
        default=None,
        help="Custom timesteps, descending from the last training step (e.g. 49 45 42 ... 0), in place of the "
        "sampler's own spacing (dpm++sde, dpm++, ddim, ddpm, lcm take them); they set the step count.",
    )
    parser.add_argument(
        "--noise_scale",
        type=positive_float,
        default=None,
        help="Factor on a stochastic sampler's noise (lcm, dpm++sde), a temperature. Default: the model's own.",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast where the hardware runs it natively, else fp32.",
    )
    parser.add_argument(
        "--num_processes",
        type=positive_int,
        default=1,
        help="CPU only: draw the batches in this many processes, each with its share of the threads; starting them "
        "takes seconds, so it pays on long runs only (docs/speed.md).",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `mnist-diffusion` command line."""
    parser = argparse.ArgumentParser(prog="mnist-diffusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("sample", help="Generate digits into a grid PNG (and optionally PNGs and an .npz).")
    s.add_argument("--model", required=True, help="A pipeline folder or Hub id.")
    s.add_argument("--num_images", type=positive_int, default=64)
    s.add_argument("--seed", type=int, default=0, help="Digit i uses seed + i.")
    add_sampler_options(s)
    s.add_argument("--class_labels", type=int, nargs="+", default=None, help="Digits to draw, repeated in turn.")
    s.add_argument("--prompt", default=None, help='What to draw, e.g. "a handwritten seven" (text models).')
    s.add_argument("--negative_prompt", default=None, help="What to steer away from (text models).")
    s.add_argument(
        "--clip_model", default=None, help="A CLIP (e.g. pretrained/mnist-clip) to guide any model toward --prompt."
    )
    s.add_argument(
        "--clip_guidance_scale", type=float, default=CLIP_GUIDANCE_SCALE, help="How hard the CLIP pulls (0: not)."
    )
    s.add_argument("--batch_size", type=positive_int, default=128)
    s.add_argument("--out", required=True, help="The grid PNG.")
    s.add_argument("--nrow", type=positive_int, default=8, help="Digits per grid row.")
    s.add_argument("--scale", type=positive_int, default=3, help="Nearest-neighbour upscaling of the grid.")
    s.add_argument("--images_dir", default=None, help="Also write each digit as a 28x28 PNG here.")
    s.add_argument("--npz", default=None, help="Also write all digits as uint8 arrays (key 'images') here.")
    s.add_argument(
        "--guidance_scale", type=float, default=2.0, help="Classifier-free guidance, or autoguidance; 1 = none."
    )
    s.set_defaults(run=sample)

    e = commands.add_parser("evaluate", help="FID, KID, precision/recall and class statistics of generated digits.")
    e.add_argument("--model", default=None, help="A pipeline folder or Hub id to sample from.")
    e.add_argument("--samples", default=None, help="Or: digits made elsewhere (.npy, .npz or a folder of PNGs).")
    e.add_argument("--num_samples", type=positive_int, default=10000)
    e.add_argument("--seed", type=int, default=0)
    add_sampler_options(e)
    e.add_argument("--batch_size", type=positive_int, default=128)
    e.add_argument("--dataset_name", default="ylecun/mnist", help="The real digits to compare with.")
    e.add_argument("--split", default="test")
    e.add_argument("--out", default=None, help="Write the results as JSON here.")
    e.add_argument(
        "--guidance_scale", type=float, default=2.0, help="Classifier-free guidance, or autoguidance; 1 = none."
    )
    e.set_defaults(run=evaluate)

    v = commands.add_parser("visualize", help="Draw the forward or backward process, the schedule, an animation.")
    pictures = v.add_subparsers(dest="picture", required=True)
    for name, help_text in (
        ("forward", "Real digits noised with the model's scheduler, at evenly spaced t."),
        ("backward", "The pipeline's own denoising steps, t = T ... 0, for one or more seeds."),
        ("schedule", "alphas_cumprod and the image and noise scales against t."),
        ("animation", "A grid of digits denoising, as an animated GIF."),
        ("training", "Loss against step and, if the run evaluated, FID against training minutes."),
    ):
        p = pictures.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--out", required=True, help="The PNG (GIF for animation) to write.")
        if name == "training":
            p.add_argument("--run", dest="run_dir", required=True, help="A train_ddpm.py --output_dir.")
            p.add_argument("--reference", nargs="*", default=[], help="FID levels to draw, as NAME=FID.")
            p.add_argument("--dpi", type=positive_int, default=100)
            continue
        p.add_argument("--model", required=True, help="A pipeline folder or Hub id.")
        p.add_argument("--seed", type=int, default=0)
        if name == "forward":
            p.add_argument("--dataset_name", default="ylecun/mnist", help="Hub id or local copy of the dataset.")
            p.add_argument("--split", default="test")
            p.add_argument("--index", type=int, nargs="+", default=[0, 1, 2], help="Which digits of the split.")
        if name == "backward":
            p.add_argument("--num_seeds", type=positive_int, default=3, help="Rows: seeds seed, seed+1, ...")
        if name in ("forward", "backward"):
            p.add_argument("--num_frames", type=positive_int, default=11, help="Columns, from t = 0 to T.")
        if name == "animation":
            p.add_argument("--num_images", type=positive_int, default=16)
            p.add_argument("--scale", type=positive_int, default=3, help="Nearest-neighbour upscaling.")
        if name != "animation":
            p.add_argument("--dpi", type=positive_int, default=100)
    v.set_defaults(run=visualize)

    r = commands.add_parser(
        "resave",
        help="Re-save a pipeline folder with this version's code (module file, scheduler config, samples, card); "
        "the weights and the card's training settings and results stay; the folder's eval.json, if any, becomes the "
        "card's evaluation.",
    )
    r.add_argument("--model", required=True, help="The pipeline folder, rewritten in place.")
    r.add_argument(
        "--guidance_interval",
        type=int,
        nargs=2,
        default=None,
        metavar=("LOWEST", "HIGHEST"),
        help="Also set the timesteps at which its guidance is applied (a sampling setting; the weights stay).",
    )
    r.add_argument(
        "--noise_scale",
        type=positive_float,
        default=None,
        help="Also set the factor on its default sampler's noise (a temperature; a sampling setting, the weights stay).",
    )
    r.add_argument(
        "--dataset_name",
        default=None,
        help="Also record the dataset it was trained on as this Hub id (for a run trained on a local copy of it).",
    )
    r.set_defaults(run=resave)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one line naming the problem, not a traceback."""
    args = build_parser().parse_args(argv)
    # A scheduler's SIGTERM keeps the digits done, as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"mnist-diffusion {args.command}: error: {e}")
    finally:
        signal.signal(signal.SIGTERM, previous)
