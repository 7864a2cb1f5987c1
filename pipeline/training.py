"""The training library that `train_ddpm.py` and `train_distill.py` share: the options both take, the Accelerator,
the data, AdamW and EMA, and the loop (exact data order and resume, stop signals, divergence, end-of-epoch outputs)."""

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import datasets
import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from huggingface_hub import create_repo
from tqdm.auto import tqdm

from .card import push_pipeline, save_pipeline
from .checkpoint import (
    CHECKPOINT_CONFIG,
    TRAINING_STATE,
    OutputDirLock,
    check_resume_settings,
    checkpoint_step,
    find_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    resolve_resume,
    save_checkpoint,
    set_aside_newer_checkpoints,
)
from .data import load_images
from .evaluate import MIN_SAMPLES, evaluate_digits, evaluation_results, reference_features
from .model import NUM_CLASSES
from .pipeline_mnist_diffusion import MNISTDiffusionPipeline
from .sampling import default_mixed_precision, digit_cycle, generate, image_grid, native_bf16, with_default_sampler

logger = get_logger(__name__)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset options, named as in diffusers' `train_unconditional.py`."""
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


def add_training_arguments(
    parser: argparse.ArgumentParser, learning_rate: float, output_dir: str, generates: bool = True
) -> None:
    """The optimisation options: batch, schedule, AdamW, EMA of the weights (of models that generate), precision."""
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=output_dir, help="Where the pipeline, checkpoints and logs go.")
    train.add_argument("--seed", type=int, default=0, help="Seeds the weights, the data order and the noise.")
    train.add_argument(
        "--train_batch_size",
        type=int,
        default=64,  # twice the updates of 128 for the same images and minutes: better at equal time (docs/recipe.md)
        help="Batch size per device.",
    )
    if generates:
        train.add_argument("--eval_batch_size", type=int, default=64, help="Digits in each saved sample grid.")
    train.add_argument("--num_epochs", type=int, default=5, help="Passes over the data.")
    train.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides epochs.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=learning_rate)
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
    if generates:
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


def add_output_arguments(parser: argparse.ArgumentParser, generates: bool = True) -> None:
    """Logging, sample grids and evaluation (of models that generate), checkpoints and the Hub."""
    out = parser.add_argument_group("logging, checkpoints and the Hub")
    out.add_argument("--logger", default="tensorboard", choices=["tensorboard", "wandb"])
    out.add_argument("--logging_dir", default="logs", help="TensorBoard logs, inside --output_dir.")
    out.add_argument("--save_model_epochs", type=int, default=5, help="Save the pipeline every N epochs.")
    if generates:
        out.add_argument("--save_images_epochs", type=int, default=1, help="Save a sample grid every N epochs.")
        out.add_argument(
            "--eval_epochs",
            type=int,
            default=None,
            help="Every N epochs, score samples (FID...) against --eval_split.",
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


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the shared options' bad values before anything is loaded."""
    for name in ("train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                 "save_images_epochs", "save_model_epochs", "checkpointing_steps"):  # fmt: skip
        if getattr(args, name, 1) < 1:  # getattr: a script may not have them all
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("max_train_steps", "max_train_samples", "checkpoints_total_limit", "eval_epochs"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if getattr(args, "eval_num_samples", MIN_SAMPLES) < MIN_SAMPLES:
        parser.error(
            f"--eval_num_samples must be at least {MIN_SAMPLES} (scoring needs them), got {args.eval_num_samples}."
        )
    check_ranges(
        parser, args, positive=("learning_rate", "adam_epsilon", "max_grad_norm", "ema_inv_gamma", "ema_power"),
        non_negative=("adam_weight_decay", "lr_warmup_steps", "dataloader_num_workers"),
        below_one=("adam_beta1", "adam_beta2", "ema_max_decay"),
    )  # fmt: skip
    output_dir = args.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        parser.error(f"--output_dir {output_dir} is a file; give a folder.")
    # Tried now, not after the data is loaded; also the logs' folder, which may be an absolute path elsewhere. What
    # the trial creates is removed again: bad input writes nothing.
    folder, created = os.path.abspath(os.path.join(output_dir, args.logging_dir)), []
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(os.path.join(output_dir, args.logging_dir), exist_ok=True)
    except OSError as e:
        parser.error(f"Cannot create --output_dir {output_dir} or its --logging_dir {args.logging_dir}: {e.strerror}.")
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def check_ranges(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    below_one: tuple[str, ...] = (),
) -> None:
    """Refuse numeric options outside their range, NaN included, naming the flag."""
    for names, holds, wanted in (
        (positive, lambda v: v > 0, "positive"),
        (non_negative, lambda v: v >= 0, "0 or more"),
        (below_one, lambda v: 0 <= v < 1, "in [0, 1)"),
    ):
        for name in (name for name in names if hasattr(args, name)):
            if not holds(getattr(args, name)):
                parser.error(f"--{name} must be {wanted}, got {getattr(args, name)}.")


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
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:  # one copy of each library warning is enough
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    return accelerator


def load_data(
    args: argparse.Namespace, accelerator: Accelerator, size: int, labelled: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training images `(N, 1, size, size)` uint8 and, if `labelled`, their digit labels, on the device."""
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
    if not labelled:
        return images.to(accelerator.device), None
    if labels is None:
        raise ValueError(
            "Conditional training needs digit labels, and the dataset has no column of integer labels: name it with "
            "--label_column."
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"Conditional training needs labels 0..{NUM_CLASSES - 1}; the dataset has {labels.unique()}.")
    return images.to(accelerator.device), labels.to(accelerator.device)


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
    if getattr(args, "use_ema", False):
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


@dataclass
class Run:
    """One training run: its settings, Accelerate objects, data, schedule and the pipeline it saves."""

    args: argparse.Namespace
    accelerator: Accelerator
    model_config: dict
    training_args: dict
    digits: torch.Tensor  # (N, 1, H, W) in [-1, 1] as the model sees them, on the device, once
    labels: torch.Tensor | None
    resume_path: str | None
    state: dict | None  # the resumed checkpoint's training state
    schedule_changes: list[str]
    steps_per_epoch: int
    max_train_steps: int
    real_features: np.ndarray | None = None
    repo_id: str | None = None
    clock: "TrainingClock" = field(default_factory=lambda: TrainingClock())
    lock: OutputDirLock | None = None


def start_run(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model_config: dict,
    training_args: dict,
    size: int,
    labelled: bool = False,
) -> Run:
    """Check what resuming needs, load the data, size the schedule, and claim --output_dir (main process)."""
    resume_path = resolve_resume(args.output_dir, args.resume_from_checkpoint, model_config)
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        accelerator.print(f"No checkpoint in {args.output_dir} yet: starting a new training run.")
    state, schedule_changes = check_resume_settings(resume_path, training_args, accelerator.num_processes)
    images, labels = load_data(args, accelerator, size, labelled)
    real_features = None
    if (
        getattr(args, "eval_epochs", None) and accelerator.is_main_process
    ):  # now, so that a missing split fails before training
        real_features = reference_features(args.dataset_name, args.eval_split, args.cache_dir)
    global_batch_size = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    steps_per_epoch = len(images) // global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"The dataset has {len(images)} images, fewer than one global batch of {global_batch_size} "
            "(train_batch_size x gradient_accumulation_steps x processes). Lower --train_batch_size."
        )
    # In [-1, 1] once, not at every step: stable targets gather thousands of digits a step.
    run = Run(
        args, accelerator, model_config, training_args, images.float() / 127.5 - 1, labels, resume_path, state, schedule_changes,
        steps_per_epoch, args.max_train_steps or args.num_epochs * steps_per_epoch, real_features,
    )  # fmt: skip
    if accelerator.is_main_process:  # from here on this run writes to --output_dir, and no other run may
        run.lock = OutputDirLock(args.output_dir)
        remove_partial_checkpoints(args.output_dir)
        if resume_path is not None:
            for path in set_aside_newer_checkpoints(args.output_dir, checkpoint_step(resume_path)):
                print(f"Set aside {path}: it is not in the lineage of {resume_path}.")
        if args.push_to_hub:
            name = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            run.repo_id = create_repo(name, exist_ok=True, private=args.hub_private_repo, token=args.hub_token).repo_id
    logger.info(
        f"{len(images)} images, {accelerator.num_processes} process(es), global batch {global_batch_size}, "
        f"{steps_per_epoch} steps per epoch, {run.max_train_steps} steps",
        main_process_only=True,
    )
    return run


def save_run_state(run: Run, ema_model: EMAModel | None, output_dir: str, **models: torch.nn.Module | None) -> None:
    """What a checkpoint holds beyond `save_state`: the EMA and other `models` (safetensors, the diffusers way), the
    model config, and the settings and training minutes that resuming reads."""
    if not run.accelerator.is_main_process:
        return
    if ema_model is not None:
        ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
    for name, model in models.items():
        if model is not None:
            model.save_pretrained(os.path.join(output_dir, name))
    with open(os.path.join(output_dir, CHECKPOINT_CONFIG), "w") as f:
        json.dump(run.model_config, f, indent=2, default=list)
    record = {"train_minutes": run.clock.minutes(), "num_processes": run.accelerator.num_processes}
    with open(os.path.join(output_dir, TRAINING_STATE), "w") as f:
        json.dump({**record, "args": run.training_args}, f, indent=2, default=list)


def load_ema(ema_model: EMAModel | None, input_dir: str, device: torch.device) -> None:
    """Restore the EMA weights a checkpoint holds."""
    if ema_model is None:
        return
    if not os.path.isdir(os.path.join(input_dir, "unet_ema")):
        raise ValueError(f"{input_dir}/unet_ema, the EMA weights, is missing (or the run had --no-use_ema)")
    ema_model.load_state_dict(
        EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), ema_model.model_cls).state_dict()
    )
    ema_model.to(device)


def resume(run: Run, model: torch.nn.Module, lr_scheduler: torch.optim.lr_scheduler.LRScheduler, ema_model) -> int:
    """Load the checkpoint being resumed (after `accelerator.prepare`) and apply schedule changes; the step."""
    if run.resume_path is None:
        return 0
    weights = lambda: [*model.parameters(), *(ema_model.shadow_params if ema_model else [])]  # noqa: E731
    step = load_checkpoint(run.accelerator, run.resume_path, weights)
    run.accelerator.print(f"Resumed from {run.resume_path} at step {step}.")
    if run.schedule_changes:  # e.g. a lower learning rate after a divergence: the schedule continues from here
        args, optimizer = run.args, lr_scheduler.scheduler.optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = args.learning_rate
        lr_scheduler.scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=run.max_train_steps,
            last_epoch=step - 1,
        )
        run.accelerator.print(f"Applied from step {step} on: {'; '.join(run.schedule_changes)}.")
    return step


def save_outputs(
    run: Run, pipeline: MNISTDiffusionPipeline, ema_model: EMAModel | None, record: dict, end: bool
) -> None:
    """With the EMA weights: a sample grid, scores against the real features, the pipeline, a Hub upload, each at the
    end of the run (`end`) and every so many epochs as the options say."""
    args, accelerator, unet, epoch = run.args, run.accelerator, pipeline.unet, record["epoch"]
    save_images = end or epoch % args.save_images_epochs == 0
    save_model = end or epoch % args.save_model_epochs == 0
    score = end or bool(args.eval_epochs) and epoch % args.eval_epochs == 0
    pipeline.set_progress_bar_config(disable=True)
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
        # Pictures and scores come from the sampler `mnist-diffusion` uses by default (20 steps, or a distilled
        # model's few), the digits asked for 0..9 in turn where the model takes a condition.
        sampler_pipe, sampler, steps = with_default_sampler(pipeline)
        conditional = pipeline.conditioning != "none"
        if save_images:
            wanted = digit_cycle(args.eval_batch_size) if conditional else None
            digits = generate(
                sampler_pipe, args.eval_batch_size, 0, args.eval_batch_size, steps, wanted, progress=False, **guidance
            )
            os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
            image_grid(digits).save(os.path.join(args.output_dir, "samples", f"epoch_{record['epoch']:04d}.png"))
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("samples", digits[:, None], record["epoch"], dataformats="NCHW")
                elif tracker.name == "wandb":
                    import wandb

                    tracker.log({"samples": [wandb.Image(d) for d in digits]}, step=record["step"])
        if score and run.real_features is not None:
            # Scored the way `mnist-diffusion evaluate` scores a saved model; conditional models on whether they drew
            # what was asked.
            wanted = digit_cycle(args.eval_num_samples) if conditional else None
            with accelerator.autocast():
                digits = generate(
                    sampler_pipe, args.eval_num_samples, 0, 125, steps, wanted, progress=False, **guidance
                )
            results = {**evaluate_digits(digits, run.real_features, wanted), "scheduler": sampler, "steps": steps}
            card_results.update(evaluation_results(results))
            accelerator.log({f"eval/{k}": v for k, v in results.items() if isinstance(v, float)}, step=record["step"])
            with open(os.path.join(args.output_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps({**record, **results}) + "\n")
            logger.info(f"Step {record['step']}: FID {results['fid']:.2f} on {len(digits)} samples")
        if save_model:
            save_pipeline(pipeline, args.output_dir, training_args=run.training_args, results=card_results)
        if end and run.repo_id is not None:
            push_pipeline(
                pipeline,
                run.repo_id,
                training_args=run.training_args,
                results=card_results,
                token=args.hub_token,
                commit_message="End of training",
            )
        unet.train()
    if end:
        print(
            f"Saved the pipeline to {args.output_dir} after {record['step']} steps ({record['train_minutes']:.1f} "
            "minutes of training)."
        )


def check_finite(run: Run, model: torch.nn.Module, step: int, loss: float, saving: bool) -> None:
    """Stop a diverged run before it saves anything, naming the likely cause and the fix."""
    # A finite loss can still come with an update that overflowed the weights: check them before saving.
    if math.isfinite(loss) and not (saving and not all(torch.isfinite(p).all() for p in model.parameters())):
        return
    if run.resume_path is not None and step == checkpoint_step(run.resume_path) + 1:
        # Diverging at once after a resume points at the checkpoint (damaged bytes load as finite garbage).
        raise FloatingPointError(
            f"Training diverged at step {step}, the first step after resuming from {run.resume_path}: that "
            "checkpoint may be damaged. Resume from an earlier checkpoint-N folder, or lower --learning_rate if it "
            "diverges there too."
        )
    raise FloatingPointError(
        f"Training diverged at step {step} (loss {loss:.4g}); nothing of it was saved. The latest checkpoint is "
        f"{find_checkpoint(run.args.output_dir) or 'none'}: lower --learning_rate (or use --mixed_precision no) and "
        "resume with --resume_from_checkpoint latest."
    )


def train_loop(
    run: Run,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema_model: EMAModel | None,
    step_loss: Callable[[torch.Tensor, int, int], torch.Tensor],
    save_outputs: Callable[[dict, bool], None],
    after_update: Callable[[int], None] = lambda step: None,
    other_optimizers: tuple[torch.optim.Optimizer, ...] = (),
    project_name: str = "train_ddpm",
) -> None:
    """Train from the resumed step to the last: `step_loss(batch, step, micro_step)` is the loss of the micro-batch
    of image indices `batch`, `after_update(step)` runs after each update (its EMA too), before any saving, and
    `save_outputs(record, end)` writes what the run shows and keeps, on the main process, at each epoch's end and at
    the end of the run (`record`: the step, the epoch and the training minutes).

    Everything random in a step is a function of (seed, step, micro-batch), so resuming is exact. SIGTERM or Ctrl-C
    finishes the step, checkpoints and exits 128 + the signal; a non-finite loss or weights stop the run unsaved."""
    try:
        args, accelerator, device = run.args, run.accelerator, run.accelerator.device
        global_step = resume(run, model, lr_scheduler, ema_model)
        if accelerator.is_main_process:
            # Trackers take scalars and strings only.
            hparams = {k: v for k, v in run.training_args.items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(project_name, config=hparams)
        progress_bar = tqdm(
            total=run.max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
        )
        stop = StopSignals()
        run.clock.start(run.state["train_minutes"] if run.state is not None else 0.0)
        permutation, permutation_epoch = None, None
        model.train()
        while global_step < run.max_train_steps:
            epoch, step_in_epoch = divmod(global_step, run.steps_per_epoch)
            if permutation_epoch != epoch:
                permutation, permutation_epoch = epoch_permutation(len(run.digits), args.seed, epoch, device), epoch
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(args.gradient_accumulation_steps):
                batch = permutation[
                    micro_batch_slice(step_in_epoch, micro_step, args.gradient_accumulation_steps,
                                      accelerator.num_processes, accelerator.process_index, args.train_batch_size)
                ]  # fmt: skip
                with accelerator.accumulate(model), accelerator.autocast():  # autocast: a teacher's calls too
                    loss = step_loss(batch, global_step, micro_step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    for each in (optimizer, *other_optimizers):
                        each.step()
                        each.zero_grad(set_to_none=True)
                loss_sum += loss.detach() / args.gradient_accumulation_steps
            lr_scheduler.step()
            if ema_model is not None:
                ema_model.step(model.parameters())
            global_step += 1
            after_update(global_step)
            progress_bar.update(1)
            # One all-reduce for the mean loss and for "did any process get a stop signal", so all stop at one step.
            loss_sum, stops = accelerator.reduce(
                torch.stack([loss_sum, torch.tensor(float(len(stop.received)), device=device)]), reduction="sum"
            ).tolist()
            logs = {"loss": loss_sum / accelerator.num_processes, "lr": lr_scheduler.get_last_lr()[0]}
            epoch, epoch_end = global_step // run.steps_per_epoch, global_step % run.steps_per_epoch == 0
            epoch_end = epoch_end and global_step < run.max_train_steps and not stops
            saving = global_step % args.checkpointing_steps == 0 or stops or epoch_end
            check_finite(run, model, global_step, logs["loss"], saving)
            if ema_model is not None:
                logs["ema_decay"] = ema_model.cur_decay_value
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if epoch_end:
                with run.clock.paused():
                    if accelerator.is_main_process:
                        with stop.interrupting():  # minutes of sampling must not keep a preempted run waiting
                            save_outputs(
                                {"step": global_step, "epoch": epoch, "train_minutes": run.clock.minutes()}, False
                            )
                    # Also waits for the main process: whether any process was stopped meanwhile.
                    stops = accelerator.reduce(torch.tensor(float(len(stop.received)), device=device), "sum").item()
            if global_step % args.checkpointing_steps == 0 or stops:
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
        progress_bar.close()
        finish_run(run, save_outputs, stop, global_step)
    finally:  # let other runs write to the folder, and signals act as usual, whether this run ended or failed
        if run.lock is not None:
            run.lock.release()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def finish_run(run: Run, save_outputs: Callable[[dict, bool], None], stop: "StopSignals", global_step: int) -> None:
    """The end of a run: checkpoint the last step, then write the sample grid, scores, pipeline and upload, stopping
    at once on a signal (the checkpoint already holds every step)."""
    args, accelerator = run.args, run.accelerator
    minutes = run.clock.minutes()
    resumed_here = run.resume_path is not None and checkpoint_step(run.resume_path) == global_step
    if global_step % args.checkpointing_steps and not resumed_here:  # a stop during the outputs loses no step
        save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
    with stop.interrupting():  # the weights are safe: a signal stops the outputs at once
        if accelerator.is_main_process and not stop.received:
            epoch = math.ceil(global_step / run.steps_per_epoch)
            save_outputs({"step": global_step, "epoch": epoch, "train_minutes": minutes}, True)
    accelerator.end_training()
    if stop.received:
        accelerator.print(
            f"Stopped by {signal.Signals(stop.received[0]).name} while writing the end-of-run outputs; "
            f"checkpoint-{global_step} holds all {global_step} steps. The same command plus "
            "--resume_from_checkpoint latest writes them."
        )
        raise SystemExit(128 + stop.received[0])


def cli(main: Callable[[argparse.Namespace], None], args: argparse.Namespace, script: str) -> None:
    """Run a training script's `main`: bad input ends with one line naming the problem, not a traceback."""
    signal.signal(signal.SIGTERM, raise_stopped)  # until the training loop takes the signals over
    signal.signal(signal.SIGINT, raise_stopped)
    try:
        main(args)
        return
    except Stopped as e:
        print(f"Stopped by {e} before the first step of training; nothing was lost. Run the same command to start.")
        sys.exit(128 + e.signum)
    except (ValueError, OSError, FloatingPointError) as e:
        message = f"{script}: error: {e}"
    except RuntimeError as e:  # a collective failed: another process of the job died
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise
        message = (
            f"{script}: error: rank {torch.distributed.get_rank()} lost contact with the other processes of the job "
            f"({str(e).splitlines()[0][-160:]}): another process or machine failed, and its own log says which. "
            "Start the job again with --resume_from_checkpoint latest."
        )
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(message)  # outside the handler, so that nothing keeps the failed run (and its output-dir lock) alive


def use_plain_attention(model: torch.nn.Module, device: torch.device) -> None:
    """On CPU, swap scaled_dot_product_attention for the plain matmul-softmax processor.

    PyTorch's CPU flash-attention backward is slow on short bf16 sequences such as 7x7 = 49 tokens (docs/speed.md)."""
    if device.type == "cpu":
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())


def device_name(device: torch.device) -> str:
    """The processor a run trained on, for its model card: the GPU's name, or the CPU's and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def seed_for(*keys: int) -> int:
    """A well-mixed seed derived from integers, so every step's randomness is a pure function of (seed, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def epoch_permutation(num_images: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The data order of an epoch, a function of (seed, epoch) alone, so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed_for(seed, 0, epoch))
    return torch.randperm(num_images, generator=generator).to(device)


def micro_batch_slice(
    step_in_epoch: int, micro_step: int, accumulation_steps: int, num_processes: int, process_index: int, size: int
) -> slice:
    """Where a process's micro-batch lies in the epoch's permutation: every image once per epoch, across all ranks."""
    start = ((step_in_epoch * accumulation_steps + micro_step) * num_processes + process_index) * size
    return slice(start, start + size)


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


class Stopped(Exception):
    """A stop signal that interrupts work that holds no training: start-up, sample grids, scores, saving outputs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum: int, frame: object) -> None:
    """A signal handler that interrupts what runs, as `Stopped`."""
    raise Stopped(signum)


class StopSignals:
    """Records SIGTERM (preemption) and SIGINT (Ctrl-C) so that training can checkpoint and stop at a step's end.

    A second signal acts at once, the default way."""

    def __init__(self) -> None:
        self.received: list[int] = []
        signal.signal(signal.SIGTERM, self._record)
        signal.signal(signal.SIGINT, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """Inside, a signal interrupts what runs at once, and is recorded (for work that holds no training, such as
        sample grids and scores: the run then checkpoints and stops)."""
        signal.signal(signal.SIGTERM, raise_stopped)
        signal.signal(signal.SIGINT, raise_stopped)
        try:
            yield
        except Stopped as e:
            self.received.append(e.signum)
        finally:  # after a signal, a second one acts at once, the default way
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.received else self._record)
            signal.signal(signal.SIGINT, signal.default_int_handler if self.received else self._record)


class TrainingClock:
    """Minutes of training, without the pauses spent sampling, scoring and saving; a resumed run starts from the
    minutes its checkpoint recorded."""

    def __init__(self) -> None:
        self.start()

    def start(self, minutes_before: float = 0.0) -> None:
        """Start counting, from the minutes an earlier run recorded."""
        self.started, self.pauses = time.perf_counter() - 60 * minutes_before, 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.pauses += time.perf_counter() - started

    def minutes(self) -> float:
        """Training minutes so far."""
        return (time.perf_counter() - self.started - self.pauses) / 60
