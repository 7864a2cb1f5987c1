#!/usr/bin/env python
"""The web demo, a Hugging Face Space's `app.py`: draw digits with the shipped pipelines in a browser, offline.

    pip install -e ".[demo]"
    python app.py                                             # http://127.0.0.1:7860, the pipelines in pretrained/
    python app.py --model pretrained/ddpm-mnist-cond --model user/ddpm-mnist     # other folders or Hub ids
    MNIST_DIFFUSION_MODELS=pretrained/ddpm-mnist,user/ddpm-mnist python app.py  # the same, for a Space

A prompt goes to a text model's own text encoder; models without one follow it by CLIP guidance, with
pretrained/mnist-clip (or `--clip_model`, MNIST_DIFFUSION_CLIP).

Digits come from `pipeline.sampling.generate_batches`, as `mnist-diffusion sample` draws them: the same model,
sampler, steps, seed and digit give the same pixels.
"""

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network: no usage reports

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline import MNISTDiffusionPipeline, image_grid  # noqa: E402
from pipeline.clip import CLIP_GUIDANCE_SCALE, load_clip  # noqa: E402
from pipeline.sampling import (  # noqa: E402
    SCHEDULERS,
    default_sampler,
    generate_batches,
    load_pipeline,
    sampling_precision,
    with_sampler,
)
from pipeline.visualize import latents_to_uint8  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
MAX_DIGITS = 64  # bounds a request: 64 digits at 20 steps take seconds and a few MB
PROCESS_ROWS = 8  # digits shown in the denoising picture
PROCESS_FRAMES = 20  # steps shown in it, evenly spaced, the last one included
ANY = "any"
# Sampling uses every core, so requests take turns; more than QUEUE_SIZE waiting are told the demo is busy.
CONCURRENCY_LIMIT, QUEUE_SIZE = 1, 32
PROGRESS = gr.Progress()  # a parameter with this default gets each request's own progress bar from Gradio
# System fonts: the default theme would fetch Google Fonts.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def default_models() -> list[str]:
    """The pipelines named in MNIST_DIFFUSION_MODELS (comma-separated), else the folders in pretrained/."""
    if os.environ.get("MNIST_DIFFUSION_MODELS"):
        return os.environ["MNIST_DIFFUSION_MODELS"].split(",")
    shipped = os.path.join(ROOT, "pretrained")
    return sorted(
        os.path.join(shipped, name)
        for name in os.listdir(shipped)
        if os.path.isfile(os.path.join(shipped, name, "model_index.json"))
    )


def default_clip() -> str | None:
    """The CLIP that guides models without a text encoder: MNIST_DIFFUSION_CLIP, else pretrained/mnist-clip if here."""
    shipped = os.path.join(ROOT, "pretrained", "mnist-clip")
    return os.environ.get("MNIST_DIFFUSION_CLIP") or (shipped if os.path.isdir(shipped) else None)


def model_name(model: str) -> str:
    """What the page calls a model: a folder's name, or a Hub id."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def takes_guidance(pipe: MNISTDiffusionPipeline) -> bool:
    """Whether a guidance scale changes what the model draws: conditional models (classifier-free), or autoguided ones."""
    return pipe.conditioning != "none" or pipe.guide_unet is not None


def check_request(
    pipe: MNISTDiffusionPipeline, name: str, digit: str, prompt: str, num_images, steps, guidance_scale, seed,
    clip_guidance_scale, clip: bool,
) -> None:  # fmt: skip
    """Refuse what the page or the API was given, with a message that says what to change."""
    if num_images is None or num_images != int(num_images) or not 1 <= num_images <= MAX_DIGITS:
        raise gr.Error(
            f"Ask for 1 to {MAX_DIGITS} digits (got {num_images}); for more, run "
            f"`mnist-diffusion sample --model {name} --num_images N --out digits.png`."
        )
    max_steps = pipe.scheduler.config.num_train_timesteps
    if steps is None or steps != int(steps) or not 1 <= steps <= max_steps:
        raise gr.Error(f"Steps go from 1 to {max_steps}, the steps {name} was trained with (got {steps}).")
    if guidance_scale is None or not guidance_scale >= 1:
        raise gr.Error(f"The guidance scale must be at least 1 (1 means no guidance), got {guidance_scale}.")
    if seed is None or seed != int(seed) or not 0 <= seed < 2**63 - MAX_DIGITS:
        raise gr.Error(f"The seed must be a whole number from 0 to 2**63 - {MAX_DIGITS + 1} (got {seed}).")
    if prompt and pipe.conditioning != "text" and not clip:
        hint = "pick the digit instead" if pipe.conditioning == "class" else "pick a model with a text encoder"
        raise gr.Error(f"{name} has no text encoder, so it cannot follow a prompt: {hint}.")
    if clip_guidance_scale is None or not 0 <= clip_guidance_scale < float("inf"):
        raise gr.Error(f"The CLIP guidance scale must be a number, 0 or more (0: none), got {clip_guidance_scale}.")
    if digit not in (ANY, *map(str, range(10))):
        raise gr.Error(f"The digit must be 0 to 9 or '{ANY}', got {digit!r}.")
    if digit != ANY and pipe.conditioning == "none":
        raise gr.Error(f"{name} is unconditional: it draws any digit. Choose '{ANY}', or a class-conditional model.")


def build_demo(models: list[str], clip_model: str | None = None) -> gr.Blocks:
    """The page: the settings on the left, the digits and their denoising on the right; `clip_model` guides the
    models without a text encoder toward a prompt."""
    pipelines = {model_name(model): load_pipeline(model) for model in models}  # loads (and checks) them all now
    if not pipelines:
        raise ValueError("No pipelines to serve: pass --model FOLDER_OR_HUB_ID, or train one into pretrained/.")
    clip = load_clip(clip_model) if clip_model else None

    def follows_prompts(name: str) -> bool:
        return pipelines[name].conditioning == "text" or clip is not None

    def generate(
        name, digit, prompt, num_images, scheduler, steps, guidance_scale, clip_guidance_scale, seed, progress=PROGRESS
    ):
        """The digits' grid and the denoising of the first few, one row per digit and one column per step."""
        if name not in pipelines:
            raise gr.Error(f"No model {name!r} here; choose one of {list(pipelines)}.")
        if scheduler not in SCHEDULERS:
            raise gr.Error(f"No sampler {scheduler!r}; choose one of {list(SCHEDULERS)}.")
        pipe = pipelines[name]
        check_request(
            pipe, name, digit, prompt, num_images, steps, guidance_scale, seed, clip_guidance_scale, clip is not None
        )
        num_images, steps, seed = int(num_images), int(steps), int(seed)
        # A pipeline of its own per request: the loaded one's scheduler is never swapped under another request.
        pipe = with_sampler(pipe, scheduler)
        # Evenly spaced steps, the first and the last included: every step of a few-step model.
        frames_shown = min(steps, PROCESS_FRAMES)
        shown = sorted({round(i * (steps - 1) / max(frames_shown - 1, 1)) for i in range(frames_shown)})
        frames = []

        def keep(pipeline: MNISTDiffusionPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
            if i in shown:
                frames.append(latents_to_uint8(tensors["latents"][:PROCESS_ROWS]))
            progress((i + 1, steps), desc="Denoising", unit="steps")
            return {}

        labels = None if digit == ANY else np.full(num_images, int(digit))
        guided = None
        if prompt and pipe.conditioning != "text":
            guided = {"clip_model": clip[0], "clip_tokenizer": clip[1], "clip_guidance_scale": clip_guidance_scale}
        try:
            with sampling_precision(pipe.device):
                digits = next(generate_batches(
                    pipe, num_images, seed, num_images, steps, labels, prompt or None, None, guidance_scale,
                    progress=False, callback_on_step_end=keep, clip_guidance=guided,
                ))  # fmt: skip
        except ValueError as e:  # the pipeline's own refusals, e.g. a DDIM step count that misses pure noise
            raise gr.Error(str(e)) from e
        process = np.stack(frames, axis=1).reshape(-1, *digits.shape[1:])  # row r: digit r through the steps
        return (
            image_grid(digits, nrow=min(num_images, 8), scale=3),
            image_grid(process, nrow=len(frames), scale=2),
        )

    def show_controls(name: str) -> tuple:
        """The digit, prompt and guidance boxes, shown only where the model takes them, and the model's sampler."""
        conditioning = pipelines[name].conditioning
        sampler, steps = default_sampler(pipelines[name])
        return (
            gr.update(visible=conditioning == "class", value=ANY),
            gr.update(visible=follows_prompts(name), value=""),
            gr.update(visible=takes_guidance(pipelines[name])),
            gr.update(visible=conditioning != "text" and clip is not None),
            gr.update(value=sampler),
            gr.update(value=steps),
        )

    names = list(pipelines)
    first = pipelines[names[0]].conditioning
    first_sampler, first_steps = default_sampler(pipelines[names[0]])
    with gr.Blocks(title="MNIST Diffusion", analytics_enabled=False) as demo:
        gr.Markdown(
            "# MNIST Diffusion\nA 50-step DDPM built on diffusers draws handwritten digits from pure noise (a "
            "distilled model, such as ddpm-mnist-fast, in a few steps of its own sampler). "
            "Digit *i* starts from the noise of seed + *i*: the same settings give the same digits as "
            "`mnist-diffusion sample`."
        )
        with gr.Row():
            with gr.Column(scale=1):
                model = gr.Dropdown(names, value=names[0], label="Model", elem_id="model")
                digit = gr.Dropdown(
                    [ANY, *map(str, range(10))], value=ANY, label="Digit", elem_id="digit", visible=first == "class"
                )
                prompt = gr.Textbox(
                    label="Prompt", placeholder="a bold seven", elem_id="prompt", visible=follows_prompts(names[0])
                )
                num_images = gr.Number(16, label=f"Digits (1 to {MAX_DIGITS})", precision=0, elem_id="num_images")
                scheduler = gr.Dropdown(list(SCHEDULERS), value=first_sampler, label="Sampler", elem_id="sampler")
                steps = gr.Number(first_steps, label="Steps (1 to 50)", precision=0, elem_id="steps")
                guidance = gr.Number(
                    2.0,
                    label="Guidance scale (1 = none)",
                    elem_id="guidance",
                    visible=takes_guidance(pipelines[names[0]]),
                )
                clip_guidance = gr.Number(
                    CLIP_GUIDANCE_SCALE,
                    label="CLIP guidance scale, for the prompt (50 steps follow it best)",
                    elem_id="clip_guidance",
                    visible=first != "text" and clip is not None,
                )
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                digits = gr.Image(label="Digits", format="png", interactive=False, elem_id="digits")
                process = gr.Image(
                    label="Denoising: a row per digit, from the first step to the last", format="png", interactive=False,
                    elem_id="process",
                )  # fmt: skip
        model.change(show_controls, model, [digit, prompt, guidance, clip_guidance, scheduler, steps], api_name=False)
        button.click(
            generate,
            [model, digit, prompt, num_images, scheduler, steps, guidance, clip_guidance, seed],
            [digits, process],
            api_name="generate",
            concurrency_limit=CONCURRENCY_LIMIT,
        )
    return demo.queue(max_size=QUEUE_SIZE)


demo = build_demo(default_models(), default_clip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: which pipelines to serve, and where."""
    parser = argparse.ArgumentParser(description="Serve the MNIST diffusion demo in a browser.")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="A pipeline folder or Hub id, repeatable; default: MNIST_DIFFUSION_MODELS, else pretrained/*.",
    )
    parser.add_argument(
        "--clip_model",
        default=None,
        help="A CLIP to guide models without a text encoder; default: MNIST_DIFFUSION_CLIP, else pretrained/mnist-clip.",
    )
    parser.add_argument("--server_name", default=None, help="Default: GRADIO_SERVER_NAME, else 127.0.0.1.")
    parser.add_argument("--server_port", type=int, default=None, help="Default: GRADIO_SERVER_PORT, else 7860.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Serve `demo` (or one built from --model) until interrupted."""
    args = parse_args(argv)
    try:
        app = (
            build_demo(args.model or default_models(), args.clip_model or default_clip())
            if args.model or args.clip_model
            else demo
        )
    except (ValueError, OSError) as e:  # a folder or Hub id that is not a pipeline: one line, not a traceback
        sys.exit(f"app.py: error: {e}")
    app.launch(server_name=args.server_name, server_port=args.server_port, theme=THEME, share=False)


if __name__ == "__main__":
    main()
