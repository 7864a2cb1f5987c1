"""What comes with a saved pipeline besides its weights: a sample grid, the model card, and the Hub upload of both."""

import os
import tempfile
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, create_repo

from .captions import EXAMPLE_PROMPT
from .checkpoint import RENAMED_SETTINGS, RETIRED_SETTINGS
from .data import looks_like_path
from .pipeline_mnist_diffusion import MODULE_NAME, MNISTDiffusionPipeline
from .sampling import digit_cycle, generate, image_grid, with_default_sampler

# Settings that must never reach a model card (the training scripts hand their arguments to the card).
SECRET_SETTINGS = ("hub_token",)
TASKS = {"none": "unconditional-image-generation", "class": "image-generation", "text": "text-to-image"}


def card_settings(training_args: dict | None) -> dict:
    """The training settings a card lists: no secrets, no retired lever that was off, today's names, and a local
    dataset folder as what it is rather than a path of the machine that trained."""
    settings = {
        RENAMED_SETTINGS.get(k, k): v
        for k, v in (training_args or {}).items()
        if k not in SECRET_SETTINGS and not (k in RETIRED_SETTINGS and v == RETIRED_SETTINGS[k])
    }
    dataset = settings.get("dataset_name")
    if isinstance(dataset, str) and looks_like_path(dataset):
        settings["dataset_name"] = f"a local copy ({os.path.basename(os.path.normpath(dataset))})"
    return settings


def card_table(heading: str, values: dict) -> str:
    """A two-column Markdown table of a model card, one `| key | `value` |` row per item, sorted by key."""
    rows = "".join(f"| {k} | `{v}` |\n" for k, v in sorted(values.items()))
    return f"| {heading} | value |\n| --- | --- |\n{rows}"


def model_card(
    pipe: MNISTDiffusionPipeline, training_args: dict | None = None, results: dict | None = None
) -> ModelCard:
    """A Hub model card: metadata, a sample grid, how to load and sample, results and the training settings.

    `results` (what training and evaluation measured: training steps and minutes, FID, ...) becomes a table."""
    settings = card_settings(training_args)
    dataset = settings.get("dataset_name")
    data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        pipeline_tag=TASKS[pipe.conditioning],
        tags=[TASKS[pipe.conditioning], "diffusers", "ddpm", "mnist"],
        datasets=[dataset] if dataset and not dataset.startswith("a local copy") else None,  # Hub ids only
    )
    params = sum(p.numel() for p in pipe.unet.parameters())
    results_text = (
        "\n## Results\n\nMeasured at the end of training and by `mnist-diffusion evaluate`: FID, precision and recall "
        "of generated digits against the MNIST test split, in the features of the package's MNIST classifier (lower "
        "FID is better).\n\n" + card_table("measure", results)
        if results
        else ""
    )
    settings_text = "\n## Training settings\n\n" + card_table("setting", settings) if settings else ""
    call = {
        "none": "batch_size=16",
        "class": "class_labels=[7] * 16, guidance_scale=2.0",
        "text": f'prompt="{EXAMPLE_PROMPT.format("seven")}", batch_size=16, guidance_scale=2.0',
    }[pipe.conditioning]
    condition = {
        "none": "",
        "class": " of the digit you ask for (`class_labels`, classifier-free guidance)",
        "text": f" that a prompt describes (a frozen `{type(pipe.text_encoder).__name__}`, classifier-free guidance)",
    }[pipe.conditioning]
    guide = (
        "\nSampling steps away from `guide_unet`, a weaker copy of the model from earlier in its training "
        "(autoguidance: `guidance_scale=2.0` by default, 1 turns it off)."
        if pipe.guide_unet is not None
        else ""
    )
    content = f"""---
{data.to_yaml()}
---

# {type(pipe).__name__}

A denoising diffusion model (DDPM) that draws 28x28 grayscale handwritten digits{condition} in {pipe.default_num_inference_steps} steps:
a {params / 1e6:.2f} M-parameter `{type(pipe.unet).__name__}` and a `{type(pipe.scheduler).__name__}`
(`{pipe.scheduler.config.beta_schedule}` betas, `{pipe.scheduler.config.prediction_type}` prediction).{guide}

![samples](samples.png)

## Usage

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("<this folder or repo id>", trust_remote_code=True)
images = pipe({call}, generator=torch.manual_seed(0)).images  # 16 PIL images, mode "L"
```

`trust_remote_code=True` runs `{MODULE_NAME}.py` from this repository, which defines the pipeline class;
read it first. With the `mnist-diffusion` package installed, `MNISTDiffusionPipeline.from_pretrained(...)`
loads the same weights without running code from the repository.
{results_text}{settings_text}"""
    return ModelCard(content)


def save_pipeline(
    pipe: MNISTDiffusionPipeline,
    save_directory: str | os.PathLike,
    training_args: dict | None = None,
    results: dict | None = None,
    **kwargs: Any,
) -> None:
    """`pipe.save_pretrained`, plus a grid of 16 digits (seeds 0-15, 0 to 9 in turn if the model takes a condition,
    drawn by its default sampler) and the model card."""
    pipe.save_pretrained(save_directory, **kwargs)
    sampler, _, steps = with_default_sampler(pipe)
    digits = generate(
        sampler, 16, 0, 16, steps, digit_cycle(16) if pipe.conditioning != "none" else None, progress=False
    )
    image_grid(digits, nrow=8, scale=3).save(os.path.join(save_directory, "samples.png"))
    model_card(pipe, training_args, results).save(os.path.join(save_directory, "README.md"))


def push_pipeline(
    pipe: MNISTDiffusionPipeline,
    repo_id: str,
    training_args: dict | None = None,
    results: dict | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> str:
    """Upload the folder `save_pipeline` writes (weights, module file, sample grid, model card) to the Hub."""
    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmpdir:
        save_pipeline(pipe, tmpdir, training_args=training_args, results=results)
        return pipe._upload_folder(tmpdir, repo_id, token=token, commit_message=commit_message)
