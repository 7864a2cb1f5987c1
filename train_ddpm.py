#!/usr/bin/env python
"""Train the 50-step MNIST DDPM with Accelerate.

    python train_ddpm.py --dataset_name ylecun/mnist --output_dir ddpm-mnist            # one device or the CPU
    accelerate launch --config_file accelerate_config.yaml train_ddpm.py --output_dir ddpm-mnist   # several GPUs

The result is a `MNISTDiffusionPipeline` folder in `--output_dir` (EMA weights), loadable with
`DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True)`.
"""

import argparse
import copy
import json
import logging
import math
import os
import signal
import sys

import datasets
import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, LCMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from huggingface_hub import create_repo
from tqdm.auto import tqdm

from pipeline import MNISTDiffusionPipeline, create_model_and_scheduler, image_grid
from pipeline.data import load_images
from pipeline.evaluate import MIN_SAMPLES, evaluate_digits, evaluation_results, reference_features
from pipeline.loss import ConsistencyDistillationLoss, DiffusionLoss, Discriminator
from pipeline.model import NUM_CLASSES, caption_states, load_text_encoder
from pipeline.pipeline_mnist_diffusion import consistency_timesteps, to_uint8
from pipeline.sampling import (
    default_mixed_precision,
    default_sampler,
    digit_cycle,
    generate,
    load_pipeline,
    make_scheduler,
    native_bf16,
)
from pipeline.training import (
    CHECKPOINT_CONFIG,
    TRAINING_STATE,
    OutputDirLock,
    StopSignals,
    TrainingClock,
    check_resume_settings,
    checkpoint_step,
    device_name,
    ema_weights,
    epoch_permutation,
    find_checkpoint,
    load_checkpoint,
    micro_batch_slice,
    remove_partial_checkpoints,
    resolve_resume,
    save_checkpoint,
    seed_for,
    set_aside_newer_checkpoints,
    use_plain_attention,
)

logger = get_logger(__name__)
# Settings of --distill_from runs only: plain training runs do not record them.
DISTILL_SETTINGS = (
    "distill_from", "num_ddim_timesteps", "loss_type", "huber_c", "ema_decay", "timestep_scaling_factor",
    "num_inference_steps", "guidance_scale", "adversarial_weight", "discriminator_learning_rate",
    "distribution_matching_weight", "fake_score_learning_rate", "fake_score_updates",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, named as in diffusers' `train_unconditional.py` where they overlap."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default="ylecun/mnist", help="Hub dataset id, or a local copy in its layout.")
    data.add_argument("--dataset_config_name", default=None, help="The dataset's config, if it has several.")
    data.add_argument("--train_data_dir", default=None, help="A folder of images (imagefolder); overrides the above.")
    data.add_argument("--cache_dir", default=None, help="Where datasets caches downloads and decoded data.")
    data.add_argument("--split", default="train", help="The dataset split to train on.")
    data.add_argument("--image_column", default=None, help="Default: the first Image column.")
    data.add_argument("--label_column", default=None, help="Default: the first ClassLabel column, if any.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N images only.")
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Convert images to grayscale and resize them to this size. Default: images must already be 28x28 L.",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Processes that decode the dataset.")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_config_name_or_path", default=None, help="A UNet2DModel config (json or folder); default: built in."
    )
    model.add_argument(
        "--conditioning",
        default="none",
        choices=["none", "class", "text"],
        help="Unconditional, class-conditional (10 labels + 'no label'), or text-conditional through --text_encoder.",
    )
    model.add_argument(
        "--condition_dropout",
        type=float,
        default=0.1,
        help="Drop labels/captions this often (classifier-free guidance).",
    )
    model.add_argument(
        "--text_encoder",
        default="openai/clip-vit-base-patch32",
        help="A CLIP text model and tokenizer (Hub id or folder), frozen, for --conditioning text.",
    )
    model.add_argument(
        "--prediction_type",
        default="v_prediction",
        choices=["epsilon", "v_prediction", "sample"],
        help="What the UNet predicts. v_prediction by default: with 50 steps ending at pure noise, epsilon models "
        "must recover the digit from tiny differences and sample blobs (docs/evaluation.md).",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="ddpm-mnist", help="Where the pipeline, checkpoints and logs go.")
    train.add_argument("--seed", type=int, default=0, help="Seeds the weights, the data order and the noise.")
    train.add_argument(
        "--train_batch_size",
        type=int,
        default=64,  # twice the updates of 128 for the same images and minutes: better at equal time
        help="Batch size per device.",
    )
    train.add_argument("--eval_batch_size", type=int, default=64, help="Digits in each saved sample grid.")
    train.add_argument("--num_epochs", type=int, default=5, help="Passes over the data.")
    train.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument(
        "--learning_rate", type=float, default=None, help="Default: 1e-3, or 1e-4 with --distill_from (fine-tuning)."
    )
    train.add_argument(
        "--lr_scheduler",
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    train.add_argument("--lr_warmup_steps", type=int, default=200)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument(
        "--weighting_scheme",
        default="logit_normal",  # the middle noise levels: FID 10.65 against 13.69 for "none" (docs/evaluation.md)
        choices=["none", "logit_normal", "mode"],
        help="How training timesteps are drawn: uniformly, or from one of SD3's densities over noise levels.",
    )
    train.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal density.")
    train.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal density.")
    train.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode density.")
    train.add_argument(
        "--snr_gamma", type=float, default=None, help="Min-SNR weighting: cap the weight of steps with SNR above this."
    )
    train.add_argument(
        "--immiscible_noise",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Pair each image with a near noise draw within its batch (Immiscible Diffusion).",
    )
    train.add_argument(
        "--stratified_timesteps",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Draw each batch's timesteps from equal slices of the density (stratified sampling).",
    )
    train.add_argument(
        "--stable_target_reference_size",
        type=int,
        default=None,
        help="Regress on the posterior mean over each digit and this many reference digits drawn every step, not on "
        "the digit alone (Stable Target Field); with --conditioning, over the reference digits of its label. 0: off. "
        "Default: 16384, and 0 for --distill_from.",
    )
    train.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="Save EMA weights.")
    train.add_argument(
        "--autoguidance_fraction",
        type=float,
        default=None,
        help="Save the (EMA) weights after this fraction of the training steps with the pipeline, as its guide_unet: "
        "sampling guides away from this weaker model (autoguidance, Karras et al. 2024). 0: none. Default: 0.2 for "
        "unconditional models, 0 for conditional ones (they have classifier-free guidance).",
    )
    train.add_argument(
        "--guidance_interval",
        type=int,
        nargs=2,
        default=[9, 45],
        metavar=("LOWEST", "HIGHEST"),
        help="The timesteps at which the guide is applied: it does nothing at the noisiest ones and over-sharpens "
        "at the cleanest (docs/evaluation.md#autoguidance).",
    )
    train.add_argument("--ema_inv_gamma", type=float, default=1.0, help="Inverse gamma of the EMA warmup.")
    train.add_argument("--ema_power", type=float, default=3 / 4, help="Power of the EMA warmup.")
    train.add_argument("--ema_max_decay", type=float, default=0.9999, help="Largest EMA decay.")
    train.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Default: the accelerate config's choice, else bf16 where the GPU or CPU runs it natively, else no.",
    )

    distill = parser.add_argument_group("few-step distillation (diffusers' train_lcm_distill_*.py names)")
    distill.add_argument(
        "--distill_from",
        default=None,
        help="A trained pipeline (folder or Hub id): distil it into a student that samples in a few steps "
        "(latent consistency distillation; the student starts from its weights).",
    )
    distill.add_argument(
        "--num_ddim_timesteps",
        type=int,
        default=50,
        help="Points of the teacher's 50 timesteps the student learns on (a divisor of 50).",
    )
    distill.add_argument(
        "--loss_type", default="huber", choices=["l2", "huber"], help="Distance between the consistency outputs."
    )
    distill.add_argument("--huber_c", type=float, default=0.015, help="The pseudo-Huber loss's c (0.00054 sqrt(784)).")
    distill.add_argument("--ema_decay", type=float, default=0.95, help="EMA decay of the target network.")
    distill.add_argument(
        "--timestep_scaling_factor", type=float, default=10.0, help="LCMScheduler's boundary-condition scaling."
    )
    distill.add_argument(
        "--num_inference_steps", type=int, default=4, help="The steps the distilled pipeline samples with by default."
    )
    distill.add_argument(
        "--guidance_scale",
        type=float,
        default=3.0,
        help="A teacher with a guide_unet is distilled with its autoguidance at this scale (1: the teacher alone; "
        "3, above the teacher's own 2, scores best in the student's 4 steps: docs/speed.md).",
    )
    distill.add_argument(
        "--adversarial_weight",
        type=float,
        default=None,
        help="Also train the student against a small discriminator of real digits, on digits of its own sampler, its "
        "GAN loss at this weight (0: off). Default 0.1 with --distill_from, which measured best (docs/speed.md).",
    )
    distill.add_argument(
        "--discriminator_learning_rate", type=float, default=2e-4, help="Adam's learning rate for the discriminator."
    )
    distill.add_argument(
        "--distribution_matching_weight",
        type=float,
        default=0.0,
        help="Also pull the student's digits towards the guided teacher's distribution (DMD2's distribution "
        "matching, against a fake score trained beside it) at this weight (0: off). It helps 2 steps and costs 4, "
        "the default (docs/speed.md).",
    )
    distill.add_argument(
        "--fake_score_learning_rate", type=float, default=1e-4, help="AdamW's learning rate for the fake score."
    )
    distill.add_argument(
        "--fake_score_updates",
        type=int,
        default=1,
        help="Fake-score updates per student update, the extra ones on fresh digits of the student's sampler "
        "(DMD2's two time-scale rule, its dfake_gen_update_ratio; it takes 5).",
    )

    out = parser.add_argument_group("logging, checkpoints and the Hub")
    out.add_argument("--logger", default="tensorboard", choices=["tensorboard", "wandb"])
    out.add_argument("--logging_dir", default="logs", help="TensorBoard logs, inside --output_dir.")
    out.add_argument("--save_images_epochs", type=int, default=1, help="Save a sample grid every N epochs.")
    out.add_argument("--save_model_epochs", type=int, default=5, help="Save the pipeline every N epochs.")
    out.add_argument(
        "--eval_epochs", type=int, default=None, help="Every N epochs, score samples (FID...) against --eval_split."
    )
    out.add_argument("--eval_num_samples", type=int, default=1000, help="Digits generated for each evaluation.")
    out.add_argument("--eval_split", default="test", help="The real split that evaluations compare against.")
    out.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    out.add_argument("--checkpoints_total_limit", type=int, default=3, help="Keep at most N checkpoints.")
    out.add_argument(
        "--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" (starts fresh if none).'
    )
    out.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline to the Hub at the end.")
    out.add_argument("--hub_model_id", default=None, help="Hub repository; default: the name of --output_dir.")
    out.add_argument("--hub_token", default=None, help="Hub token; default: the one `hf auth login` stored.")
    out.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)

    for name in ("train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                 "save_images_epochs", "save_model_epochs", "checkpointing_steps", "num_inference_steps"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "eval_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.eval_num_samples < MIN_SAMPLES:
        parser.error(
            f"--eval_num_samples must be at least {MIN_SAMPLES} (scoring needs them), got {args.eval_num_samples}."
        )
    if args.distill_from and (args.model_config_name_or_path or args.conditioning != "none"):
        parser.error(
            "--distill_from: the student copies the teacher's UNet, conditioning and noise schedule; drop "
            "--model_config_name_or_path and --conditioning."
        )
    if args.stable_target_reference_size is None:
        args.stable_target_reference_size = 0 if args.distill_from else 16384
    if args.stable_target_reference_size < 0 or (args.stable_target_reference_size and args.distill_from):
        parser.error(
            "--stable_target_reference_size must be 0 or positive, and is for denoising training (a distilled "
            f"student's target is its teacher's); got {args.stable_target_reference_size}."
        )
    if not args.guidance_scale >= 1:
        parser.error(f"--guidance_scale must be at least 1 (1: no guidance), got {args.guidance_scale}.")
    if args.adversarial_weight is None:
        args.adversarial_weight = 0.1 if args.distill_from else 0.0
    if args.adversarial_weight < 0 or (args.adversarial_weight and not args.distill_from):
        parser.error(
            f"--adversarial_weight must be 0 or positive, and needs --distill_from; got {args.adversarial_weight}."
        )
    if args.distribution_matching_weight < 0 or (args.distribution_matching_weight and not args.distill_from):
        parser.error(
            "--distribution_matching_weight must be 0 or positive, and needs --distill_from; got "
            f"{args.distribution_matching_weight}."
        )
    if args.fake_score_updates < 1 or (args.fake_score_updates > 1 and not args.distribution_matching_weight):
        parser.error(
            "--fake_score_updates must be 1 or more, and more than 1 needs --distribution_matching_weight; got "
            f"{args.fake_score_updates}."
        )
    for name in ("discriminator_learning_rate", "fake_score_learning_rate"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}.")
    if not 0 <= args.condition_dropout < 1:
        parser.error(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}.")
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.distill_from else 1e-3
    if args.autoguidance_fraction is None:
        args.autoguidance_fraction = 0.2 if args.conditioning == "none" and not args.distill_from else 0.0
    if not 0 <= args.autoguidance_fraction < 1:
        parser.error(f"--autoguidance_fraction must be in [0, 1) (0: no guide), got {args.autoguidance_fraction}.")
    if args.distill_from and args.autoguidance_fraction:
        parser.error("--autoguidance_fraction: a distilled student samples without a guide; drop it.")
    if not 0 <= args.guidance_interval[0] <= args.guidance_interval[1]:
        parser.error(f"--guidance_interval must be two timesteps, lowest first, got {args.guidance_interval}.")
    if args.learning_rate <= 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}.")
    return args


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The Accelerator for this run, in the precision asked for or the best one the hardware runs natively."""
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or default_mixed_precision()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        # The LR schedule counts optimizer steps, whatever the number of processes.
        step_scheduler_with_optimizer=False,
    )
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU; on a CPU use bf16 or no.")
    if mixed_precision == "bf16" and accelerator.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU cannot do bf16; use --mixed_precision fp16 or no.")
    if mixed_precision == "bf16" and accelerator.device.type == "cpu" and not native_bf16(accelerator.device):
        logger.warning(
            "This CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it, several times slower than fp32. "
            "Use --mixed_precision no."
        )
    return accelerator


def load_data(
    args: argparse.Namespace, accelerator: Accelerator, size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training images `(N, 1, size, size)` uint8 and, for conditional training, their labels, on the device."""
    with accelerator.main_process_first():  # the main process decodes and caches, the others read the cache
        images, labels = load_images(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_data_dir=args.train_data_dir,
            split=args.split,
            cache_dir=args.cache_dir,
            image_column=args.image_column,
            label_column=args.label_column,
            max_train_samples=args.max_train_samples,
            resolution=args.resolution,
            size=size,
            num_proc=args.dataloader_num_workers,
        )
    if args.conditioning == "none":
        return images.to(accelerator.device), None
    if labels is None:
        raise ValueError(
            f"--conditioning {args.conditioning} needs digit labels, and the dataset has no column of integer labels: "
            "name it with --label_column."
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"--conditioning needs labels 0..{NUM_CLASSES - 1}; the dataset has {labels.unique()}.")
    return images.to(accelerator.device), labels.to(accelerator.device)


def load_teacher(
    args: argparse.Namespace, device: torch.device
) -> tuple[UNet2DModel, MNISTDiffusionPipeline, LCMScheduler]:
    """For --distill_from: the student (a copy of the teacher's UNet), the frozen teacher pipeline (its UNet and
    guide, on `device`), and the student's `LCMScheduler` on the teacher's noise schedule."""
    teacher = load_pipeline(args.distill_from)
    if teacher.conditioning != "none":
        raise ValueError(
            f"--distill_from {args.distill_from} is {teacher.conditioning}-conditional; distillation takes unconditional "
            "models for now."
        )
    if not isinstance(teacher.scheduler, DDPMScheduler):
        raise ValueError(
            f"--distill_from {args.distill_from} samples with a {type(teacher.scheduler).__name__}, not the "
            "DDPMScheduler of a trained model: distil from the model that was trained, not from a distilled one."
        )
    num_train_timesteps = teacher.scheduler.config.num_train_timesteps
    if num_train_timesteps % args.num_ddim_timesteps:
        raise ValueError(
            f"--num_ddim_timesteps must divide the teacher's {num_train_timesteps} training steps, "
            f"got {args.num_ddim_timesteps}."
        )
    config = {k: v for k, v in teacher.scheduler.config.items() if k != "variance_type"}  # DDPM's only
    scheduler = LCMScheduler.from_config(
        config,
        original_inference_steps=args.num_ddim_timesteps,
        timestep_scaling=args.timestep_scaling_factor,
    )
    student = copy.deepcopy(teacher.unet).train()
    for unet in (teacher.unet, teacher.guide_unet):
        if unet is not None:
            use_plain_attention(unet.requires_grad_(False).eval().to(device), device)
    return student, teacher, scheduler


def make_optimization(
    args: argparse.Namespace, model: torch.nn.Module, max_train_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, EMAModel | None]:
    """AdamW, its warm-up and decay, and the EMA of the weights (None without --use_ema)."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
    )
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=type(model),
            model_config=model.config,
            foreach=True,
        )
    return optimizer, lr_scheduler, ema_model


def claim_output_dir(args: argparse.Namespace, resume_path: str | None) -> tuple[OutputDirLock, str | None]:
    """Main process: lock --output_dir for this run, tidy it for the resumed lineage, create the Hub repository."""
    lock = OutputDirLock(args.output_dir)
    remove_partial_checkpoints(args.output_dir)
    if resume_path is not None:
        for path in set_aside_newer_checkpoints(args.output_dir, checkpoint_step(resume_path)):
            print(f"Set aside {path}: it is not in the lineage of {resume_path}.")
    repo_id = None
    if args.push_to_hub:
        repo_id = create_repo(
            args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
            exist_ok=True,
            private=args.hub_private_repo,
            token=args.hub_token,
        ).repo_id
    return lock, repo_id


def restart_lr_schedule(
    args: argparse.Namespace, lr_scheduler: torch.optim.lr_scheduler.LRScheduler, max_train_steps: int, step: int
) -> None:
    """Replace a resumed run's learning-rate schedule by the one its flags now ask for, continuing at `step`."""
    optimizer = lr_scheduler.scheduler.optimizer
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = args.learning_rate
    lr_scheduler.scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
        last_epoch=step - 1,
    )


def save_outputs(
    pipeline: MNISTDiffusionPipeline,
    ema_model: EMAModel | None,
    accelerator: Accelerator,
    args: argparse.Namespace,
    training_args: dict,
    record: dict,
    save_images: bool,
    save_model: bool,
    real_features: np.ndarray | None = None,
    push_to: str | None = None,
) -> None:
    """With the EMA weights: a sample grid, scores (given the real features), the pipeline, a Hub upload."""
    unet = pipeline.unet
    card_results = {
        "training_steps": record["step"],
        "training_minutes": round(record["train_minutes"], 1),
        "training_processes": accelerator.num_processes,
        "training_device": device_name(accelerator.device),
    }
    with ema_weights(unet, ema_model):
        unet.eval()
        # At the step the guide is taken it is these very weights: guiding by it would only double the UNet calls.
        guide = pipeline.guide_unet
        same = guide is not None and all(map(torch.equal, guide.parameters(), unet.parameters()))
        guidance = {"guidance_scale": 1.0} if same else {}  # otherwise the pipeline's default
        if save_images:
            digits = to_uint8(
                pipeline(
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                    **guidance,
                    **pipeline.example_conditions(args.eval_batch_size),
                ).images
            )
            image_grid(digits).save(os.path.join(args.output_dir, "samples", f"epoch_{record['epoch']:04d}.png"))
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("samples", digits[:, None], record["epoch"], dataformats="NCHW")
                elif tracker.name == "wandb":
                    import wandb

                    tracker.log({"samples": [wandb.Image(d) for d in digits]}, step=record["step"])
        if real_features is not None:
            # Scored the way `mnist-diffusion evaluate` scores a saved model, with its default sampler; conditional
            # models are asked for 0..9 in turn and scored on whether they drew what was asked.
            sampler, steps = default_sampler(pipeline)
            scorer = MNISTDiffusionPipeline(
                **{**pipeline.components, "scheduler": make_scheduler(sampler, pipeline.scheduler.config)},
                guidance_interval=pipeline.config.guidance_interval,
            )
            wanted = digit_cycle(args.eval_num_samples) if pipeline.conditioning != "none" else None
            with accelerator.autocast():
                digits = generate(scorer, args.eval_num_samples, 0, 125, steps, wanted, progress=False, **guidance)
            results = {**evaluate_digits(digits, real_features, wanted), "scheduler": sampler, "steps": steps}
            card_results.update(evaluation_results(results))
            accelerator.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, float)}, step=record["step"])
            with open(os.path.join(args.output_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps({**record, **results}) + "\n")
            logger.info(f"Step {record['step']}: FID {results['fid']:.2f} on {len(digits)} samples")
        if save_model:
            pipeline.save_pretrained(args.output_dir, training_args=training_args, results=card_results)
        if push_to is not None:
            pipeline.push_to_hub(
                push_to,
                training_args=training_args,
                results=card_results,
                token=args.hub_token,
                commit_message="End of training",
            )
        unet.train()


def main(args: argparse.Namespace) -> None:
    """Train, checkpoint, and save the pipeline to `args.output_dir`."""
    accelerator = make_accelerator(args)
    device = accelerator.device
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:  # one copy of each library warning is enough
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    training_args = {
        k: v for k, v in vars(args).items() if k != "hub_token" and (args.distill_from or k not in DISTILL_SETTINGS)
    }

    # The model, and the checks that protect what is already in --output_dir, before any data is read.
    text_encoder = tokenizer = teacher = None
    if args.conditioning == "text":
        text_encoder, tokenizer = load_text_encoder(args.text_encoder, args.cache_dir)
        text_encoder.to(device)
    if args.distill_from:
        model, teacher, noise_scheduler = load_teacher(args, device)
    else:
        model, noise_scheduler = create_model_and_scheduler(
            args.resolution or 28,
            args.prediction_type,
            args.model_config_name_or_path,
            args.conditioning,
            text_encoder.config.hidden_size if text_encoder is not None else None,
        )
    model_config = {"unet": dict(model.config), "scheduler": dict(noise_scheduler.config)}
    use_plain_attention(model, device)
    resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint, model_config)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        accelerator.print(f"No checkpoint in {args.output_dir} yet: starting a new training run.")
    state, schedule_changes = check_resume_settings(resume_path, training_args, accelerator.num_processes)

    # Data: decoded once into a uint8 tensor on the device; batches are slices of a per-epoch permutation.
    images, labels = load_data(args, accelerator, model.config.sample_size)
    null_condition = {"class_labels": torch.tensor(NUM_CLASSES, device=device)}  # the "no label" token
    if args.conditioning == "text":
        # The encoder is frozen: every caption's states are computed once, here, not at every step.
        captions, empty = caption_states(MNISTDiffusionPipeline(model, noise_scheduler, text_encoder, tokenizer))
        null_condition = {"encoder_hidden_states": empty}
    real_features = None
    if args.eval_epochs and accelerator.is_main_process:  # now, so that a missing split fails before training
        real_features = reference_features(args.dataset_name, args.eval_split, args.cache_dir)
    global_batch_size = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    steps_per_epoch = len(images) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"The dataset has {len(images)} images, fewer than one global batch of {global_batch_size} "
            "(train_batch_size x gradient_accumulation_steps x processes). Lower --train_batch_size."
        )
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    # The guide is the model at an earlier step (0: none; a one-step run has no earlier model).
    guide_step = max(1, round(args.autoguidance_fraction * max_train_steps)) if args.autoguidance_fraction else 0
    guide_step = guide_step if guide_step < max_train_steps else 0
    if accelerator.is_main_process:  # from here on this run writes to --output_dir, and no other run may
        _lock, repo_id = claim_output_dir(args, resume_path)

    # Optimizer, LR schedule, EMA and the objective.
    optimizer, lr_scheduler, ema_model = make_optimization(args, model, max_train_steps)
    target = discriminator = discriminator_optimizer = fake_score = fake_score_optimizer = None
    if teacher is not None:
        # The consistency target: an EMA of the student (decay --ema_decay), a frozen copy of it between updates.
        target = copy.deepcopy(model).requires_grad_(False).eval().to(device)
        if args.adversarial_weight:
            discriminator = Discriminator().to(device)
            discriminator_optimizer = torch.optim.Adam(
                discriminator.parameters(), lr=args.discriminator_learning_rate, betas=(0.5, 0.999)
            )
        if args.distribution_matching_weight:  # DMD2 starts the fake score as a copy of the teacher
            fake_score = copy.deepcopy(teacher.unet).requires_grad_(True).train()
            fake_score_optimizer = torch.optim.AdamW(
                fake_score.parameters(), lr=args.fake_score_learning_rate, eps=args.adam_epsilon
            )
        loss_fn = ConsistencyDistillationLoss(
            noise_scheduler,
            teacher.unet,
            target,
            args.num_ddim_timesteps,
            args.huber_c if args.loss_type == "huber" else None,
            guide=teacher.guide_unet,
            guidance_scale=args.guidance_scale,
            guidance_interval=teacher.config.get("guidance_interval"),
            discriminator=discriminator,
            adversarial_weight=args.adversarial_weight,
            fake_score=fake_score,
            distribution_matching_weight=args.distribution_matching_weight,
            sampling_timesteps=consistency_timesteps(
                noise_scheduler.config.num_train_timesteps, args.num_inference_steps
            ),
        )
    else:
        loss_fn = DiffusionLoss(
            noise_scheduler,
            weighting_scheme=args.weighting_scheme,
            logit_mean=args.logit_mean,
            logit_std=args.logit_std,
            mode_scale=args.mode_scale,
            snr_gamma=args.snr_gamma,
            immiscible=args.immiscible_noise,
            condition_dropout=args.condition_dropout,
            stratified=args.stratified_timesteps,
        )

    # Checkpoints hold what `save_state` saves (weights, optimizer, LR schedule, RNG) plus the EMA weights
    # (safetensors, the diffusers way), the autoguidance guide once taken, and the model config, settings and training
    # minutes that resuming reads.
    clock = TrainingClock()
    guide = None  # the EMA weights at step guide_step, frozen

    def save_model_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if target is not None:
                target.save_pretrained(os.path.join(output_dir, "unet_target"))
            if guide is not None:
                guide.save_pretrained(os.path.join(output_dir, "unet_guide"))
            with open(os.path.join(output_dir, CHECKPOINT_CONFIG), "w") as f:
                json.dump(model_config, f, indent=2, default=list)
            record = {"train_minutes": clock.minutes(), "num_processes": accelerator.num_processes}
            with open(os.path.join(output_dir, TRAINING_STATE), "w") as f:
                json.dump({**record, "args": training_args}, f, indent=2, default=list)

    def load_model_hook(models: list, input_dir: str) -> None:
        if ema_model is not None:
            if not os.path.isdir(os.path.join(input_dir, "unet_ema")):
                raise ValueError(f"{input_dir}/unet_ema, the EMA weights, is missing (or the run had --no-use_ema)")
            ema_model.load_state_dict(
                EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), ema_model.model_cls).state_dict()
            )
            ema_model.to(device)
        if target is not None:
            if not os.path.isdir(os.path.join(input_dir, "unet_target")):
                raise ValueError(f"{input_dir}/unet_target, the distillation's target network, is missing")
            target.load_state_dict(type(target).from_pretrained(os.path.join(input_dir, "unet_target")).state_dict())
        if guide_step and checkpoint_step(input_dir) >= guide_step:
            if not os.path.isdir(os.path.join(input_dir, "unet_guide")):
                raise ValueError(
                    f"{input_dir}/unet_guide, the autoguidance guide of step {guide_step}, is missing (the run had "
                    "another --autoguidance_fraction)"
                )
            nonlocal guide
            guide = type(accelerator.unwrap_model(models[0])).from_pretrained(os.path.join(input_dir, "unet_guide"))
            use_plain_attention(guide.requires_grad_(False).eval().to(device), device)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if discriminator is not None:  # prepared after the student, so that checkpoints name the student as before
        discriminator, discriminator_optimizer = accelerator.prepare(discriminator, discriminator_optimizer)
        loss_fn.discriminator = discriminator
    if fake_score is not None:
        fake_score, fake_score_optimizer = accelerator.prepare(fake_score, fake_score_optimizer)
        loss_fn.fake_score = fake_score
    if ema_model is not None:
        ema_model.to(device)
    global_step = 0
    if resume_path is not None:
        global_step = load_checkpoint(
            accelerator, resume_path, lambda: [*model.parameters(), *(ema_model.shadow_params if ema_model else [])]
        )
        accelerator.print(f"Resumed from {resume_path} at step {global_step}.")
        if schedule_changes:  # e.g. a lower learning rate after a divergence: the schedule continues from here
            restart_lr_schedule(args, lr_scheduler, max_train_steps, global_step)
            accelerator.print(f"Applied from step {global_step} on: {'; '.join(schedule_changes)}.")

    if accelerator.is_main_process:
        # Trackers take scalars and strings only.
        hparams = {k: v for k, v in training_args.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train_ddpm", config=hparams)
        os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    logger.info(
        f"{len(images)} images, {accelerator.num_processes} process(es), global batch {global_batch_size}, "
        f"{steps_per_epoch} steps per epoch, {max_train_steps} steps ({num_epochs} epochs)",
        main_process_only=True,
    )

    # The loop. Everything random in a step is a function of (seed, step, micro-batch): resuming is exact.
    unwrapped = accelerator.unwrap_model(model)
    pipeline = MNISTDiffusionPipeline(
        unwrapped,
        noise_scheduler,
        text_encoder,
        tokenizer,
        guide,
        default_num_inference_steps=args.num_inference_steps if teacher is not None else None,
        guidance_interval=args.guidance_interval if guide_step else None,
    )
    pipeline.set_progress_bar_config(disable=True)
    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    stop = StopSignals()  # SIGTERM or Ctrl-C: finish the step, checkpoint, say how to resume
    clock.start(state["train_minutes"] if state is not None else 0.0)
    permutation, permutation_epoch = None, None

    digits = images.float() / 127.5 - 1  # in [-1, 1] as the model sees them, once: stable targets gather thousands

    model.train()
    while global_step < max_train_steps:
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        if permutation_epoch != epoch:
            permutation, permutation_epoch = epoch_permutation(len(images), args.seed, epoch, device), epoch
        step_loss = torch.zeros((), device=device)
        for micro_step in range(args.gradient_accumulation_steps):
            batch = permutation[
                micro_batch_slice(step_in_epoch, micro_step, args.gradient_accumulation_steps,
                                  accelerator.num_processes, accelerator.process_index, args.train_batch_size)
            ]  # fmt: skip
            clean_images = digits[batch]
            # The global batch's draws, the same on every process: each takes its shard (DiffusionLoss).
            generator = torch.Generator(device).manual_seed(seed_for(args.seed, 1, global_step, micro_step, 0))
            targets = {}  # only DiffusionLoss takes a reference: the distillation loss is called without one
            if args.stable_target_reference_size:  # the same reference digits on every process
                draws = torch.Generator(device).manual_seed(seed_for(args.seed, 2, global_step, micro_step))
                picks = torch.randint(
                    len(images), (args.stable_target_reference_size,), generator=draws, device=device
                )
                targets["reference"] = digits[picks]
                if args.conditioning != "none":  # a label (or its caption) rules out the other classes' digits
                    targets["reference_match"] = labels[batch, None] == labels[picks]
            shard = (accelerator.process_index, accelerator.num_processes)
            condition = {}
            if args.conditioning == "class":
                condition["class_labels"] = labels[batch]
            elif args.conditioning == "text":
                templates = torch.randint(
                    captions.shape[1], (len(batch) * shard[1],), generator=generator, device=device
                )
                template = templates[shard[0] * len(batch) : (shard[0] + 1) * len(batch)]
                condition["encoder_hidden_states"] = captions[labels[batch], template]
            if micro_step == 0:  # DMD2's two time-scale rule: the fake score's extra steps, on fresh student digits
                for update in range(1, args.fake_score_updates):
                    extra = torch.Generator(device).manual_seed(seed_for(args.seed, 1, global_step, 0, update))
                    with accelerator.autocast():
                        accelerator.backward(loss_fn.fake_score_loss(model, clean_images, extra, shard))
                    fake_score_optimizer.step()
                    fake_score_optimizer.zero_grad(set_to_none=True)
            with accelerator.accumulate(model), accelerator.autocast():  # autocast: the teacher's calls too
                loss = loss_fn(model, clean_images, generator, condition, null_condition, shard, **targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for other in (discriminator_optimizer, fake_score_optimizer):
                    if other is not None:
                        other.step()
                        other.zero_grad(set_to_none=True)
            step_loss += loss.detach() / args.gradient_accumulation_steps

        lr_scheduler.step()
        if ema_model is not None:
            ema_model.step(model.parameters())
        if target is not None:
            torch._foreach_lerp_(list(target.parameters()), list(model.parameters()), 1 - args.ema_decay)
        global_step += 1
        progress_bar.update(1)
        # One all-reduce for the mean loss and for "did any process get a stop signal", so all stop at one step.
        loss_sum, stops = accelerator.reduce(
            torch.stack([step_loss, torch.tensor(float(len(stop.received)), device=device)]), reduction="sum"
        ).tolist()
        logs = {"loss": loss_sum / accelerator.num_processes, "lr": lr_scheduler.get_last_lr()[0]}
        save_now = global_step % args.checkpointing_steps == 0 or stops
        # A finite loss can still come with an update that overflowed the weights: check them before saving.
        if not math.isfinite(logs["loss"]) or (
            save_now and not all(torch.isfinite(p).all() for p in model.parameters())
        ):
            if resume_path is not None and global_step == checkpoint_step(resume_path) + 1:
                # Diverging at once after a resume points at the checkpoint (damaged bytes load as finite garbage).
                raise FloatingPointError(
                    f"Training diverged at step {global_step}, the first step after resuming from {resume_path}: "
                    "that checkpoint may be damaged. Resume from an earlier checkpoint-N folder, or lower "
                    "--learning_rate if it diverges there too."
                )
            raise FloatingPointError(
                f"Training diverged at step {global_step} (loss {logs['loss']:.4g}); nothing of it was saved. "
                f"The latest checkpoint is {find_checkpoint(args.output_dir) or 'none'}: lower --learning_rate "
                "(or use --mixed_precision no) and resume with --resume_from_checkpoint latest."
            )
        if ema_model is not None:
            logs["ema_decay"] = ema_model.cur_decay_value
        if global_step == guide_step:
            with ema_weights(unwrapped, ema_model):
                guide = copy.deepcopy(unwrapped).requires_grad_(False).eval()
            pipeline.register_modules(guide_unet=guide)
        progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
        accelerator.log(logs, step=global_step)

        if save_now:
            path = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            logger.info(f"Saved {path}", main_process_only=True)
        if stops:
            progress_bar.close()
            signum = stop.received[0] if stop.received else signal.SIGTERM  # another process may have got it
            accelerator.print(
                f"Stopped by {signal.Signals(signum).name} at step {global_step}; saved {path}. Resume with the same "
                "command plus --resume_from_checkpoint latest."
            )
            accelerator.end_training()
            raise SystemExit(128 + signum)

        if global_step % steps_per_epoch == 0 and global_step < max_train_steps:
            epoch = global_step // steps_per_epoch
            with clock.paused():
                if accelerator.is_main_process:
                    save_outputs(
                        pipeline, ema_model, accelerator, args, training_args,
                        {"step": global_step, "epoch": epoch, "train_minutes": clock.minutes()},
                        save_images=epoch % args.save_images_epochs == 0,
                        save_model=epoch % args.save_model_epochs == 0,
                        real_features=real_features if args.eval_epochs and epoch % args.eval_epochs == 0 else None,
                    )  # fmt: skip
                accelerator.wait_for_everyone()

    progress_bar.close()
    minutes = clock.minutes()
    if accelerator.is_main_process:
        save_outputs(
            pipeline, ema_model, accelerator, args, training_args,
            {"step": global_step, "epoch": math.ceil(global_step / steps_per_epoch), "train_minutes": minutes},
            save_images=True, save_model=True, real_features=real_features, push_to=repo_id,
        )  # fmt: skip
        accelerator.print(
            f"Saved the pipeline to {args.output_dir} after {global_step} steps ({minutes:.1f} minutes of training)."
        )
    accelerator.end_training()


def cli(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one line naming the problem, not a traceback."""
    args = parse_args(argv)
    try:
        main(args)
        return
    except (ValueError, OSError, FloatingPointError) as e:
        message = f"train_ddpm.py: error: {e}"
    except RuntimeError as e:  # a collective failed: another process of the job died
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise
        message = (
            f"train_ddpm.py: error: rank {torch.distributed.get_rank()} lost contact with the other processes of the "
            f"job ({str(e).splitlines()[0][-160:]}): another process or machine failed, and its own log says which. "
            "Start the job again with --resume_from_checkpoint latest."
        )
    sys.exit(message)  # outside the handler, so that nothing keeps the failed run (and its output-dir lock) alive


if __name__ == "__main__":
    cli()
