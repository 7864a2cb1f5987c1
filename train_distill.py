#!/usr/bin/env python
"""Distil a trained MNIST DDPM into a student that samples in a few steps (latent consistency distillation).

    python train_distill.py --pretrained_teacher_model pretrained/ddpm-mnist --output_dir ddpm-mnist-fast \
        --dataset_name ylecun/mnist --lr_warmup_steps 50 --max_train_steps 400

The student starts from the teacher's weights and learns, on the teacher's own 50-step grid, to jump where the
teacher's autoguided steps lead (diffusers' `train_lcm_distill_*.py`, whose flag names these are); a small
discriminator of real digits judges its own few-step digits too. The result is a `MNISTDiffusionPipeline` folder
with an `LCMScheduler` that samples in `--num_inference_steps` by default. Each default's reason: docs/recipe.md.
"""

import argparse
import copy
import os
from functools import partial

import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, LCMScheduler, UNet2DModel

from pipeline import MNISTDiffusionPipeline
from pipeline.loss import ConsistencyDistillationLoss, Discriminator
from pipeline.pipeline_mnist_diffusion import consistency_timesteps
from pipeline.sampling import load_pipeline
from pipeline.training import (
    add_data_arguments,
    add_output_arguments,
    add_training_arguments,
    check_arguments,
    check_ranges,
    cli,
    load_ema,
    make_accelerator,
    make_optimization,
    save_outputs,
    save_run_state,
    seed_for,
    start_run,
    train_loop,
    use_plain_attention,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, named as in diffusers' `train_lcm_distill_sd_wds.py` where they overlap."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained_teacher_model",
        required=True,
        help="The trained pipeline to distil (folder or Hub id); the student starts from its UNet.",
    )
    add_data_arguments(parser)
    add_training_arguments(parser, learning_rate=1e-4, output_dir="ddpm-mnist-fast")
    distill = parser.add_argument_group("consistency distillation")
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
        "3, above the teacher's own 2, scores best in the student's 4 steps).",
    )
    distill.add_argument(
        "--adversarial_weight",
        type=float,
        default=0.1,
        help="Also train the student against a small discriminator of real digits, on digits of its own sampler, its "
        "GAN loss at this weight (0: off).",
    )
    distill.add_argument(
        "--discriminator_learning_rate", type=float, default=2e-4, help="Adam's learning rate for the discriminator."
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.num_inference_steps < 1 or args.num_ddim_timesteps < 1:
        parser.error(
            f"--num_inference_steps and --num_ddim_timesteps must be at least 1, got {args.num_inference_steps} and {args.num_ddim_timesteps}."
        )
    if not args.guidance_scale >= 1:
        parser.error(f"--guidance_scale must be at least 1 (1: no guidance), got {args.guidance_scale}.")
    check_ranges(
        parser, args, positive=("huber_c", "timestep_scaling_factor", "discriminator_learning_rate"),
        non_negative=("adversarial_weight",), below_one=("ema_decay",),
    )  # fmt: skip
    return args


def load_teacher(
    args: argparse.Namespace, device: torch.device
) -> tuple[UNet2DModel, MNISTDiffusionPipeline, LCMScheduler]:
    """The student (a copy of the teacher's UNet), the frozen teacher pipeline (its UNet and guide, on `device`), and
    the student's `LCMScheduler` on the teacher's noise schedule; every setting that depends on the teacher checked."""
    name = args.pretrained_teacher_model
    teacher = load_pipeline(name, flag="--pretrained_teacher_model")
    if teacher.conditioning != "none":
        raise ValueError(
            f"--pretrained_teacher_model {name} is {teacher.conditioning}-conditional; distillation takes "
            "unconditional models for now."
        )
    if not isinstance(teacher.scheduler, DDPMScheduler):
        raise ValueError(
            f"--pretrained_teacher_model {name} samples with a {type(teacher.scheduler).__name__}, not the "
            "DDPMScheduler of a trained model: distil from the model that was trained, not from a distilled one."
        )
    num_train_timesteps = teacher.scheduler.config.num_train_timesteps
    if num_train_timesteps % args.num_ddim_timesteps:
        raise ValueError(
            f"--num_ddim_timesteps must divide the teacher's {num_train_timesteps} training steps, "
            f"got {args.num_ddim_timesteps}."
        )
    if args.num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"--num_inference_steps must be between 1 and the teacher's {num_train_timesteps} training steps, got "
            f"{args.num_inference_steps}."
        )
    for unet in (teacher.unet, teacher.guide_unet):
        if unet is not None and not all(torch.isfinite(p).all() for p in unet.parameters()):
            raise ValueError(
                f"--pretrained_teacher_model {name} holds weights that are not finite numbers: it is damaged. "
                "Distil a model that samples digits."
            )
    config = {k: v for k, v in teacher.scheduler.config.items() if k != "variance_type"}  # DDPM's only
    scheduler = LCMScheduler.from_config(
        config, original_inference_steps=args.num_ddim_timesteps, timestep_scaling=args.timestep_scaling_factor
    )
    student = copy.deepcopy(teacher.unet).train()
    for unet in (teacher.unet, teacher.guide_unet):
        if unet is not None:
            use_plain_attention(unet.requires_grad_(False).eval().to(device), device)
    return student, teacher, scheduler


def main(args: argparse.Namespace) -> None:
    """Distil, checkpoint, and save the student pipeline to `args.output_dir`."""
    accelerator = make_accelerator(args)
    device = accelerator.device
    set_seed(args.seed)
    training_args = {k: v for k, v in vars(args).items() if k != "hub_token"}
    model, teacher, noise_scheduler = load_teacher(args, device)
    use_plain_attention(model, device)
    model_config = {"unet": dict(model.config), "scheduler": dict(noise_scheduler.config)}
    run = start_run(args, accelerator, model_config, training_args, model.config.sample_size)
    optimizer, lr_scheduler, ema_model = make_optimization(args, model, run.max_train_steps)
    # The consistency target: an EMA of the student (decay --ema_decay), a frozen copy of it between updates.
    target = copy.deepcopy(model).requires_grad_(False).eval().to(device)
    discriminator = discriminator_optimizer = None
    if args.adversarial_weight:
        discriminator = Discriminator().to(device)
        discriminator_optimizer = torch.optim.Adam(
            discriminator.parameters(), lr=args.discriminator_learning_rate, betas=(0.5, 0.999)
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
        adversarial_weight=args.adversarial_weight,
        sampling_timesteps=consistency_timesteps(noise_scheduler.config.num_train_timesteps, args.num_inference_steps),
    )

    def save_model_hook(models: list, weights: list, output_dir: str) -> None:
        save_run_state(run, ema_model, output_dir, unet_target=target)

    def load_model_hook(models: list, input_dir: str) -> None:
        load_ema(ema_model, input_dir, device)
        if not os.path.isdir(os.path.join(input_dir, "unet_target")):
            raise ValueError(f"{input_dir}/unet_target, the distillation's target network, is missing")
        target.load_state_dict(type(target).from_pretrained(os.path.join(input_dir, "unet_target")).state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    others = ()
    if discriminator is not None:  # prepared after the student, so that checkpoints name the student model.safetensors
        discriminator, discriminator_optimizer = accelerator.prepare(discriminator, discriminator_optimizer)
        loss_fn.discriminator, others = discriminator, (discriminator_optimizer,)
    if ema_model is not None:
        ema_model.to(device)
    pipeline = MNISTDiffusionPipeline(
        accelerator.unwrap_model(model), noise_scheduler, default_num_inference_steps=args.num_inference_steps
    )
    shard = (accelerator.process_index, accelerator.num_processes)

    def step_loss(batch: torch.Tensor, step: int, micro_step: int) -> torch.Tensor:
        # The global batch's draws, the same on every process: each takes its shard.
        generator = torch.Generator(device).manual_seed(seed_for(args.seed, 1, step, micro_step, 0))
        return loss_fn(model, run.digits[batch], generator, shard)

    def after_update(step: int) -> None:
        torch._foreach_lerp_(list(target.parameters()), list(model.parameters()), 1 - args.ema_decay)

    train_loop(run, model, optimizer, lr_scheduler, ema_model, step_loss, partial(save_outputs, run, pipeline, ema_model),
               after_update, others,
               project_name="train_distill")  # fmt: skip


if __name__ == "__main__":
    cli(main, parse_args(), "train_distill.py")
