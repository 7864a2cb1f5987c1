# Copyright 2026 The MNIST Diffusion authors. Licensed under the Apache License, Version 2.0.
"""`MNISTDiffusionPipeline`: a 50-step DDPM for 28x28 grayscale digits.

This file is self-contained (it imports only torch, numpy, transformers and diffusers): `save_pretrained` copies it
next to the weights, so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` finds the class even where
this package is not installed. The model card, the sample grid and the Hub upload live in the package
(`pipeline/card.py`), so that they change without re-saving weight folders.
"""

import inspect
import json
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

MODULE_NAME = os.path.splitext(os.path.basename(__file__))[0]


def sample_shape(config: Any) -> tuple[int, int]:
    """A UNet config's `sample_size` as (height, width)."""
    size = config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def trailing_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """Exactly `num_inference_steps` timesteps spaced as diffusers' "trailing" spacing: from the last training step,
    pure noise, down in equal strides."""
    steps = np.linspace(num_train_timesteps, 0, num_inference_steps, endpoint=False).round().astype(int) - 1
    return steps.tolist()


def consistency_timesteps(num_train_timesteps: int, num_inference_steps: int) -> list[int]:
    """The consistency sampler's timesteps: the trailing grid of one step more, without its last point. Its last step
    jumps straight to the digit; from t = 19 rather than 12 in 4 steps (32 rather than 24 in 2) the student's digits
    score better at every step count (docs/speed.md)."""
    return trailing_timesteps(num_train_timesteps, num_inference_steps + 1)[:-1]


def scales_noise(scheduler: Any) -> bool:
    """Whether the pipeline can scale the sampler's fresh noise (`noise_scale`): the consistency sampler's, which it
    rescales after each step, or stochastic DPM-Solver++'s, which it draws and hands to the step."""
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return scheduler.config.algorithm_type.startswith("sde")
    return isinstance(scheduler, LCMScheduler)


def clip_features(output: Any) -> torch.Tensor:
    """Unit-length CLIP embeddings from `get_text_features` / `get_image_features` (a tensor, or in transformers 5 an
    output whose `pooler_output` holds them)."""
    return torch.nn.functional.normalize(getattr(output, "pooler_output", output).float(), dim=-1)


class MNISTDiffusionPipeline(DDPMPipeline):
    r"""
    Pipeline that generates 28x28 grayscale digits with a DDPM trained on MNIST: unconditionally, by class label (a
    `UNet2DModel` with `num_class_embeds=11`: ten digits and a "no label" token) or by prompt (a `UNet2DConditionModel`
    and a frozen CLIP text encoder), with classifier-free guidance, or guided by a weaker version of itself
    (autoguidance, Karras et al. 2024, https://huggingface.co/papers/2406.02507).

    Unlike the stock [`DDPMPipeline`], steps default to the training steps (50), and every sampler swapped in with
    `from_config` starts from pure noise at the last training step, in any step count ("trailing" spacing, or custom
    `timesteps`). The sampler's state stays float32 whatever the UNet's dtype; `output_type="latent"` returns it.

    Parameters:
        unet ([`UNet2DModel`] or [`UNet2DConditionModel`]): the denoiser, 1 input and 1 output channel.
        scheduler ([`SchedulerMixin`]): the noise scheduler the UNet was trained with, or a compatible sampler.
        text_encoder ([`CLIPTextModel`], *optional*): a frozen text encoder, for models that take a prompt.
        tokenizer ([`CLIPTokenizer`], *optional*): its tokenizer.
        guide_unet ([`UNet2DModel`] or [`UNet2DConditionModel`], *optional*): a weaker denoiser of the same kind (for
            example the same model earlier in its training) to guide away from: autoguidance.
        default_num_inference_steps (`int`, *optional*): the steps to sample in when not told; set for few-step
            (distilled) models, whose scheduler is an [`LCMScheduler`]. Defaults to the training steps.
        guidance_interval (`list[int]`, *optional*): the timesteps (lowest, highest) at which guidance is applied;
            defaults to every step.
        noise_scale (`float`, *optional*): for the stochastic samplers (LCM, DPM-Solver++ SDE), a factor on the
            starting and fresh noise (a temperature). Defaults to 1.

    Example:

    ```py
    >>> from diffusers import DiffusionPipeline

    >>> pipe = DiffusionPipeline.from_pretrained("pretrained/ddpm-mnist", trust_remote_code=True)
    >>> images = pipe(batch_size=16, generator=torch.manual_seed(0)).images
    >>> images[0].save("digit.png")

    >>> pipe = DiffusionPipeline.from_pretrained("pretrained/ddpm-mnist-cond", trust_remote_code=True)
    >>> sevens = pipe(class_labels=[7] * 8, guidance_scale=2.0).images

    >>> unguided = pipe(batch_size=16, guidance_scale=1.0).images  # without the guide: one UNet call a step
    ```
    """

    _optional_components = ["text_encoder", "tokenizer", "guide_unet"]
    _callback_tensor_inputs = ["latents", "image", "model_output"]  # "image": the same tensor as "latents"

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        scheduler: DDPMScheduler,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        guide_unet: UNet2DModel | UNet2DConditionModel | None = None,
        default_num_inference_steps: int | None = None,
        guidance_interval: list[int] | None = None,
        noise_scale: float | None = None,
    ):
        super().__init__(unet=unet, scheduler=scheduler)
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, guide_unet=guide_unet)
        self.register_to_config(
            default_num_inference_steps=default_num_inference_steps,
            guidance_interval=list(guidance_interval) if guidance_interval is not None else None,
            noise_scale=noise_scale,
        )

    @property
    def default_num_inference_steps(self) -> int:
        """The steps `__call__` takes when not told: a distilled model's few, else the training steps."""
        return self.config.get("default_num_inference_steps") or self.scheduler.config.num_train_timesteps

    @property
    def default_noise_scale(self) -> float:
        """The noise scale `__call__` uses when not told: the pipeline's `noise_scale` where the sampler takes one."""
        return (self.config.get("noise_scale") or 1.0) if scales_noise(self.scheduler) else 1.0

    @property
    def conditioning(self) -> str:
        """What the model is conditioned on: "text", "class" or "none"."""
        if isinstance(self.unet, UNet2DConditionModel):
            return "text"
        return "class" if getattr(self.unet.config, "num_class_embeds", None) else "none"

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (from a callback) to skip the remaining steps."""
        return getattr(self, "_interrupt", False)

    def set_sampling_timesteps(
        self, num_inference_steps: int, timesteps: list[int] | None, device: torch.device
    ) -> torch.Tensor:
        """Set the scheduler's timesteps so that sampling starts from pure noise at the last training step.

        A grid that already does (50 DDPM steps, any "trailing" scheduler) is used as the scheduler makes it, as the
        stock pipeline does; otherwise exact trailing timesteps, passed where the scheduler takes custom ones. The
        consistency sampler (`LCMScheduler`) gets the trailing grid of one step more, without its last point."""
        scheduler, last = self.scheduler, self.scheduler.config.num_train_timesteps - 1
        takes_timesteps = "timesteps" in inspect.signature(scheduler.set_timesteps).parameters
        if timesteps is not None:
            if not takes_timesteps:
                raise ValueError(
                    f"{type(scheduler).__name__} takes no custom `timesteps`; pass `num_inference_steps`."
                )
            scheduler.set_timesteps(timesteps=list(timesteps), device=device)
        else:
            if isinstance(scheduler, (DDIMScheduler, PNDMScheduler)) and (last + 1) % num_inference_steps:
                divisors = [n for n in range(1, last + 2) if (last + 1) % n == 0]
                raise ValueError(
                    f"{type(scheduler).__name__} steps by num_train_timesteps // num_inference_steps, so it reaches the "
                    f"digit from pure noise only in a step count that divides {last + 1} ({divisors}); got "
                    f"{num_inference_steps}. Use one of those, or DPMSolverMultistepScheduler for any count."
                )
            if isinstance(scheduler, LCMScheduler) and num_inference_steps <= last:
                scheduler.set_timesteps(timesteps=consistency_timesteps(last + 1, num_inference_steps), device=device)
            else:
                scheduler.set_timesteps(num_inference_steps, device=device)
            if scheduler.timesteps[0] != last:
                if takes_timesteps:
                    scheduler.set_timesteps(timesteps=trailing_timesteps(last + 1, num_inference_steps), device=device)
                elif "timestep_spacing" in scheduler.config:
                    spacing = scheduler.config.timestep_spacing
                    scheduler.register_to_config(timestep_spacing="trailing")
                    scheduler.set_timesteps(num_inference_steps, device=device)
                    scheduler.register_to_config(timestep_spacing=spacing)
        if scheduler.timesteps[0] != last:
            raise ValueError(
                f"{type(scheduler).__name__} would start at timestep {int(scheduler.timesteps[0])}, but the model "
                f"starts from pure noise at {last}: give `timesteps` that start there, or swap the scheduler in with "
                '`from_config(config, timestep_spacing="trailing")`.'
            )
        return scheduler.timesteps

    def encode_prompt(self, prompt: list[str]) -> torch.Tensor:
        """CLIP text-encoder hidden states `(N, 77, D)` for the prompts, in the UNet's dtype."""
        tokens = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        hidden = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]
        return hidden.to(self.unet.dtype)

    def prepare_conditions(
        self,
        batch_size: int,
        class_labels: list[int] | None,
        prompt: list[str] | None,
        negative_prompt: list[str] | None,
        device: torch.device,
    ) -> tuple[dict, dict | None]:
        """The UNet's keyword arguments with the condition, and without it (None: nothing to guide)."""
        if self.conditioning == "class":
            null = torch.full((batch_size,), self.unet.config.num_class_embeds - 1, device=device)
            if class_labels is None:
                return {"class_labels": null}, None
            return {"class_labels": torch.tensor(class_labels, device=device)}, {"class_labels": null}
        if self.conditioning == "text":
            uncond = {"encoder_hidden_states": self.encode_prompt(negative_prompt or [""] * batch_size)}
            if prompt is None:
                return uncond, None
            return {"encoder_hidden_states": self.encode_prompt(prompt)}, uncond
        return {}, None

    def check_inputs(
        self,
        batch_size: int,
        num_inference_steps: int,
        timesteps: list[int] | None,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        tensor_inputs: list[str],
        class_labels: list[int] | None,
        prompt: list[str] | None,
        negative_prompt: list[str] | None,
        guidance_scale: float,
        noise_scale: float,
        clip_guided: bool = False,
        clip_tokenizer: Any | None = None,
        clip_guidance_scale: float = 0.0,
    ) -> None:
        """Reject bad arguments before any work is done."""
        if clip_guided and (prompt is None or clip_tokenizer is None or negative_prompt is not None):
            raise ValueError(
                "CLIP guidance takes a `prompt` and the `clip_tokenizer` of `clip_model` (no negative prompt)."
            )
        if not 0 <= clip_guidance_scale < float("inf"):
            raise ValueError(f"`clip_guidance_scale` must be a finite number, 0 or more, got {clip_guidance_scale}.")
        if self.guide_unet is not None:
            keys = ("sample_size", "in_channels", "out_channels", "num_class_embeds", "cross_attention_dim")
            differ = [k for k in keys if self.unet.config.get(k) != self.guide_unet.config.get(k)]
            if type(self.guide_unet) is not type(self.unet) or differ:
                raise ValueError(
                    f"`guide_unet` must be a {type(self.unet).__name__} with the same {', '.join(differ or keys)} as "
                    f"`unet`: it predicts the same quantity, only worse. Pass `guide_unet=None` to sample without it."
                )
        interval = self.config.get("guidance_interval")
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1]):
            raise ValueError(f"`guidance_interval` must be two timesteps (lowest, highest), got {interval}.")
        if not noise_scale > 0:
            raise ValueError(f"`noise_scale` must be positive, got {noise_scale}.")
        if noise_scale != 1 and not scales_noise(self.scheduler):
            raise ValueError(
                "`noise_scale` applies to the stochastic samplers whose noise the pipeline can scale (LCMScheduler, "
                f"DPMSolverMultistepScheduler with an sde- algorithm_type), not {type(self.scheduler).__name__} "
                f"({self.scheduler.config.get('algorithm_type', 'its own noise')}); leave it at 1."
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        for name, values in (("class_labels", class_labels), ("prompt", prompt), ("negative_prompt", negative_prompt)):
            if values is not None and len(values) != batch_size:
                raise ValueError(
                    f"Got {len(values)} `{name}` for batch_size={batch_size}; give one, or one per image."
                )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for batch_size={batch_size}; give one, or one per image."
            )
        if class_labels is not None:
            if self.conditioning != "class":
                raise ValueError(
                    f"`class_labels` need a class-conditional model; this one is conditioned on {self.conditioning}."
                )
            num_classes = self.unet.config.num_class_embeds - 1
            bad = [label for label in class_labels if not isinstance(label, int) or not 0 <= label < num_classes]
            if bad:
                raise ValueError(f"`class_labels` must be whole numbers in 0..{num_classes - 1}, got {bad}.")
        if (prompt is not None or negative_prompt is not None) and self.conditioning != "text" and not clip_guided:
            raise ValueError(
                f"A prompt needs a model with a text encoder; this one is conditioned on {self.conditioning}"
                + (": pass `class_labels` instead." if self.conditioning == "class" else ".")
            )
        if not 1 <= guidance_scale < float("inf"):  # also refuses NaN
            raise ValueError(
                f"`guidance_scale` must be a finite number, at least 1 (1: no guidance), got {guidance_scale}."
            )
        max_steps = self.scheduler.config.num_train_timesteps
        if timesteps is not None:
            steps = [int(t) for t in timesteps]
            if not steps or steps != sorted(set(steps), reverse=True) or steps[-1] < 0:
                raise ValueError(f"`timesteps` must be distinct and descending, ending at 0 or above, got {steps}.")
            if steps[0] != max_steps - 1:
                raise ValueError(
                    f"`timesteps` must start at {max_steps - 1}, the last training step (pure noise), not {steps[0]}."
                )
        if timesteps is None and (
            not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= max_steps
        ):
            raise ValueError(
                f"`num_inference_steps` must be between 1 and {max_steps} (the steps this model was trained with), "
                f"got {num_inference_steps!r}."
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` can only hold {self._callback_tensor_inputs}.")

    def guided_output(
        self, latents: torch.Tensor, t: torch.Tensor, condition: dict, no_condition: dict | None, guidance_scale: float
    ) -> torch.Tensor:
        """The UNet's output at `t`, float32, guided within the guidance interval: away from the guide UNet
        (autoguidance) if there is one, else away from the unconditioned output (classifier-free guidance)."""
        # The UNet runs in its own dtype (e.g. after `pipe.to(torch.bfloat16)`); the sampler's state stays float32,
        # so 50 small updates do not lose precision and a seed gives the same noise in any dtype.
        model_input = self.scheduler.scale_model_input(latents, t).to(self.unet.dtype)
        lowest, highest = self.config.get("guidance_interval") or (0, self.scheduler.config.num_train_timesteps)
        guided = guidance_scale != 1 and lowest <= t <= highest
        weak = None
        if guided and self.guide_unet is None and no_condition is not None:  # one UNet call on [cond; uncond]
            both = {k: torch.cat([condition[k], no_condition[k]]) for k in condition}
            conditioned, weak = self.unet(torch.cat([model_input] * 2), t, **both).sample.float().chunk(2)
        else:
            conditioned = self.unet(model_input, t, **condition).sample.float()
            if guided and self.guide_unet is not None:
                weak = self.guide_unet(model_input.to(self.guide_unet.dtype), t, **condition).sample.float()
        return conditioned if weak is None else weak + guidance_scale * (conditioned - weak)

    def clip_guide(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        t: torch.Tensor,
        clip_model: Any,
        text_embeds: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """The model output whose clean digit has moved up the gradient of the CLIP's image-text similarity by
        `scale` times the noise variance (CLIP guidance on the predicted clean digit)."""
        alpha_prod = self.scheduler.alphas_cumprod.to(sample.device)[t]
        alpha, sigma = alpha_prod.sqrt(), (1 - alpha_prod).sqrt()
        kind = self.scheduler.config.prediction_type
        digit = {
            "v_prediction": alpha * sample - sigma * model_output,
            "epsilon": (sample - sigma * model_output) / alpha,
        }
        with torch.enable_grad():
            digit = digit.get(kind, model_output).detach().requires_grad_(True)
            image = clip_features(clip_model.get_image_features(pixel_values=digit.clamp(-1, 1).to(clip_model.dtype)))
            (gradient,) = torch.autograd.grad((image * text_embeds).sum(), digit)
        shift = scale * sigma**2 * gradient  # on the clean digit, in the output's terms below
        if kind == "v_prediction":
            return model_output - shift / sigma
        if kind == "epsilon":
            return model_output - alpha * shift / sigma
        return model_output + shift

    @staticmethod
    def condition_lists(
        batch_size: int | None,
        class_labels: int | list[int] | torch.Tensor | np.ndarray | None,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
    ) -> tuple[int, list[int] | None, list[str] | None, list[str] | None]:
        """The batch size, and the labels and prompts as lists of plain values, one per image (one given serves all)."""
        if isinstance(class_labels, (torch.Tensor, np.ndarray, np.generic)):
            class_labels = class_labels.tolist()
        if isinstance(class_labels, (int, float)):
            class_labels = [class_labels]
        if class_labels is not None:
            class_labels = [
                label.item() if isinstance(label, (np.generic, torch.Tensor)) else label for label in class_labels
            ]
        prompt = [prompt] if isinstance(prompt, str) else prompt
        negative_prompt = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        if batch_size is None:
            batch_size = len(class_labels or prompt or [None])
        class_labels, prompt, negative_prompt = (
            values * batch_size if values is not None and len(values) == 1 else values
            for values in (class_labels, prompt, negative_prompt)
        )
        return batch_size, class_labels, prompt, negative_prompt

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """The starting noise, float32 on `device`: drawn from `generator`, or the `latents` given, checked."""
        shape = (batch_size, self.unet.config.in_channels, *sample_shape(self.unet.config))
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if latents.shape != shape:
            raise ValueError(
                f"`latents` must have shape {shape} for batch_size={batch_size}, got {tuple(latents.shape)}."
            )
        return latents.to(device=device, dtype=torch.float32)

    def postprocess(self, latents: torch.Tensor, output_type: str) -> Any:
        """The sampler's final state as `output_type` asks, with a warning if it is not finite."""
        if not torch.isfinite(latents).all():
            warnings.warn(
                "Sampling produced values that are not finite numbers (NaN or inf), so the digits are not usable: the "
                "UNet's or the guide's weights hold them, or the guidance overflowed. Check the model folder.",
                stacklevel=3,
            )
        if output_type == "latent":
            return latents
        image = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(image) if output_type == "pil" else image

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        class_labels: int | list[int] | torch.Tensor | np.ndarray | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_scale: float = 2.0,
        noise_scale: float | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
        clip_model: Any | None = None,
        clip_tokenizer: Any | None = None,
        clip_guidance_scale: float = 0.0,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate digits.

        Args:
            batch_size (`int`, *optional*): digits to generate; defaults to the number of labels or prompts, else 1.
            generator (`torch.Generator` or a list of them, *optional*): one per image makes each image independent of
                the batch it is in.
            num_inference_steps (`int`, *optional*): 1 to the training steps; defaults to the pipeline's
                `default_num_inference_steps` (the training steps, 50, unless the model is distilled).
            timesteps (`list[int]`, *optional*): custom timesteps, descending from the last training step, for
                schedulers whose `set_timesteps` takes them.
            class_labels (`int` or `list[int]`, *optional*): the digit(s) to draw, for a class-conditional model.
            prompt (`str` or `list[str]`, *optional*): what to draw, for a text-conditional model.
            negative_prompt (`str` or `list[str]`, *optional*): what to steer away from; defaults to "".
            guidance_scale (`float`, defaults to 2.0): `w` in `weak + w * (unet - weak)`, the weak prediction being
                `guide_unet`'s (autoguidance) or the unconditioned UNet's (classifier-free guidance); 1: none.
            noise_scale (`float`, *optional*): a stochastic sampler's factor on its starting and fresh noise;
                defaults to the pipeline's `noise_scale` where the sampler takes it, else 1.
            latents (`torch.Tensor`, *optional*): the starting noise, `(batch_size, 1, 28, 28)`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (N, 28, 28, 1) or `"pt"` (N, 1, 28, 28) in
                [0, 1], or `"latent"`: the sampler's final state in [-1, 1], unclamped.
            return_dict (`bool`, defaults to `True`): return an [`ImagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, [`PipelineCallback`] or [`MultiPipelineCallbacks`], *optional*): called
                after each step with the tensors named in `callback_on_step_end_tensor_inputs` ("latents", alias
                "image", and "model_output"); it may return a dict that replaces "latents".
            clip_model ([`CLIPModel`], *optional*), clip_tokenizer ([`CLIPTokenizer`], *optional*): a CLIP that reads
                28x28 digits in [-1, 1] (such as `pretrained/mnist-clip`) and its tokenizer, to guide any model toward
                `prompt` (CLIP guidance), unconditional ones included.
            clip_guidance_scale (`float`, defaults to 0): how far each step moves the predicted clean digit up the
                gradient of the CLIP's similarity to the prompt, weighted by the noise variance so that it fades as
                the digit settles; 0: no CLIP guidance.

        Returns:
            [`ImagePipelineOutput`] or `tuple` whose first element is the list or array of images.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else self.default_num_inference_steps
        batch_size, class_labels, prompt, negative_prompt = self.condition_lists(
            batch_size, class_labels, prompt, negative_prompt
        )
        if noise_scale is None:
            noise_scale = self.default_noise_scale
        clip_guided = clip_model is not None
        self.check_inputs(
            batch_size, num_inference_steps, timesteps, generator, output_type, callback_on_step_end_tensor_inputs,
            class_labels, prompt, negative_prompt, guidance_scale, noise_scale,
            clip_guided, clip_tokenizer, clip_guidance_scale,
        )  # fmt: skip

        device = self._execution_device
        latents = self.prepare_latents(batch_size, generator, latents, device)
        if clip_guided:  # the prompt is the CLIP's; the model itself may take none
            text_embeds = clip_features(
                clip_model.get_text_features(**clip_tokenizer(prompt, padding=True, return_tensors="pt").to(device))
            )
            prompt = prompt if self.conditioning == "text" else None
        condition, no_condition = self.prepare_conditions(batch_size, class_labels, prompt, negative_prompt, device)
        timesteps = self.set_sampling_timesteps(num_inference_steps, timesteps, device)
        latents = latents * self.scheduler.init_noise_sigma * noise_scale
        # DDPM, DDIM and DPM-Solver++ take a generator for their noise; some samplers have no such argument.
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )

        scale_lcm = noise_scale != 1 and isinstance(self.scheduler, LCMScheduler)
        scale_draws = noise_scale != 1 and not scale_lcm  # stochastic DPM-Solver++ takes its noise from the pipeline

        self._interrupt = False
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            model_output = self.guided_output(latents, t, condition, no_condition, guidance_scale)
            if clip_guided and clip_guidance_scale:
                model_output = self.clip_guide(model_output, latents, t, clip_model, text_embeds, clip_guidance_scale)
            if scale_draws:
                noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=torch.float32)
                step_kwargs["variance_noise"] = noise_scale * noise
            output = self.scheduler.step(model_output, t, latents, **step_kwargs)
            latents = output.prev_sample
            if scale_lcm and i + 1 < len(timesteps):  # LCM: x_next = a x_0 + s z; scale s z alone
                alpha = self.scheduler.alphas_cumprod[timesteps[i + 1]].sqrt().to(latents.device)
                latents = alpha * output.denoised + noise_scale * (latents - alpha * output.denoised)
            if callback_on_step_end is not None:
                local = {"latents": latents, "image": latents, "model_output": model_output}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                outputs = outputs or {}
                latents = outputs.get("latents", outputs.get("image", latents))

        image = self.postprocess(latents, output_type)
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

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save weights (safetensors) and configs, and this module file, which `model_index.json` names so that
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` finds the class. The package's
        `pipeline.card.save_pipeline` adds a sample grid and the model card."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(inspect.getfile(type(self)), os.path.join(save_directory, f"{MODULE_NAME}.py"))
        index_file = os.path.join(save_directory, "model_index.json")
        with open(index_file) as f:
            index = json.load(f)
        index["_class_name"] = [MODULE_NAME, type(self).__name__]
        with open(index_file, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
