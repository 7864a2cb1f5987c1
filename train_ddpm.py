#!/usr/bin/env python
"""Train the 50-step MNIST DDPM with Accelerate.

    python train_ddpm.py --dataset_name ylecun/mnist --output_dir ddpm-mnist            # one device or the CPU
    accelerate launch --config_file accelerate_config.yaml train_ddpm.py --output_dir ddpm-mnist   # several GPUs

The result is a `MNISTDiffusionPipeline` folder in `--output_dir` (EMA weights), loadable with
`DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True)`.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator

import datasets
import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from huggingface_hub import create_repo
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline import MNISTDiffusionPipeline, create_model_and_scheduler, image_grid
from pipeline.cli import DEFAULT_SAMPLER, default_mixed_precision, generate, make_scheduler
from pipeline.data import load_images
from pipeline.evaluate import evaluate_digits, reference_features
from pipeline.loss import DiffusionLoss
from pipeline.model import CAPTION_TEMPLATES, NUM_CLASSES, captions

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
CHECKPOINT_CONFIG = "model_config.json"


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
    train.add_argument("--train_batch_size", type=int, default=128, help="Batch size per device.")
    train.add_argument("--eval_batch_size", type=int, default=64, help="Digits in each saved sample grid.")
    train.add_argument("--num_epochs", type=int, default=5, help="5 epochs: ~25 minutes on a 2-core CPU.")
    train.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=1e-3)
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
        default="none",
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
    train.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="Save EMA weights.")
    train.add_argument("--ema_inv_gamma", type=float, default=1.0, help="Inverse gamma of the EMA warmup.")
    train.add_argument("--ema_power", type=float, default=3 / 4, help="Power of the EMA warmup.")
    train.add_argument("--ema_max_decay", type=float, default=0.9999, help="Largest EMA decay.")
    train.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Default: the accelerate config's choice, else bf16 where the GPU or CPU runs it natively, else no.",
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
                 "save_images_epochs", "save_model_epochs", "checkpointing_steps", "eval_num_samples"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "eval_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if not 0 <= args.condition_dropout < 1:
        parser.error(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}.")
    if args.learning_rate <= 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}.")
    return args


def find_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    steps = (
        [int(m[1]) for d in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.fullmatch(d))]
        if os.path.isdir(output_dir)
        else []
    )
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def comparable(config: dict) -> dict:
    """A config as JSON would store it, without diffusers' private keys (version, class name, path)."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


def check_same_config(saved: dict, current: dict, what: str) -> None:
    """Refuse to mix a saved model with a differently configured one."""
    saved, current = comparable(saved), comparable(current)
    diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here" for k in diff[:4])
        raise ValueError(
            f"{what} holds a differently configured model ({changes}). Train with the same "
            "--model_config_name_or_path / --prediction_type, or use a new --output_dir."
        )


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """`accelerator.save_state` into a temporary folder that becomes `checkpoint-{step}` only once complete."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f"partial-checkpoint-{step}")
    if accelerator.is_main_process:
        if os.path.exists(partial):
            shutil.rmtree(partial)  # left by a run that died while saving
        os.makedirs(partial)
    accelerator.wait_for_everyone()  # the folder exists before any process writes into it
    try:
        accelerator.save_state(partial)
        accelerator.wait_for_everyone()  # every process has written its part (each writes its own RNG state)
        if accelerator.is_main_process:
            for root, _, files in os.walk(partial):
                for name in files:
                    with open(os.path.join(root, name), "rb+") as f:
                        os.fsync(f.fileno())
    except OSError as e:  # disk full, quota, permissions: keep what was saved before, say what happened
        shutil.rmtree(partial, ignore_errors=True)
        earlier = find_checkpoint(output_dir)
        raise OSError(
            f"Could not write checkpoint-{step} in {output_dir} ({e.strerror or e}). "
            + (f"{os.path.basename(earlier)} is intact: " if earlier else "")
            + "free space or fix permissions, then resume with --resume_from_checkpoint latest."
        ) from e
    if accelerator.is_main_process:
        if os.path.exists(final):  # resumed from an earlier checkpoint and reached this step again
            shutil.rmtree(final)
        os.replace(partial, final)  # atomic: `latest` never sees a half-written checkpoint
        dir_fd = os.open(output_dir, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        if total_limit is not None:
            steps = sorted(int(m[1]) for d in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.fullmatch(d)))
            for old in steps[:-total_limit]:
                shutil.rmtree(os.path.join(output_dir, f"checkpoint-{old}"))
    accelerator.wait_for_everyone()
    return final


def use_fast_attention(model: torch.nn.Module, device: torch.device) -> None:
    """On CPU, swap scaled_dot_product_attention for the plain matmul-softmax processor."""
    if device.type == "cpu":
        # PyTorch's CPU flash-attention backward is slow on these short (7x7 = 49 token) bf16 sequences: the plain
        # processor trains the default UNet ~1.5x faster here (benchmarks/speed.py).
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())


def seed_for(*keys: int) -> int:
    """A well-mixed seed derived from integers, so every step's randomness is a pure function of (seed, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema_model: EMAModel | None) -> Iterator[None]:
    """Temporarily swap the EMA weights into `model` (no-op without EMA)."""
    if ema_model is None:
        yield
        return
    ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield
    finally:
        ema_model.restore(model.parameters())


def main(args: argparse.Namespace) -> None:
    """Train, checkpoint, and save the pipeline to `args.output_dir`."""
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
    device = accelerator.device
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU; on a CPU use bf16 or no.")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("This GPU cannot do bf16; use --mixed_precision fp16 or no.")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:  # one copy of each library warning is enough
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    training_args = {k: v for k, v in vars(args).items() if k != "hub_token"}

    # Model, and the checks that protect what is already in --output_dir, before any data is read.
    text_encoder = tokenizer = None
    if args.conditioning == "text":
        try:
            tokenizer = CLIPTokenizer.from_pretrained(args.text_encoder, cache_dir=args.cache_dir)
            text_encoder = CLIPTextModel.from_pretrained(args.text_encoder, cache_dir=args.cache_dir)
        except OSError as e:
            raise ValueError(
                f"Could not load the text encoder {args.text_encoder!r} ({str(e).splitlines()[0]}). --text_encoder "
                "takes a Hub id or a folder holding a CLIP text model and its tokenizer."
            ) from e
        text_encoder.requires_grad_(False).eval().to(device)
    model, noise_scheduler = create_model_and_scheduler(
        args.resolution or 28,
        args.prediction_type,
        args.model_config_name_or_path,
        args.conditioning,
        text_encoder.config.hidden_size if text_encoder is not None else None,
    )
    model_cls = type(model)
    model_config = {"unet": dict(model.config), "scheduler": dict(noise_scheduler.config)}
    use_fast_attention(model, device)
    for component, file in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        saved = os.path.join(args.output_dir, component, file)
        if os.path.isfile(saved):
            with open(saved) as f:
                check_same_config(json.load(f), model_config[component], f"--output_dir {args.output_dir}")
    resume_path = None
    if args.resume_from_checkpoint == "latest":
        resume_path = find_checkpoint(args.output_dir)
        if resume_path is None:
            accelerator.print(f"No checkpoint in {args.output_dir} yet: starting a new training run.")
    elif args.resume_from_checkpoint is not None:
        resume_path = args.resume_from_checkpoint
        if not os.path.isdir(resume_path) or not CHECKPOINT_PATTERN.fullmatch(os.path.basename(resume_path)):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume_path!r} is not a checkpoint-N folder; "
                "use 'latest' or one of the checkpoint-N folders in --output_dir."
            )
    elif find_checkpoint(args.output_dir):
        raise ValueError(
            f"--output_dir {args.output_dir} already holds {os.path.basename(find_checkpoint(args.output_dir))}. "
            "Continue it with --resume_from_checkpoint latest, or train into a new --output_dir."
        )
    if resume_path is not None:
        try:
            with open(os.path.join(resume_path, CHECKPOINT_CONFIG)) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"Checkpoint {resume_path} is incomplete or corrupt ({e}).") from e
        for component in ("unet", "scheduler"):
            check_same_config(saved[component], model_config[component], f"Checkpoint {resume_path}")
    if accelerator.is_main_process and os.path.isdir(args.output_dir):
        for name in os.listdir(args.output_dir):  # half-written by a run that was killed while saving
            if name.startswith("partial-checkpoint-"):
                shutil.rmtree(os.path.join(args.output_dir, name))
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_repo(
            args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
            exist_ok=True,
            private=args.hub_private_repo,
            token=args.hub_token,
        ).repo_id

    # Data: decoded once into a uint8 tensor on the device; batches are slices of a per-epoch permutation.
    with accelerator.main_process_first():
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
            size=model.config.sample_size,
            num_proc=args.dataloader_num_workers,
        )
    images = images.to(device)
    if args.conditioning != "none":
        if labels is None:
            raise ValueError(
                f"--conditioning {args.conditioning} needs digit labels, and the dataset has no label column: "
                "name it with --label_column."
            )
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(f"--conditioning needs labels 0..{NUM_CLASSES - 1}; the dataset has {labels.unique()}.")
        labels = labels.to(device)
    if args.conditioning == "text":
        # The encoder is frozen: every caption's hidden states are computed once, here, not at every step.
        with torch.no_grad():
            encoder = MNISTDiffusionPipeline(model, noise_scheduler, text_encoder, tokenizer)
            caption_states = torch.stack([encoder.encode_prompt(captions(d)) for d in range(NUM_CLASSES)])
            empty_state = encoder.encode_prompt([""])
    real_features = None
    if args.eval_epochs and accelerator.is_main_process:  # now, so that a missing split fails before training
        real_features = reference_features(args.dataset_name, args.eval_split, args.cache_dir)
    micro_batches_per_step = args.gradient_accumulation_steps * accelerator.num_processes
    global_batch_size = args.train_batch_size * micro_batches_per_step
    steps_per_epoch = len(images) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"The dataset has {len(images)} images, fewer than one global batch of {global_batch_size} "
            "(train_batch_size x gradient_accumulation_steps x processes). Lower --train_batch_size."
        )
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

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
            model_cls=model_cls,
            model_config=model.config,
            foreach=True,
        )

    loss_fn = DiffusionLoss(
        noise_scheduler,
        weighting_scheme=args.weighting_scheme,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
        snr_gamma=args.snr_gamma,
        immiscible=args.immiscible_noise,
        condition_dropout=args.condition_dropout,
    )
    null_condition = {"class_labels": torch.tensor(NUM_CLASSES, device=device)}  # the "no label" token
    if args.conditioning == "text":
        null_condition = {"encoder_hidden_states": empty_state}

    # Checkpoints hold what `save_state` saves (weights, optimizer, LR schedule, RNG) plus the EMA weights
    # (safetensors, the diffusers way) and the model config that resuming checks against.
    def save_model_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
            with open(os.path.join(output_dir, CHECKPOINT_CONFIG), "w") as f:
                json.dump(model_config, f, indent=2, default=list)

    def load_model_hook(models: list, input_dir: str) -> None:
        if ema_model is not None:
            ema_model.load_state_dict(
                EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), model_cls).state_dict()
            )
            ema_model.to(device)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema_model is not None:
        ema_model.to(device)

    global_step = 0
    if resume_path is not None:
        try:
            accelerator.load_state(resume_path)
        except Exception as e:  # safetensors, torch.load and json errors alike mean the files are damaged
            raise ValueError(
                f"Checkpoint {resume_path} could not be loaded ({type(e).__name__}: {e}). It is corrupt or incomplete: "
                "resume from an earlier checkpoint-N folder instead."
            ) from e
        global_step = int(CHECKPOINT_PATTERN.fullmatch(os.path.basename(resume_path))[1])
        accelerator.print(f"Resumed from {resume_path} at step {global_step}.")

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

    unwrapped = accelerator.unwrap_model(model)

    def publish(
        epochs_done: int, save_images: bool, save_model: bool, evaluate: bool, train_minutes: float, push: bool = False
    ) -> None:
        """Save a sample grid (also to the trackers), score samples, save the pipeline and push it; EMA weights,
        main process only."""
        pipeline = MNISTDiffusionPipeline(unwrapped, noise_scheduler, text_encoder, tokenizer)
        pipeline.set_progress_bar_config(disable=True)
        with ema_weights(unwrapped, ema_model):
            unwrapped.eval()
            if save_images:
                digits = pipeline(
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                    **pipeline.example_conditions(args.eval_batch_size),
                ).images
                digits = (digits[..., 0] * 255).round().astype(np.uint8)
                image_grid(digits).save(os.path.join(args.output_dir, "samples", f"epoch_{epochs_done:04d}.png"))
                for tracker in accelerator.trackers:
                    if tracker.name == "tensorboard":
                        tracker.writer.add_images("samples", digits[:, None], epochs_done, dataformats="NCHW")
                    elif tracker.name == "wandb":
                        import wandb

                        tracker.log({"samples": [wandb.Image(d) for d in digits]}, step=global_step)
            if evaluate:
                # Conditional models are asked for 0..9 in turn and scored on whether they drew what was asked.
                wanted = np.arange(args.eval_num_samples) % NUM_CLASSES if args.conditioning != "none" else None
                with accelerator.autocast():  # sample in the training precision: bf16 is ~2x faster on this CPU
                    # Scored the way `mnist-diffusion evaluate` scores a saved model: its default sampler.
                    sampler, steps = DEFAULT_SAMPLER
                    scorer = MNISTDiffusionPipeline(
                        unwrapped, make_scheduler(sampler, noise_scheduler.config), text_encoder, tokenizer
                    )
                    digits = generate(
                        scorer, args.eval_num_samples, seed=0, batch_size=125, num_inference_steps=steps, labels=wanted
                    )
                results = evaluate_digits(digits, real_features, wanted)
                accelerator.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, float)}, step=global_step)
                with open(os.path.join(args.output_dir, "eval.jsonl"), "a") as f:
                    record = {"step": global_step, "epoch": epochs_done, "train_minutes": train_minutes}
                    f.write(json.dumps({**record, **results}) + "\n")
                logger.info(f"Step {global_step}: FID {results['fid']:.2f} on {len(digits)} samples")
                pipeline.set_progress_bar_config(disable=True)
            if save_model:
                pipeline.save_pretrained(args.output_dir, training_args=training_args)
            if push:
                pipeline.push_to_hub(
                    repo_id, training_args=training_args, token=args.hub_token, commit_message="End of training"
                )
            unwrapped.train()

    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    permutation, permutation_epoch = None, None
    # SIGTERM (preemption) or Ctrl-C: finish the step, checkpoint, say how to resume. A second signal kills at once.
    stop_signals = []

    def request_stop(signum: int, frame: object) -> None:
        stop_signals.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    # Training time of this process, without the time spent sampling and evaluating.
    clock = {"start": time.perf_counter(), "publishing": 0.0}

    def train_seconds() -> float:
        return time.perf_counter() - clock["start"] - clock["publishing"]

    model.train()
    while global_step < max_train_steps:
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        if permutation_epoch != epoch:
            # The data order depends on (seed, epoch) alone, so a resumed run sees the same batches.
            generator = torch.Generator().manual_seed(seed_for(args.seed, 0, epoch))
            permutation = torch.randperm(len(images), generator=generator).to(device)
            permutation_epoch = epoch

        step_loss = torch.zeros((), device=device)
        for micro_step in range(args.gradient_accumulation_steps):
            start = ((step_in_epoch * args.gradient_accumulation_steps + micro_step) * accelerator.num_processes
                     + accelerator.process_index) * args.train_batch_size  # fmt: skip
            batch = permutation[start : start + args.train_batch_size]
            clean_images = images[batch].float() / 127.5 - 1
            # Noise, timesteps and dropped conditions depend on (seed, step, micro-batch, process) alone: resuming is exact.
            generator = torch.Generator(device).manual_seed(
                seed_for(args.seed, 1, global_step, micro_step, accelerator.process_index)
            )
            condition = {}
            if args.conditioning == "class":
                condition["class_labels"] = labels[batch]
            elif args.conditioning == "text":
                template = torch.randint(len(CAPTION_TEMPLATES), (len(batch),), generator=generator, device=device)
                condition["encoder_hidden_states"] = caption_states[labels[batch], template]

            with accelerator.accumulate(model):
                loss = loss_fn(model, clean_images, generator, condition, null_condition)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / args.gradient_accumulation_steps

        lr_scheduler.step()
        if ema_model is not None:
            ema_model.step(model.parameters())
        global_step += 1
        progress_bar.update(1)
        # One all-reduce for the mean loss and for "did any process get a stop signal", so all stop at one step.
        loss_sum, stops = accelerator.reduce(
            torch.stack([step_loss, torch.tensor(float(len(stop_signals)), device=device)]), reduction="sum"
        ).tolist()
        logs = {"loss": loss_sum / accelerator.num_processes, "lr": lr_scheduler.get_last_lr()[0]}
        save_now = global_step % args.checkpointing_steps == 0 or stops
        # A finite loss can still come with an update that overflowed the weights: check them before saving.
        if not math.isfinite(logs["loss"]) or (
            save_now and not all(torch.isfinite(p).all() for p in model.parameters())
        ):
            raise FloatingPointError(
                f"Training diverged at step {global_step} (loss {logs['loss']:.4g}); nothing of it was saved. "
                f"The latest checkpoint is {find_checkpoint(args.output_dir) or 'none'}: lower --learning_rate "
                "(or use --mixed_precision no) and resume with --resume_from_checkpoint latest."
            )
        if ema_model is not None:
            logs["ema_decay"] = ema_model.cur_decay_value
        progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
        accelerator.log(logs, step=global_step)

        if save_now:
            path = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            logger.info(f"Saved {path}", main_process_only=True)
        if stops:
            progress_bar.close()
            signum = stop_signals[0] if stop_signals else signal.SIGTERM  # another process may have got it
            accelerator.print(
                f"Stopped by {signal.Signals(signum).name} at step {global_step}; saved {path}. Resume with the same "
                "command plus --resume_from_checkpoint latest."
            )
            accelerator.end_training()
            raise SystemExit(128 + signum)

        if global_step % steps_per_epoch == 0 and global_step < max_train_steps:
            epochs_done = global_step // steps_per_epoch
            save_images, save_model = (
                epochs_done % args.save_images_epochs == 0,
                epochs_done % args.save_model_epochs == 0,
            )
            evaluate = args.eval_epochs is not None and epochs_done % args.eval_epochs == 0
            started = time.perf_counter()
            if accelerator.is_main_process and (save_images or save_model or evaluate):
                publish(epochs_done, save_images, save_model, evaluate, train_seconds() / 60)
            accelerator.wait_for_everyone()
            clock["publishing"] += time.perf_counter() - started

    progress_bar.close()
    minutes = train_seconds() / 60
    if accelerator.is_main_process:
        publish(
            math.ceil(global_step / steps_per_epoch),
            save_images=True,
            save_model=True,
            evaluate=args.eval_epochs is not None,
            train_minutes=minutes,
            push=args.push_to_hub,
        )
        accelerator.print(
            f"Saved the pipeline to {args.output_dir} after {global_step} steps ({minutes:.1f} minutes of training)."
        )
    accelerator.end_training()


def cli(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with one line naming the problem, not a traceback."""
    args = parse_args(argv)
    try:
        main(args)
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"train_ddpm.py: error: {e}")


if __name__ == "__main__":
    cli()
