#!/usr/bin/env python
"""Text: how well the CLIP trained here reads digits and captions. Zero-shot classification of the test split with
"a handwritten {word}" prompts, and attribute retrieval: for each test digit in the lower or upper third of an
attribute (for its digit, by the CLIP's `attributes.json`), does the caption with its value ("a thin seven") score
above the one with the opposite value ("a bold seven")?

    python benchmarks/text.py --clip pretrained/mnist-clip --dataset_name ylecun/mnist
"""

import argparse

import numpy as np
import torch
from machine import describe, write_result
from transformers import CLIPModel, CLIPTokenizer

from pipeline.captions import ATTRIBUTES, NUMBER_WORDS, attribute_levels, load_thresholds, measure, with_article
from pipeline.clip import image_embeddings, text_embeddings, zero_shot_accuracy
from pipeline.data import load_images


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


def main() -> None:
    """Score the CLIP; print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default="pretrained/mnist-clip", help="A CLIP folder that train_clip.py wrote.")
    parser.add_argument("--dataset_name", default="ylecun/mnist", help="Real digits: their test split is scored.")
    parser.add_argument("--out", default="benchmarks/results/text.json")
    args = parser.parse_args()

    machine = describe(torch.device("cpu"))
    print(f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['threads']} threads")
    model, tokenizer = CLIPModel.from_pretrained(args.clip).eval(), CLIPTokenizer.from_pretrained(args.clip)
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
