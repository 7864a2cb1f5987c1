"""The one factory for the denoiser and its noise schedule, and the text encoder text-conditional models take."""

import os
from typing import Any

import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel, CLIPTokenizer

from .data import looks_like_path
from .pipeline_mnist_diffusion import sample_shape

NUM_TRAIN_TIMESTEPS = 50
NUM_CLASSES = 10  # class-conditional UNets get one more embedding: the "no label" token of classifier-free guidance


def check_unet_config(config: Any) -> None:
    """Raise a clear `ValueError` if a UNet config cannot run at its `sample_size` (e.g. too many levels for 28)."""
    halvings = len(config.block_out_channels) - 1
    bad = [size for size in sample_shape(config) if size % 2**halvings]
    if bad:
        size = bad[0]
        sizes = " -> ".join(str(size // 2**i) if size % 2**i == 0 else f"{size / 2**i:g}" for i in range(halvings + 1))
        raise ValueError(
            f"A UNet with {halvings + 1} resolution levels cannot run at {size}x{size} ({sizes}): each level halves the "
            f"image and the way back up must restore it exactly. Use at most "
            f"{(size & -size).bit_length()} levels (block_out_channels) for this sample_size."
        )


def create_model_and_scheduler(
    sample_size: int = 28,
    prediction_type: str = "v_prediction",
    model_config_name_or_path: str | os.PathLike | None = None,
    conditioning: str = "none",
    cross_attention_dim: int | None = None,
) -> tuple[UNet2DModel | UNet2DConditionModel, DDPMScheduler]:
    """Build a fresh UNet (the default MNIST one, or one from a config file) and its 50-step scheduler.

    `conditioning` is "none", "class" (a `UNet2DModel` with a class embedding) or "text" (a `UNet2DConditionModel`
    that cross-attends to text-encoder states of width `cross_attention_dim`)."""
    if conditioning not in ("none", "class", "text"):
        raise ValueError(f"conditioning must be 'none', 'class' or 'text', got {conditioning!r}.")
    if conditioning == "text" and cross_attention_dim is None:
        raise ValueError("A text-conditional UNet needs the text encoder's width, cross_attention_dim.")
    config = {
        "sample_size": sample_size,
        "in_channels": 1,
        "out_channels": 1,
        # One ResNet block per level: cheaper a step than two, and better at equal steps (docs/evaluation.md).
        "layers_per_block": 1,
        # 28 -> 14 -> 7: three levels, attention only at 7x7 where it is cheap.
        "block_out_channels": (32, 64, 64),
        # 4 channels a group at 28x28: with one (diffusers' 32 groups) GroupNorm removes each channel's mean, and with
        # it the timestep embedding that ResnetBlock2D adds just before, so the 28x28 blocks ignored t
        # (docs/evaluation.md).
        "norm_num_groups": 8,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    }
    if conditioning == "text":
        # The text reaches the digit through cross-attention at 7x7, where the unconditional UNet attends: at 14x14
        # too a step costs far more for no need (docs/recipe.md).
        config["down_block_types"] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
        config["up_block_types"] = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
        config["attention_head_dim"] = 8
    if model_config_name_or_path is not None:
        if looks_like_path(str(model_config_name_or_path)) and not os.path.exists(model_config_name_or_path):
            raise FileNotFoundError(
                f"--model_config_name_or_path {model_config_name_or_path}: no such file or folder."
            )
        config = UNet2DModel.load_config(model_config_name_or_path)
    if conditioning == "text":
        config = {**config, "cross_attention_dim": cross_attention_dim}
        unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if k != "_class_name"})
    else:
        if conditioning == "class":
            config = {**config, "num_class_embeds": NUM_CLASSES + 1}
        unet = UNet2DModel.from_config({k: v for k, v in config.items() if k != "_class_name"})
    check_unet_config(unet.config)
    if unet.config.in_channels != 1 or unet.config.out_channels != 1:
        raise ValueError(
            f"The UNet config has {unet.config.in_channels} input and {unet.config.out_channels} output channels; "
            "MNIST digits need 1 and 1."
        )
    # The cosine schedule ends at alphas_cumprod ~ 1e-6, so step 50 is pure noise (diffusers' default linear betas leave
    # much of the digit visible). There an epsilon prediction says almost nothing about the digit, so the default is
    # v-prediction (Salimans & Ho 2022), well posed at every step (docs/evaluation.md). "trailing" spacing makes every
    # sampler swapped in with `from_config` start at the last training step, pure noise.
    scheduler = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )
    return unet, scheduler


def load_text_encoder(name_or_path: str, cache_dir: str | None = None) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A frozen CLIP text encoder and its tokenizer, from the Hub or a folder."""
    if looks_like_path(name_or_path) and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"--text_encoder {name_or_path}: no such folder.")
    verbosity = transformers.logging.get_verbosity()
    # A whole CLIP's folder (pretrained/mnist-clip, openai/clip-vit-base-patch32) holds a vision tower too, which
    # transformers would list key by key as unexpected.
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, cache_dir=cache_dir)
    except OSError as e:
        raise ValueError(
            f"Could not load the text encoder {name_or_path!r} ({str(e).splitlines()[0]}). --text_encoder "
            "takes a Hub id or a folder holding a CLIP text model and its tokenizer."
        ) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    return text_encoder.requires_grad_(False).eval(), tokenizer
