# Copyright 2026 The MNIST Diffusion authors. Licensed under the Apache License, Version 2.0.
"""`MNISTDiffusionPipeline`: a 50-step DDPM for 28x28 grayscale digits.

This file is self-contained (it imports only torch, numpy, PIL, huggingface_hub and diffusers): `save_pretrained`
copies it next to the weights, so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` finds the class
even where this package is not installed.
"""

import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import ModelCard, ModelCardData, create_repo
from PIL import Image

MODULE_NAME = os.path.splitext(os.path.basename(__file__))[0]
# Settings that must never reach a model card (`train_ddpm.py` hands its arguments to the card).
SECRET_SETTINGS = ("hub_token",)


def check_unet_config(config: Any) -> None:
    """Raise a clear `ValueError` if a UNet config cannot run at its `sample_size` (e.g. too many levels for 28)."""
    size = config.sample_size if isinstance(config.sample_size, int) else min(config.sample_size)
    halvings = len(config.block_out_channels) - 1
    if size % 2**halvings:
        sizes = " -> ".join(str(size // 2**i) if size % 2**i == 0 else f"{size / 2**i:g}" for i in range(halvings + 1))
        raise ValueError(
            f"A UNet with {halvings + 1} resolution levels cannot run at {size}x{size} ({sizes}): each level halves the "
            f"image and the way back up must restore it exactly. Use at most "
            f"{(size & -size).bit_length()} levels (block_out_channels) for this sample_size."
        )


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


class MNISTDiffusionPipeline(DDPMPipeline):
    r"""
    Pipeline that generates 28x28 grayscale digits with a DDPM trained on MNIST.

    Unlike the stock [`DDPMPipeline`], the number of steps defaults to the scheduler's training steps (50), asking for
    more is an error, any compatible scheduler (DDIM, DPM-Solver++, ...) can be swapped in with `from_config`, and the
    intermediate steps can be read with `callback_on_step_end`.

    Parameters:
        unet ([`UNet2DModel`]): the denoiser, 1 input and 1 output channel.
        scheduler ([`SchedulerMixin`]): the noise scheduler the UNet was trained with, or a compatible sampler.

    Example:

    ```py
    >>> from diffusers import DiffusionPipeline

    >>> pipe = DiffusionPipeline.from_pretrained("pretrained/ddpm-mnist", trust_remote_code=True)
    >>> images = pipe(batch_size=16, generator=torch.manual_seed(0)).images
    >>> images[0].save("digit.png")
    ```
    """

    _callback_tensor_inputs = ["image", "model_output"]

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler):
        super().__init__(unet=unet, scheduler=scheduler)

    def check_inputs(
        self, batch_size: int, num_inference_steps: int, output_type: str, tensor_inputs: list[str]
    ) -> None:
        """Reject bad arguments before any work is done."""
        check_unet_config(self.unet.config)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        max_steps = self.scheduler.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= max_steps:
            raise ValueError(
                f"`num_inference_steps` must be between 1 and {max_steps} (the steps this model was trained with), "
                f"got {num_inference_steps!r}."
            )
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"`output_type` must be 'pil', 'np' or 'pt', got {output_type!r}.")
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` can only hold {self._callback_tensor_inputs}.")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("image",),
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate digits.

        Args:
            batch_size (`int`, defaults to 1): how many digits to generate.
            generator (`torch.Generator` or a list of them, *optional*): makes generation deterministic; one per image
                makes each image independent of the batch it is in.
            num_inference_steps (`int`, *optional*): denoising steps; defaults to the scheduler's training steps.
            latents (`torch.Tensor`, *optional*): the starting noise, `(batch_size, 1, 28, 28)`; drawn from
                `generator` if not given.
            output_type (`str`, defaults to `"pil"`): `"pil"` (mode "L" images), `"np"` (N, 28, 28, 1) floats in
                [0, 1], or `"pt"` (N, 1, 28, 28) floats in [0, 1].
            return_dict (`bool`, defaults to `True`): return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): called after each step as
                `callback_on_step_end(pipe, i, t, callback_kwargs)` with the tensors named in
                `callback_on_step_end_tensor_inputs` ("image" is x_t in [-1, 1], "model_output" the UNet's prediction);
                it may return a dict that replaces them.

        Returns:
            [`ImagePipelineOutput`] or `tuple` whose first element is the list or array of images.
        """
        if num_inference_steps is None:
            num_inference_steps = self.scheduler.config.num_train_timesteps
        self.check_inputs(batch_size, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)

        device = self._execution_device
        shape = (batch_size, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            image = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif latents.shape != shape:
            raise ValueError(
                f"`latents` must have shape {shape} for batch_size={batch_size}, got {tuple(latents.shape)}."
            )
        else:
            image = latents.to(device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        image = image * self.scheduler.init_noise_sigma
        # DDPM, DDIM and DPM-Solver++ take a generator for their noise; some samplers have no such argument.
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            # The UNet runs in its own dtype (e.g. after `pipe.to(torch.bfloat16)`); the sampler's state stays float32,
            # so 50 small updates do not lose precision and a seed gives the same noise in any dtype.
            model_input = self.scheduler.scale_model_input(image, t).to(self.unet.dtype)
            model_output = self.unet(model_input, t).sample.float()
            image = self.scheduler.step(model_output, t, image, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                local = {"image": image, "model_output": model_output}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                image = (outputs or {}).get("image", image)

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # Saved folders name their class as ["<module file>", "MNISTDiffusionPipeline"] so that a bare
        # `DiffusionPipeline.from_pretrained` can find it; called on this class itself, load into this class
        # rather than into a copy of it executed from the folder.
        config = super()._dict_from_json_file(json_file)
        if isinstance(config.get("_class_name"), list) and config["_class_name"][1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return config

    def save_pretrained(
        self, save_directory: str | os.PathLike, training_args: dict | None = None, **kwargs: Any
    ) -> None:
        """Save weights (safetensors), configs, this module file, a sample grid and a model card to a folder."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(inspect.getfile(type(self)), os.path.join(save_directory, f"{MODULE_NAME}.py"))
        index_file = os.path.join(save_directory, "model_index.json")
        with open(index_file) as f:
            index = json.load(f)
        index["_class_name"] = [MODULE_NAME, type(self).__name__]
        with open(index_file, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

        digits = self(batch_size=16, generator=torch.Generator().manual_seed(0), output_type="np").images
        image_grid((digits[..., 0] * 255).round().astype(np.uint8), nrow=8, scale=3).save(
            os.path.join(save_directory, "samples.png")
        )
        self.model_card(training_args).save(os.path.join(save_directory, "README.md"))

    def model_card(self, training_args: dict | None = None) -> ModelCard:
        """A Hub model card: metadata, a sample grid, how to load and sample, and the training settings."""
        data = ModelCardData(
            library_name="diffusers",
            license="apache-2.0",
            pipeline_tag="unconditional-image-generation",
            tags=["unconditional-image-generation", "diffusers", "ddpm", "mnist"],
            datasets=[training_args["dataset_name"]] if training_args and training_args.get("dataset_name") else None,
        )
        steps = self.scheduler.config.num_train_timesteps
        params = sum(p.numel() for p in self.unet.parameters())
        settings = {k: v for k, v in (training_args or {}).items() if k not in SECRET_SETTINGS}
        settings_text = (
            "\n## Training settings\n\n| setting | value |\n| --- | --- |\n"
            + "".join(f"| {k} | `{v}` |\n" for k, v in sorted(settings.items()))
            if settings
            else ""
        )
        content = f"""---
{data.to_yaml()}
---

# {type(self).__name__}

A denoising diffusion model (DDPM) that draws 28x28 grayscale handwritten digits in {steps} steps:
a {params / 1e6:.2f} M-parameter `UNet2DModel` and a `{type(self.scheduler).__name__}`
(`{self.scheduler.config.beta_schedule}` betas, `{self.scheduler.config.prediction_type}` prediction).

![samples](samples.png)

## Usage

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("<this folder or repo id>", trust_remote_code=True)
images = pipe(batch_size=16, generator=torch.manual_seed(0)).images  # 16 PIL images, mode "L"
```

`trust_remote_code=True` runs `{MODULE_NAME}.py` from this repository, which defines the pipeline class;
read it first. With the `mnist-diffusion` package installed, `MNISTDiffusionPipeline.from_pretrained(...)`
loads the same weights without running code from the repository.
{settings_text}"""
        return ModelCard(content)

    def push_to_hub(
        self,
        repo_id: str,
        training_args: dict | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload the folder `save_pretrained` writes (weights, module file, sample grid, model card) to the Hub."""
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmpdir:
            self.save_pretrained(tmpdir, training_args=training_args)
            return self._upload_folder(
                tmpdir, repo_id, token=token, commit_message=commit_message, create_pr=create_pr
            )
