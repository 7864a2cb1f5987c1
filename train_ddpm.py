#!/usr/bin/env python
"""Train the 50-step MNIST DDPM with Accelerate: unconditional, by class label, or by caption.

    python train_ddpm.py --dataset_name ylecun/mnist --output_dir ddpm-mnist            # one device or the CPU
    accelerate launch --config_file accelerate_config.yaml train_ddpm.py --output_dir ddpm-mnist   # several GPUs

The result is a `MNISTDiffusionPipeline` folder in `--output_dir` (EMA weights), loadable with
`DiffusionPipeline.from_pretrained(output_dir, trust_remote_code=True)`. Each default's reason: docs/recipe.md.
To distil it into a few-step model, see train_distill.py.
"""

import argparse
import copy
import os
import sys
from functools import partial

import numpy as np
import torch
from accelerate.utils import set_seed

from pipeline import MNISTDiffusionPipeline, create_model_and_scheduler
from pipeline.captions import batch_captions, dataset_attributes, named_attributes
from pipeline.checkpoint import checkpoint_step
from pipeline.loss import DiffusionLoss
from pipeline.model import NUM_CLASSES, load_text_encoder
from pipeline.training import (
    add_data_arguments,
    add_output_arguments,
    add_training_arguments,
    check_arguments,
    check_ranges,
    cli,
    ema_weights,
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

# Flags of the distillation that moved to train_distill.py: naming one here says where it went.
DISTILL_FLAGS = ("--distill_from", "--num_ddim_timesteps", "--loss_type", "--huber_c", "--ema_decay",
                 "--timestep_scaling_factor", "--num_inference_steps", "--adversarial_weight",
                 "--discriminator_learning_rate")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, named as in diffusers' `train_unconditional.py` where they overlap."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
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
        "must recover the digit from tiny differences and sample blobs (docs/recipe.md).",
    )
    add_training_arguments(parser, learning_rate=1e-3, output_dir="ddpm-mnist")
    recipe = parser.add_argument_group("the denoising recipe (docs/recipe.md)")
    recipe.add_argument(
        "--weighting_scheme",
        default="logit_normal",
        choices=["none", "logit_normal"],
        help="How training timesteps are drawn: uniformly, or from SD3's logit-normal density (the middle noise levels).",
    )
    recipe.add_argument(
        "--stable_target_reference_size",
        type=int,
        default=16384,
        help="Regress on the posterior mean over each digit and this many reference digits drawn every step, not on "
        "the digit alone (Stable Target Field); with --conditioning, over the reference digits of its label. 0: off.",
    )
    recipe.add_argument(
        "--autoguidance_fraction",
        type=float,
        default=None,
        help="Save the (EMA) weights after this fraction of the training steps with the pipeline, as its guide_unet: "
        "sampling guides away from this weaker model (autoguidance, Karras et al. 2024). 0: none. Default: 0.2 for "
        "unconditional models, 0 for conditional ones (they have classifier-free guidance).",
    )
    recipe.add_argument(
        "--guidance_interval",
        type=int,
        nargs=2,
        default=[9, 45],
        metavar=("LOWEST", "HIGHEST"),
        help="The timesteps at which the guide is applied: it does nothing at the noisiest ones and over-sharpens "
        "at the cleanest.",
    )
    add_output_arguments(parser)
    moved = [
        flag
        for flag in DISTILL_FLAGS
        if any(a.split("=")[0] == flag for a in (sys.argv[1:] if argv is None else argv))
    ]
    if moved:
        parser.error(f"{moved[0]}: distillation moved to train_distill.py (--distill_from is now its "
                     "--pretrained_teacher_model).")  # fmt: skip
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    check_ranges(parser, args, non_negative=("stable_target_reference_size",), below_one=("condition_dropout",))
    if args.autoguidance_fraction is None:
        args.autoguidance_fraction = 0.2 if args.conditioning == "none" else 0.0
    if not 0 <= args.autoguidance_fraction < 1:
        parser.error(f"--autoguidance_fraction must be in [0, 1) (0: no guide), got {args.autoguidance_fraction}.")
    if not 0 <= args.guidance_interval[0] <= args.guidance_interval[1]:
        parser.error(f"--guidance_interval must be two timesteps, lowest first, got {args.guidance_interval}.")
    return args


def main(args: argparse.Namespace) -> None:
    """Train, checkpoint, and save the pipeline to `args.output_dir`."""
    accelerator = make_accelerator(args)
    device = accelerator.device
    set_seed(args.seed)
    training_args = {k: v for k, v in vars(args).items() if k != "hub_token"}

    # The model, and the checks that protect what is already in --output_dir, before any data is read.
    text_encoder = tokenizer = None
    if args.conditioning == "text":
        text_encoder, tokenizer = load_text_encoder(args.text_encoder, args.cache_dir)
        text_encoder.to(device)
    model, noise_scheduler = create_model_and_scheduler(
        args.resolution or 28,
        args.prediction_type,
        args.model_config_name_or_path,
        args.conditioning,
        text_encoder.config.hidden_size if text_encoder is not None else None,
    )
    use_plain_attention(model, device)
    model_config = {"unet": dict(model.config), "scheduler": dict(noise_scheduler.config)}
    run = start_run(args, accelerator, model_config, training_args, model.config.sample_size,
                    labelled=args.conditioning != "none")  # fmt: skip
    null_condition = {"class_labels": torch.tensor(NUM_CLASSES, device=device)}  # the "no label" token
    if args.conditioning == "text":
        # Captions say the digit and how it is written (pipeline/captions.py), as the CLIP trained here learnt them.
        _, levels = dataset_attributes(run.digits, run.labels)
        labels_np = run.labels.cpu().numpy()
        written = torch.as_tensor(np.stack(list(levels.values())), device=device)  # (attributes, digits)
        encoder = MNISTDiffusionPipeline(model, noise_scheduler, text_encoder, tokenizer)
        null_condition = {"encoder_hidden_states": encoder.encode_prompt([""])[0]}
        caption_states = {}  # the encoder is frozen: each caption (a few thousand in all) is encoded once

        def encode(texts: list[str]) -> torch.Tensor:
            new = sorted(set(texts) - caption_states.keys())
            if new:
                with torch.no_grad():
                    caption_states.update(zip(new, encoder.encode_prompt(new), strict=True))
            return torch.stack([caption_states[text] for text in texts])

    # The guide is the model at an earlier step (0: none; a one-step run has no earlier model).
    guide_step = max(1, round(args.autoguidance_fraction * run.max_train_steps)) if args.autoguidance_fraction else 0
    guide_step = guide_step if guide_step < run.max_train_steps else 0
    optimizer, lr_scheduler, ema_model = make_optimization(args, model, run.max_train_steps)
    loss_fn = DiffusionLoss(noise_scheduler, args.weighting_scheme, args.condition_dropout)

    guide = None  # the EMA weights at step guide_step, frozen

    def save_model_hook(models: list, weights: list, output_dir: str) -> None:
        save_run_state(run, ema_model, output_dir, unet_guide=guide)

    def load_model_hook(models: list, input_dir: str) -> None:
        load_ema(ema_model, input_dir, device)
        if guide_step and checkpoint_step(input_dir) >= guide_step:
            if not os.path.isdir(os.path.join(input_dir, "unet_guide")):
                raise ValueError(
                    f"{input_dir}/unet_guide, the autoguidance guide of step {guide_step}, is missing (the run had "
                    "another --autoguidance_fraction)"
                )
            nonlocal guide
            guide = type(accelerator.unwrap_model(models[0])).from_pretrained(os.path.join(input_dir, "unet_guide"))
            use_plain_attention(guide.requires_grad_(False).eval().to(device), device)
            pipeline.register_modules(guide_unet=guide)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema_model is not None:
        ema_model.to(device)
    unwrapped = accelerator.unwrap_model(model)
    pipeline = MNISTDiffusionPipeline(
        unwrapped,
        noise_scheduler,
        text_encoder,
        tokenizer,
        guidance_interval=args.guidance_interval if guide_step else None,
    )
    digits, labels, shard = run.digits, run.labels, (accelerator.process_index, accelerator.num_processes)

    def step_loss(batch: torch.Tensor, step: int, micro_step: int) -> torch.Tensor:
        # The global batch's draws, the same on every process: each takes its shard (DiffusionLoss).
        generator = torch.Generator(device).manual_seed(seed_for(args.seed, 1, step, micro_step, 0))
        targets = {}
        if args.stable_target_reference_size:  # the same reference digits on every process
            draws = torch.Generator(device).manual_seed(seed_for(args.seed, 2, step, micro_step))
            picks = torch.randint(len(digits), (args.stable_target_reference_size,), generator=draws, device=device)
            targets["reference"] = digits[picks]
            if args.conditioning != "none":  # a label (or its caption) rules out the other classes' digits
                targets["reference_match"] = labels[batch, None] == labels[picks]
        condition = {}
        if args.conditioning == "class":
            condition["class_labels"] = labels[batch]
        elif args.conditioning == "text":
            texts = batch_captions(batch.tolist(), labels_np, levels, args.seed, step, micro_step)
            condition["encoder_hidden_states"] = encode(texts)
            if args.stable_target_reference_size:  # a caption also rules out the digits written otherwise
                asked = torch.tensor([[said.get(name, -1) for name in levels] for said in map(named_attributes, texts)],
                                     device=device)[:, :, None]  # fmt: skip
                targets["reference_match"] &= ((asked < 0) | (asked == written[:, picks])).all(1)
        return loss_fn(model, digits[batch], generator, condition, null_condition, shard, **targets)

    def after_update(step: int) -> None:
        nonlocal guide
        if step == guide_step:
            with ema_weights(unwrapped, ema_model):
                guide = copy.deepcopy(unwrapped).requires_grad_(False).eval()
            pipeline.register_modules(guide_unet=guide)

    train_loop(run, model, optimizer, lr_scheduler, ema_model, step_loss, partial(save_outputs, run, pipeline, ema_model),
               after_update)  # fmt: skip


if __name__ == "__main__":
    cli(main, parse_args(), "train_ddpm.py")
