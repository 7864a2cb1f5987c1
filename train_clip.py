#!/usr/bin/env python
"""Train a CLIP for handwritten digits, so that text prompts work offline.

    python train_clip.py --dataset_name ylecun/mnist --output_dir pretrained/mnist-clip

A small transformers `CLIPModel` (a ViT over 4x4 patches of the digit, a text transformer over short captions) learns
contrastively from MNIST's training digits and captions that say what each digit is and how it is written: "a bold,
right-slanted seven", "the digit 3, thin and small" (pipeline/captions.py: thickness, slant and size are measured on
each image and named by the training set's terciles for that digit). Its tokenizer is trained on the captions first.
The result is a Hub-style CLIP folder: `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` load it,
`train_ddpm.py --conditioning text --text_encoder` takes its text tower, and `attributes.json` holds the thresholds.
"""

import argparse
import json
import os
import tempfile

import numpy as np
import torch
from accelerate.utils import set_seed
from huggingface_hub import upload_folder

from pipeline.captions import NUMBER_WORDS, batch_captions, caption, dataset_attributes
from pipeline.clip import create_clip, save_clip, train_tokenizer, zero_shot_accuracy
from pipeline.data import load_images
from pipeline.training import (
    add_data_arguments,
    add_output_arguments,
    add_training_arguments,
    check_arguments,
    cli,
    make_accelerator,
    make_optimization,
    save_run_state,
    start_run,
    train_loop,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, named as the other training scripts name them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    add_training_arguments(parser, learning_rate=1e-3, output_dir="mnist-clip", generates=False)
    model = parser.add_argument_group("model")
    model.add_argument("--width", type=int, default=128, help="Both towers' width (and the embedding's).")
    model.add_argument("--layers", type=int, default=3, help="Both towers' transformer layers.")
    add_output_arguments(parser, generates=False)
    parser.set_defaults(train_batch_size=256, num_epochs=8, lr_warmup_steps=100)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    if args.width < 4 or args.width % 4 or args.layers < 1:
        parser.error(
            f"--width must be a multiple of 4 (4 heads) and --layers at least 1, got {args.width}, {args.layers}."
        )
    return args


def caption_corpus(seed: int, size: int = 20_000) -> list[str]:
    """Captions of every digit with every attribute level, in every phrasing: what the tokenizer learns from."""
    rng = np.random.default_rng(seed)
    return [
        caption(d % 10, {name: rng.integers(3) for name in ("thickness", "slant", "size")}, rng) for d in range(size)
    ]


def main(args: argparse.Namespace) -> None:
    """Train the tokenizer, then the CLIP, checkpointing; save the CLIP folder to `args.output_dir`."""
    accelerator = make_accelerator(args)
    device = accelerator.device
    set_seed(args.seed)
    training_args = {k: v for k, v in vars(args).items() if k != "hub_token"}
    tokenizer = train_tokenizer(caption_corpus(args.seed))
    model = create_clip(tokenizer, args.width, args.layers)
    run = start_run(args, accelerator, {"clip": model.config.to_dict()}, training_args, 28, labelled=True)
    thresholds, levels = dataset_attributes(run.digits, run.labels)
    labels = run.labels.cpu().numpy()
    optimizer, lr_scheduler, _ = make_optimization(args, model, run.max_train_steps)
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: save_run_state(run, None, output_dir))
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    def step_loss(batch: torch.Tensor, step: int, micro_step: int) -> torch.Tensor:
        # Each digit gets a new caption every step: a random subset of its attributes, in a random phrasing.
        texts = batch_captions(batch.tolist(), labels, levels, args.seed, step, micro_step)
        tokens = tokenizer(texts, padding=True, return_tensors="pt").to(device)
        return model(**tokens, pixel_values=run.digits[batch], return_loss=True).loss

    # The digits the end of the run is scored on: the test split's, unseen in training.
    eval_images, eval_labels = load_images(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.eval_split, args.cache_dir,
        args.image_column, args.label_column,
    )  # fmt: skip
    if eval_labels is None:
        raise ValueError(f"--eval_split {args.eval_split} has no digit labels to score the CLIP against.")

    def save_outputs(record: dict, end: bool) -> None:
        unwrapped = accelerator.unwrap_model(model).eval()
        accuracy = zero_shot_accuracy(unwrapped, tokenizer, eval_images, eval_labels.numpy())
        accelerator.log({"eval/zero_shot_accuracy": accuracy}, step=record["step"])
        with open(os.path.join(args.output_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({**record, "zero_shot_accuracy": accuracy}) + "\n")
        if end or record["epoch"] % args.save_model_epochs == 0:
            save_clip(unwrapped, tokenizer, thresholds, args.output_dir)
        if end and run.repo_id is not None:
            with tempfile.TemporaryDirectory() as folder:
                save_clip(unwrapped, tokenizer, thresholds, folder)
                upload_folder(repo_id=run.repo_id, folder_path=folder, token=args.hub_token)
        unwrapped.train()
        print(
            f"Step {record['step']}: zero-shot accuracy {accuracy:.4f} on {args.eval_split} ('a handwritten "
            f"{NUMBER_WORDS[0]}' ...)" + (f"; saved the CLIP to {args.output_dir}" if end else "")
        )

    train_loop(run, model, optimizer, lr_scheduler, None, step_loss, save_outputs, project_name="train_clip")


if __name__ == "__main__":
    cli(main, parse_args(), "train_clip.py")
