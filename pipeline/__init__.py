"""MNIST Diffusion: a 50-step diffusers DDPM for handwritten digits."""

from .model import check_unet_config, create_model_and_scheduler
from .pipeline_mnist_diffusion import MNISTDiffusionPipeline
from .sampling import image_grid

__all__ = ["MNISTDiffusionPipeline", "check_unet_config", "create_model_and_scheduler", "image_grid"]
