"""`MNISTDiffusionPipeline` as a diffusers user meets it: diffusers' own `DDPMPipeline` tests, ported to one channel.

Wherever the stock `DDPMPipeline` defines the answer, the images must equal its images on the same weights and seeds.
The deliberate differences, each tested here:
- Sampling always starts from pure noise. Where a scheduler's own grid would start lower (diffusers' default "leading"
  spacing with fewer steps than the training steps), the pipeline re-spaces it "trailing", so the reference is the
  stock pipeline with a trailing scheduler.
- The sampler's state is float32 whatever the UNet's dtype, so `output_type="pt"` is float32 after
  `pipe.to(torch.bfloat16)` (the stock pipeline returns bf16).
- `output_type="latent"` returns that state, in [-1, 1] and unclamped, as current diffusers pipelines return latents
  (the stock pipeline returns the same numpy array as for "np").
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import PipelineCallback

from pipeline import MNISTDiffusionPipeline, create_model_and_scheduler


def dummy_unet(sample_size: int | tuple[int, int] = 8) -> UNet2DModel:
    """diffusers' `dummy_uncond_unet`, with one input and one output channel."""
    torch.manual_seed(0)
    return UNet2DModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def quiet(pipe: DiffusionPipeline) -> DiffusionPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trailing(scheduler: DDPMScheduler) -> DDPMScheduler:
    return type(scheduler).from_config(scheduler.config, timestep_spacing="trailing")


def seed(n: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(n)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_fast_inference_and_predict_sample(prediction_type):
    # diffusers' test_fast_inference and test_inference_predict_sample: 2 steps of a 1000-step scheduler.
    unet, scheduler = dummy_unet(), DDPMScheduler(prediction_type=prediction_type)
    ours = quiet(MNISTDiffusionPipeline(unet=unet, scheduler=scheduler))
    image = ours(generator=seed(), num_inference_steps=2, output_type="np").images
    (from_tuple,) = ours(generator=seed(), num_inference_steps=2, output_type="np", return_dict=False)
    assert image.shape == (1, 8, 8, 1)
    np.testing.assert_array_equal(image, from_tuple)
    expected = quiet(DDPMPipeline(unet=unet, scheduler=trailing(scheduler)))(
        generator=seed(), num_inference_steps=2, output_type="np"
    ).images
    np.testing.assert_array_equal(image, expected)
    # Where the stock grid already starts from pure noise (all the training steps), no re-spacing: the same images.
    small = DDPMScheduler(num_train_timesteps=10, prediction_type=prediction_type)
    stock = quiet(DDPMPipeline(unet=unet, scheduler=small))(generator=seed(), num_inference_steps=10, output_type="np")
    stock = stock.images
    np.testing.assert_array_equal(
        quiet(MNISTDiffusionPipeline(unet, small))(generator=seed(), output_type="np").images, stock
    )


def test_from_save_pretrained_at_every_step_count(tmp_path):
    # diffusers' test_from_save_pretrained on a 10-step scheduler, at each step count the stock pipeline runs.
    unet, scheduler = dummy_unet(), DDPMScheduler(num_train_timesteps=10)
    ours = quiet(MNISTDiffusionPipeline(unet=unet, scheduler=scheduler))
    ours.save_pretrained(tmp_path)
    loaded = quiet(MNISTDiffusionPipeline.from_pretrained(tmp_path))
    remote = quiet(DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True))
    stock = quiet(DDPMPipeline(unet=unet, scheduler=trailing(scheduler)))
    for steps in range(1, 11):
        image = ours(generator=seed(), num_inference_steps=steps, output_type="np").images
        stock_image = stock(generator=seed(), num_inference_steps=steps, output_type="np").images
        np.testing.assert_array_equal(stock_image, image, err_msg=str(steps))
        for other in (loaded, remote):  # reloaded weights may take other kernels: diffusers' own tolerance
            other_image = other(generator=seed(), num_inference_steps=steps, output_type="np").images
            np.testing.assert_allclose(other_image, image, atol=1e-5, rtol=0, err_msg=str(steps))


def test_a_list_of_generators_makes_each_image_its_own(tiny_pipeline):
    batch = tiny_pipeline(generator=[seed(0), seed(1), seed(2)], batch_size=3, num_inference_steps=5, output_type="np")
    for i in range(3):
        alone = tiny_pipeline(generator=seed(i), num_inference_steps=5, output_type="np").images
        np.testing.assert_allclose(batch.images[i : i + 1], alone, atol=1e-5, rtol=0)  # other batch, other kernels
    stock = quiet(DDPMPipeline(**{k: tiny_pipeline.components[k] for k in ("unet", "scheduler")}))
    expected = stock(generator=[seed(0), seed(1), seed(2)], batch_size=3, num_inference_steps=5, output_type="np")
    np.testing.assert_array_equal(batch.images, expected.images)
    with pytest.raises(ValueError, match="Got 2 generators for batch_size=3"):
        tiny_pipeline(generator=[seed(0), seed(1)], batch_size=3)


def test_components_drive_the_stock_pipeline_to_the_same_images(tiny_pipeline):
    stock = quiet(DDPMPipeline(**{k: tiny_pipeline.components[k] for k in ("unet", "scheduler")}))
    for steps in (1, 7, 50):
        np.testing.assert_array_equal(
            tiny_pipeline(generator=seed(), batch_size=2, num_inference_steps=steps, output_type="np").images,
            stock(generator=seed(), batch_size=2, num_inference_steps=steps, output_type="np").images,
        )


def test_output_types_and_dtypes(tiny_pipeline):
    run = lambda output_type: tiny_pipeline(generator=seed(), num_inference_steps=4, output_type=output_type).images  # noqa: E731
    latent, pt, array = run("latent"), run("pt"), run("np")
    assert latent.dtype == pt.dtype == torch.float32 and array.dtype == np.float32
    assert latent.shape == pt.shape == (1, 1, 28, 28) and array.shape == (1, 28, 28, 1)
    torch.testing.assert_close((latent / 2 + 0.5).clamp(0, 1), pt)
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), array)
    tiny_pipeline.to(torch.bfloat16)
    bf16 = run("pt")
    assert bf16.dtype == torch.float32 and tiny_pipeline.unet.dtype == torch.bfloat16
    assert (bf16 - pt).abs().max() < 0.1  # the same digits, to bf16's precision
    stock = quiet(DDPMPipeline(**{k: tiny_pipeline.components[k] for k in ("unet", "scheduler")}))
    assert stock(generator=seed(), num_inference_steps=4, output_type="pt").images.dtype == torch.bfloat16


class ZeroLatents(PipelineCallback):
    """A diffusers callback that replaces the latents by zeros at its cutoff step."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}


def test_callbacks_latents_and_interrupt(tiny_pipeline):
    # A PipelineCallback brings its own tensor_inputs; replacing the last latents by zeros gives mid-grey digits.
    out = tiny_pipeline(
        num_inference_steps=5,
        output_type="pt",
        callback_on_step_end=ZeroLatents(cutoff_step_ratio=None, cutoff_step_index=4),
    )
    assert torch.equal(out.images, torch.full_like(out.images, 0.5))
    # "image" is an alias of "latents", for callbacks written against earlier versions.
    seen = []
    tiny_pipeline(
        num_inference_steps=3,
        callback_on_step_end=lambda p, i, t, kw: seen.append(kw["image"] is kw["latents"]) or {},
        callback_on_step_end_tensor_inputs=["latents", "image"],
    )
    assert seen == [True] * 3
    # `interrupt` skips the remaining steps, as in diffusers' pipelines.
    calls = []
    tiny_pipeline.unet.register_forward_hook(lambda *a: calls.append(1))

    def stop_after_two(pipe, i, t, kw):
        pipe._interrupt = i == 1
        return {}

    tiny_pipeline(num_inference_steps=10, callback_on_step_end=stop_after_two)
    assert len(calls) == 2


def test_non_square_sample_size():
    unet, scheduler = dummy_unet(sample_size=(8, 16)), DDPMScheduler(num_train_timesteps=10)
    image = quiet(MNISTDiffusionPipeline(unet, scheduler))(generator=seed(), output_type="np").images
    assert image.shape == (1, 8, 16, 1)
    stock = quiet(DDPMPipeline(unet=unet, scheduler=scheduler))
    np.testing.assert_array_equal(image, stock(generator=seed(), num_inference_steps=10, output_type="np").images)


SWAPPED_IN = [
    DDPMScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
    LCMScheduler,
]


@pytest.mark.parametrize("scheduler_cls", SWAPPED_IN, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_any_scheduler_at_any_step_count_starts_from_pure_noise(scheduler_cls, spacing):
    _, scheduler = create_model_and_scheduler()
    config = dict(
        scheduler.config, timestep_spacing=spacing
    )  # "leading": folders saved before trailing became default
    pipe = quiet(MNISTDiffusionPipeline(dummy_unet(28), scheduler_cls.from_config(config)))
    last = scheduler.config.num_train_timesteps - 1
    # Every count on trailing configs; a spread of counts (each stride and the extremes) on leading ones, to save time.
    # The spread runs to the end; other counts stop after the first step, which is what they check.
    spread = (1, 2, 7, 10, 20, 25, 33, 49, 50)
    for steps in range(1, last + 2) if spacing == "trailing" else spread:
        if scheduler_cls is DDIMScheduler and (last + 1) % steps:
            with pytest.raises(ValueError, match="divides 50"):
                pipe(num_inference_steps=steps)
            continue
        first = []

        def record_first(p, i, t, kw, first=first, stop=steps not in spread):
            if i == 0:
                first.append(float(t))
                p._interrupt = stop

        out = pipe(
            generator=seed(), num_inference_steps=steps, output_type="latent", callback_on_step_end=record_first
        )
        assert first == [last] and torch.isfinite(out.images).all(), steps
