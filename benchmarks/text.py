#!/usr/bin/env python
"""Text: how well the CLIP trained here reads digits and captions. Zero-shot classification of the test split with
"a handwritten {word}" prompts, and attribute retrieval: for each test digit in the lower or upper third of an
attribute (for its digit, by the CLIP's `attributes.json`), does the caption with its value ("a thin seven") score
above the one with the opposite value ("a bold seven")?

Prompting a model (`--model`: a text model, or any model with `--clip_guidance_scales`): digits drawn for
"a handwritten {word}" (digit i asked to be i % 10, seeds 0..N-1, its default sampler), scored as
`mnist-diffusion evaluate` scores (the project's classifier, FID), with the seconds each digit took; attribute
control (for each attribute and digit, `--attribute_pairs` seeds drawn for "a thin seven" and for "a bold seven":
does the measure move the asked way, and is each digit in the third asked for, by the CLIP's `attributes.json`);
and a grid of phrasings by digit, written next to the JSON.

    python benchmarks/text.py --clip pretrained/mnist-clip --dataset_name ylecun/mnist
    python benchmarks/text.py --model pretrained/ddpm-mnist-text --dataset_name ylecun/mnist \
        --out benchmarks/results/text_model.json
    python benchmarks/text.py --model pretrained/ddpm-mnist --clip_guidance_scales 300 --num_inference_steps 50 \
        --dataset_name ylecun/mnist --out benchmarks/results/clip_guidance.json
"""

import argparse
import os
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
from pipeline.pipeline_mnist_diffusion import MNISTDiffusionPipeline
from pipeline.sampling import digit_cycle, image_grid, load_pipeline, to_uint8, with_default_sampler

# The grid's rows: what a caption may say of a digit.
PHRASINGS = ("handwritten {}", "thin {}", "bold {}", "left-slanted {}", "right-slanted {}", "small {}", "large {}")


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


def prompted_digits(pipe: MNISTDiffusionPipeline, prompts: list[str], seeds: list[int], **kwargs) -> np.ndarray:
    """uint8 digits `(N, 28, 28)`: digit i drawn for `prompts[i]` from seed `seeds[i]`, 50 a batch."""
    batches = []
    for first in range(0, len(prompts), 50):
        part = slice(first, first + 50)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[part]]
        images = pipe(prompt=prompts[part], generator=generators, output_type="np", **kwargs).images
        batches.append(to_uint8(images))
    return np.concatenate(batches)


def attribute_control(pipe: MNISTDiffusionPipeline, thresholds: dict, pairs_per_digit: int, **kwargs) -> dict:
    """Per attribute, digits drawn for opposite values ("a thin seven", "a bold seven") from the same seeds: how often
    the upper value's digit measures above the lower value's, and how often each lands in the third asked for."""
    labels = np.repeat(np.arange(len(NUMBER_WORDS)), pairs_per_digit)
    seeds = list(range(len(labels)))
    results = {}
    for name, (low, _, high) in ATTRIBUTES.items():
        measured = [
            measure(
                prompted_digits(pipe, [with_article(f"{value} {NUMBER_WORDS[d]}") for d in labels], seeds, **kwargs)
            )
            for value in (low, high)
        ]
        levels = [attribute_levels(m, labels, thresholds)[name] for m in measured]
        results[name] = {
            "moved": float((measured[1][name] > measured[0][name]).mean()),
            f"measured_{low}": float((levels[0] == 0).mean()),
            f"measured_{high}": float((levels[1] == 2).mean()),
        }
        results[name]["measured_as_asked"] = (results[name][f"measured_{low}"] + results[name][f"measured_{high}"]) / 2
        print(f"  {name}: {low} -> {high} moved the measure {results[name]['moved']:.1%} of {len(labels)} pairs; "
              f"measured as asked {results[name]['measured_as_asked']:.1%}")  # fmt: skip
    return results


def prompt_scores(
    pipe: MNISTDiffusionPipeline, num_samples: int, pairs_per_digit: int, real: np.ndarray, thresholds: dict, **kwargs
) -> dict:
    """The digit asked for (in all and per digit), FID and seconds a digit for "a handwritten {word}", digit i asked
    to be i % 10 from seed i; then attribute control."""
    labels = digit_cycle(num_samples)
    start = time.perf_counter()
    digits = prompted_digits(pipe, [EXAMPLE_PROMPT.format(NUMBER_WORDS[d]) for d in labels], list(range(num_samples)),
                             **kwargs)  # fmt: skip
    seconds = (time.perf_counter() - start) / num_samples
    scores = evaluate_digits(digits, real, labels)
    keys = ("label_accuracy", "fid", "precision", "recall", "label_accuracy_per_digit")
    row = {"seconds_per_digit": seconds, **{k: scores[k] for k in keys}}
    print(f"the digit asked for {scores['label_accuracy']:.1%} (lowest {min(row['label_accuracy_per_digit']):.1%}), "
          f"FID {scores['fid']:.2f}, {seconds:.3f} s a digit")  # fmt: skip
    if pairs_per_digit:
        row["attribute_control"] = attribute_control(pipe, thresholds, pairs_per_digit, **kwargs)
    return row


def prompt_grid(pipe: MNISTDiffusionPipeline, path: str, **kwargs) -> None:
    """A row per phrasing ("a handwritten {word}", "a thin {word}", ...), a column per digit, one seed a column."""
    prompts = [with_article(p.format(word)) for p in PHRASINGS for word in NUMBER_WORDS]
    digits = prompted_digits(pipe, prompts, list(range(len(NUMBER_WORDS))) * len(PHRASINGS), **kwargs)
    image_grid(digits, nrow=len(NUMBER_WORDS)).save(path)
    print(f"Wrote {path} (rows: {', '.join(p.format('...') for p in PHRASINGS)})")


def model_scores(args: argparse.Namespace, model: CLIPModel, tokenizer: CLIPTokenizer) -> list[dict]:
    """`--model` prompted at each CLIP guidance scale (a text model's own prompts at 0), a grid of the last."""
    pipe = load_pipeline(args.model)
    sampler, name, steps = with_default_sampler(pipe)
    sampler.set_progress_bar_config(disable=True)
    steps = args.num_inference_steps or steps
    real, thresholds = reference_features(args.dataset_name, "test"), load_thresholds(args.clip)
    rows = []
    for scale in args.clip_guidance_scales:
        kwargs = {"num_inference_steps": steps}
        if scale or pipe.conditioning != "text":  # at scale 0 an unconditional model draws what it would unprompted
            kwargs.update(clip_model=model, clip_tokenizer=tokenizer, clip_guidance_scale=scale)
        print(f"{args.model}, {name} in {steps} steps, CLIP guidance scale {scale:g}:")
        scores = prompt_scores(sampler, args.num_samples, args.attribute_pairs, real, thresholds, **kwargs)
        rows.append({"clip_guidance_scale": scale, "sampler": name, "steps": steps, **scores})
    prompt_grid(sampler, os.path.splitext(args.out)[0] + ".png", **kwargs)
    return rows


def main() -> None:
    """Score the CLIP, or a model prompted; print the scores, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="pretrained/mnist-clip", help="A CLIP folder that train_clip.py wrote.")
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Real digits: their test split is scored.")
    parser.add_argument("--model", default=None, help="A pipeline to prompt: a text model, or any, CLIP-guided.")
    parser.add_argument("--clip_guidance_scales", type=float, nargs="+", default=[0.0])
    parser.add_argument("--num_samples", type=int, default=1000, help="Digits for 'a handwritten {word}', a scale.")
    parser.add_argument("--attribute_pairs", type=int, default=20, help="Pairs of digits per digit and attribute.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the model's sampler's.")
    parser.add_argument("--out", default="benchmarks/results/text.json")
    args = parser.parse_args()

    machine = describe(torch.device("cpu"))
    print(f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['threads']} threads")
    model, tokenizer = CLIPModel.from_pretrained(args.clip).eval(), CLIPTokenizer.from_pretrained(args.clip)
    if args.model:
        rows = model_scores(args, model, tokenizer)
        write_result({"clip": args.clip, "model": args.model, "results": rows, "machine": machine}, args.out)
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
