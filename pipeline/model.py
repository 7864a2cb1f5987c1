"""The one factory for the denoiser and its noise schedule."""

import os

from diffusers import DDPMScheduler, UNet2DModel

from .pipeline_mnist_diffusion import check_unet_config

NUM_TRAIN_TIMESTEPS = 50


def create_model_and_scheduler(
    sample_size: int = 28,
    prediction_type: str = "v_prediction",
    model_config_name_or_path: str | os.PathLike | None = None,
) -> tuple[UNet2DModel, DDPMScheduler]:
    """Build a fresh `UNet2DModel` (the default MNIST one, or one from a config file) and its 50-step scheduler."""
    if model_config_name_or_path is None:
        unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=1,
            out_channels=1,
            layers_per_block=2,
            # 28 -> 14 -> 7: three levels, attention only at 7x7 where it is cheap.
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        )
    else:
        unet = UNet2DModel.from_config(UNet2DModel.load_config(model_config_name_or_path))
    check_unet_config(unet.config)
    if unet.config.in_channels != 1 or unet.config.out_channels != 1:
        raise ValueError(
            f"The UNet config has {unet.config.in_channels} input and {unet.config.out_channels} output channels; "
            "MNIST digits need 1 and 1."
        )
    # The cosine schedule ends at alphas_cumprod ~ 1e-6, so step 50 is pure noise; diffusers' default linear betas
    # would leave 78% of the digit visible after 50 steps. At such a low signal-to-noise ratio an epsilon prediction
    # says almost nothing about the digit (x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) amplifies its errors 1000x), so
    # the default is v-prediction (Salimans & Ho 2022), which stays well posed at every step: after one epoch
    # FID 27 against 1832 for epsilon (docs/evaluation.md).
    scheduler = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
    )
    return unet, scheduler
