#!/usr/bin/env python
"""Text: how well the CLIP trained here reads digits and captions. Zero-shot classification of the test split with
"a handwritten {word}" prompts, and attribute retrieval: for each test digit in the lower or upper third of an
attribute (for its digit, by the CLIP's `attributes.json`), does the caption with its value ("a thin seven") score
above the one with the opposite value ("a bold seven")?

CLIP guidance (`--guided_model`): a pipeline's digits drawn toward "a handwritten {word}" (digit i asked to be
i % 10, seeds 0..N-1, its default sampler) at each `--clip_guidance_scales`, scored as `mnist-diffusion evaluate`
scores (label accuracy by the project's classifier, FID), with the seconds each digit took.

    python benchmarks/text.py --clip pretrained/mnist-clip --dataset_name ylecun/mnist
    python benchmarks/text.py --guided_model pretrained/ddpm-mnist --clip_guidance_scales 0 500 --num_samples 1000 \
        --dataset_name ylecun/mnist --out benchmarks/results/clip_guidance.json
"""

import argparse
import time

import numpy as np
import torch
from machine import describe, write_result
from transformers import CLIPModel, CLIPTokenizer

from pipeline.captions import (
    ATTRIBUTES,
    EXAMPLE_PROMPT,
    NUMBER_WORDS,
    attribute_levels,
    load_thresholds,
    measure,
    with_article,
)
from pipeline.clip import image_embeddings, text_embeddings, zero_shot_accuracy
from pipeline.data import load_images
from pipeline.evaluate import evaluate_digits, reference_features
from pipeline.sampling import digit_cycle, load_pipeline, to_uint8, with_default_sampler


@torch.no_grad()
def attribute_retrieval(
    model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, labels: np.ndarray, thresholds: dict
) -> dict[str, float]:
    """Per attribute, how often the caption with a digit's measured extreme beats the one with the opposite."""
    levels = attribute_levels(measure(images), labels, thresholds)
    embedded = torch.cat([image_embeddings(model, chunk.float() / 127.5 - 1) for chunk in images.split(1024)])
    results = {}
    for name, (low, _, high) in ATTRIBUTES.items():
        prompts = [[with_article(f"{value} {word}") for value in (low, high)] for word in NUMBER_WORDS]
        text = text_embeddings(model, tokenizer, sum(prompts, [])).view(len(NUMBER_WORDS), 2, -1)
        extreme = levels[name] != 1
        scores = torch.einsum("nd,nkd->nk", embedded[extreme], text[labels[extreme]])
        results[name] = float((scores.argmax(1).numpy() == levels[name][extreme] // 2).mean())
    return results


def clip_guidance(
    pipeline_folder: str,
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    scales: list[float],
    num_samples: int,
    real: np.ndarray,
    num_inference_steps: int | None = None,
) -> list[dict]:
    """Label accuracy, FID and seconds a digit of CLIP-guided sampling at each scale."""
    pipe = load_pipeline(pipeline_folder)
    sampler, name, steps = with_default_sampler(pipe)
    steps = num_inference_steps or steps
    sampler.set_progress_bar_config(disable=True)
    labels = digit_cycle(num_samples)
    rows = []
    for scale in scales:
        start, batches = time.perf_counter(), []
        for first in range(0, num_samples, 50):
            seeds = range(first, min(first + 50, num_samples))
            images = sampler(
                prompt=[EXAMPLE_PROMPT.format(NUMBER_WORDS[labels[i]]) for i in seeds],
                generator=[torch.Generator().manual_seed(i) for i in seeds], num_inference_steps=steps,
                clip_model=model, clip_tokenizer=tokenizer, clip_guidance_scale=scale, output_type="np",
            ).images  # fmt: skip
            batches.append(to_uint8(images))
        seconds = (time.perf_counter() - start) / num_samples
        scores = evaluate_digits(np.concatenate(batches), real, labels)
        rows.append({"clip_guidance_scale": scale, "sampler": name, "steps": steps, "seconds_per_digit": seconds,
                     **{k: scores[k] for k in ("label_accuracy", "fid", "precision", "recall")}})  # fmt: skip
        print(f"scale {scale:g}: the digit asked for {scores['label_accuracy']:.1%}, FID {scores['fid']:.2f}, "
              f"{seconds:.3f} s a digit")  # fmt: skip
    return rows


def main() -> None:
    """Score the CLIP; print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="pretrained/mnist-clip", help="A CLIP folder that train_clip.py wrote.")
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Real digits: their test split is scored.")
    parser.add_argument("--guided_model", default=None, help="A pipeline to sample with CLIP guidance instead.")
    parser.add_argument("--clip_guidance_scales", type=float, nargs="+", default=[0.0, 500.0])
    parser.add_argument("--num_samples", type=int, default=1000, help="Digits a scale (CLIP guidance).")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the model's sampler's.")
    parser.add_argument("--out", default="benchmarks/results/text.json")
    args = parser.parse_args()

    machine = describe(torch.device("cpu"))
    print(f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['threads']} threads")
    model, tokenizer = CLIPModel.from_pretrained(args.clip).eval(), CLIPTokenizer.from_pretrained(args.clip)
    if args.guided_model:
        real = reference_features(args.dataset_name, "test")
        rows = clip_guidance(
            args.guided_model, model, tokenizer, args.clip_guidance_scales, args.num_samples, real,
            args.num_inference_steps,
        )  # fmt: skip
        write_result({"clip": args.clip, "model": args.guided_model, "results": rows, "machine": machine}, args.out)
        return
    images, labels = load_images(args.dataset_name, split="test")
    labels = labels.numpy()
    result = {
        "clip": args.clip,
        "zero_shot_accuracy": zero_shot_accuracy(model, tokenizer, images, labels),
        "attribute_retrieval": attribute_retrieval(model, tokenizer, images, labels, load_thresholds(args.clip)),
        "num_test_digits": len(labels),
        "machine": machine,
    }
    print(
        f"zero-shot accuracy ('a handwritten {{word}}', {len(labels):,} test digits): {result['zero_shot_accuracy']:.4f}"
    )
    for name, accuracy in result["attribute_retrieval"].items():
        low, _, high = ATTRIBUTES[name]
        print(f"attribute retrieval, {name} ({low} vs {high}): {accuracy:.4f}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
