"""What captions say: the digit and how it is written (stroke thickness, slant, size), measured on each image and
put in words by thresholds at the training set's terciles, per digit."""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# What saved sample grids, model cards and scoring ask a text model for, and the zero-shot classifier's prompts.
EXAMPLE_PROMPT = "a handwritten {}"
# Each attribute's words for its lower, middle and upper third (None: the middle goes unsaid).
ATTRIBUTES = {
    "thickness": ("thin", "regular", "bold"),
    "slant": ("left-slanted", "upright", "right-slanted"),
    "size": ("small", None, "large"),
}
ATTRIBUTES_FILE = "attributes.json"


def measure(images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Thickness, slant and size of each digit in `(N, 28, 28)` uint8 images, white on black.

    Thickness: how many 3x3 erosions the ink survives, on average (a thick stroke survives more). Slant: the shear of
    the ink's second moments, horizontal pixels per pixel up (positive leans right). Size: the ink's radius of
    gyration in pixels."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32) / 255
    x = x.view(-1, 1, *x.shape[-2:])
    mass = x.sum((1, 2, 3)).clamp_min(1e-6)
    eroded, depth = x, torch.zeros_like(mass)
    for _ in range(4):
        eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)
        depth += eroded.sum((1, 2, 3)) / mass
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in x.shape[-2:]), indexing="ij")
    weights = x[:, 0] / mass.view(-1, 1, 1)
    row_mean, col_mean = (weights * rows).sum((1, 2)), (weights * cols).sum((1, 2))
    dr, dc = rows - row_mean.view(-1, 1, 1), cols - col_mean.view(-1, 1, 1)
    row_var, col_var, covariance = ((weights * d).sum((1, 2)) for d in (dr * dr, dc * dc, dr * dc))
    return {
        "thickness": depth.numpy(),
        "slant": (-covariance / row_var.clamp_min(1e-6)).numpy(),  # rows grow downwards: leaning right is negative
        "size": (row_var + col_var).sqrt().numpy(),
    }


def attribute_thresholds(measured: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, list[list[float]]]:
    """Per attribute, per digit, the terciles of the measurements: what is thin, regular or bold for that digit."""
    return {
        name: [np.quantile(values[labels == d], [1 / 3, 2 / 3]).tolist() for d in range(len(NUMBER_WORDS))]
        for name, values in measured.items()
    }


def attribute_levels(measured: dict[str, np.ndarray], labels: np.ndarray, thresholds: dict) -> dict[str, np.ndarray]:
    """Each digit's third (0 lower, 1 middle, 2 upper) of each attribute, by its own digit's thresholds."""
    levels = {}
    for name in ATTRIBUTES:
        lower, upper = np.asarray(thresholds[name])[np.asarray(labels)].T
        levels[name] = (measured[name] > lower).astype(int) + (measured[name] > upper)
    return levels


def dataset_attributes(digits: torch.Tensor, labels: torch.Tensor) -> tuple[dict, dict[str, np.ndarray]]:
    """The thresholds of a training set (digits `(N, 1, 28, 28)` in [-1, 1]) and each of its digits' levels."""
    measured, labels = measure(((digits + 1) * 127.5).round().to(torch.uint8).cpu()), labels.cpu().numpy()
    thresholds = attribute_thresholds(measured, labels)
    return thresholds, attribute_levels(measured, labels, thresholds)


def save_thresholds(thresholds: dict, folder: str | os.PathLike) -> None:
    """Write the thresholds next to the model that learned them."""
    with open(os.path.join(folder, ATTRIBUTES_FILE), "w") as f:
        json.dump({"words": ATTRIBUTES, "terciles_per_digit": thresholds}, f, indent=1)


def load_thresholds(folder: str | os.PathLike) -> dict:
    """The thresholds a text model's captions were written with."""
    with open(os.path.join(folder, ATTRIBUTES_FILE)) as f:
        return json.load(f)["terciles_per_digit"]


def caption(label: int, levels: dict[str, int], rng: np.random.Generator) -> str:
    """One caption of a digit: its name (word or numeral) in one of several phrasings, with a random subset of its
    attributes in random order, so that "a seven" and "a thin seven" both mean something."""
    words = [ATTRIBUTES[name][level] for name, level in levels.items() if rng.random() < 0.5]
    words = [words[i] for i in rng.permutation(len(words)) if words[i] is not None]
    word, numeral = NUMBER_WORDS[label], str(label)
    style = rng.integers(4)
    if style == 0:  # "a bold, right-slanted seven"
        return with_article(f"{', '.join(words)} {word}" if words else word)
    if style == 1:  # "a thin handwritten seven"
        return with_article(" ".join([*words, "handwritten", word]))
    name = f"the digit {numeral if rng.random() < 0.5 else word}" if style == 2 else f"the number {numeral}"
    if not words:
        return name
    if len(words) > 2:  # "the digit 3, thin, left-slanted and small"
        words = [", ".join(words[:-1]), words[-1]]
    return f"{name}, {' and '.join(words)}"


def with_article(phrase: str) -> str:
    """'a' or 'an' before the phrase."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def named_attributes(text: str) -> dict[str, int]:
    """The attribute levels a caption names: {"thickness": 2, "slant": 0} for "a bold, left-slanted seven"."""
    words = set(text.replace(",", " ").split())
    return {name: level for name, names in ATTRIBUTES.items() for level, word in enumerate(names) if word in words}


def batch_captions(indices: list[int], labels: np.ndarray, levels: dict[str, np.ndarray], *keys: int) -> list[str]:
    """A caption for each digit at `indices`, drawn by `caption` from a seed of `keys` and the digit's index alone, so
    that a batch gets the same captions split over any number of processes."""
    return [
        caption(
            int(labels[i]),
            {name: int(values[i]) for name, values in levels.items()},
            np.random.default_rng([*keys, i]),
        )
        for i in indices
    ]
