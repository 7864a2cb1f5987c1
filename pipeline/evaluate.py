"""Sample-quality metrics on the features of the MNIST classifier: FID, KID, precision and recall (k = 3),
classifier confidence, the predicted-class histogram and its entropy, and label accuracy for conditional models."""

import hashlib
import os
from importlib import resources

import numpy as np
import torch

from .classifier import WEIGHTS, classify, load_classifier

MAX_ENTROPY = float(np.log(10))  # a uniform mix of the ten digits


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets `(N, D)`: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^1/2) = sum of sqrt(eigenvalues of S_a^1/2 S_b S_a^1/2), a symmetric PSD matrix: no scipy needed.
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    middle = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(middle).sum())


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000) -> float:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets (Binkowski et al.)."""
    rng = np.random.default_rng(0)
    n = min(subset_size, len(a), len(b))
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        values.append(
            (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
        )
    return float(np.mean(values))


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row."""
    return torch.cat([torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values for chunk in x.split(1000)])


def _covered(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `points` inside at least one ball (center, radius)."""
    inside = [(torch.cdist(chunk, centers) <= radii).any(dim=1) for chunk in points.split(1000)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): how much of the fake set lies on the real manifold
    (k-NN balls around real samples), and how much of the real set the fake manifold covers."""
    real_t, fake_t = torch.from_numpy(real).float(), torch.from_numpy(fake).float()
    precision = _covered(fake_t, real_t, _knn_radii(real_t, k))
    recall = _covered(real_t, fake_t, _knn_radii(fake_t, k))
    return precision, recall


def class_statistics(probs: np.ndarray) -> dict:
    """Mean top-class confidence, the predicted-class histogram (fractions) and its entropy in nats."""
    histogram = np.bincount(probs.argmax(1), minlength=10) / len(probs)
    nonzero = histogram[histogram > 0]
    return {
        "confidence": float(probs.max(1).mean()),
        "class_histogram": [round(float(h), 4) for h in histogram],
        "class_entropy": float(-(nonzero * np.log(nonzero)).sum()),
    }


def reference_features(dataset_name: str, split: str = "test", cache_dir: str | None = None) -> np.ndarray:
    """Classifier features of a real split, cached on disk per dataset, split and classifier weights."""
    from .data import load_images

    weights_hash = hashlib.sha256(resources.files("pipeline").joinpath(WEIGHTS).read_bytes()).hexdigest()[:12]
    key = hashlib.sha256(f"{os.path.abspath(dataset_name) if os.path.exists(dataset_name) else dataset_name}".encode())
    cache_dir = cache_dir or os.environ.get("MNIST_DIFFUSION_CACHE") or os.path.expanduser("~/.cache/mnist-diffusion")
    path = os.path.join(cache_dir, f"features-{key.hexdigest()[:12]}-{split}-{weights_hash}.npy")
    if os.path.isfile(path):
        return np.load(path)
    images, _ = load_images(dataset_name, split=split)
    features = classify(load_classifier(), images)[0].numpy()
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path + ".tmp.npy", features)
    os.replace(path + ".tmp.npy", path)
    return features


MIN_SAMPLES = 4  # precision and recall need each digit's k = 3 nearest others
# The scores compare every pair of digits: time and memory grow with the square of this (10,000 is usual).
MAX_SAMPLES = 100_000


def evaluate_digits(
    digits: np.ndarray, real_features: np.ndarray, labels: np.ndarray | None = None, k: int = 3
) -> dict:
    """All metrics for uint8 digits `(N, 28, 28)` against real features; label accuracy if `labels` are given."""
    if len(digits) < MIN_SAMPLES:
        raise ValueError(f"Scoring needs at least {MIN_SAMPLES} digits, got {len(digits)}.")
    features, probs = (t.numpy() for t in classify(load_classifier(), torch.from_numpy(digits)))
    precision, recall = precision_recall(real_features, features, k)
    results = {
        "num_samples": len(digits),
        "fid": frechet_distance(features, real_features),
        "kid": kernel_inception_distance(features, real_features),
        "precision": precision,
        "recall": recall,
        **class_statistics(probs),
    }
    if labels is not None:
        right = probs.argmax(1) == labels
        results["label_accuracy"] = float(right.mean())
        results["label_accuracy_per_digit"] = [float(right[labels == d].mean()) for d in np.unique(labels)]
    return results


def evaluation_results(evaluation: dict) -> dict:
    """What a model card reports of one evaluation (an `eval.json` or a line of `eval.jsonl`)."""
    results = {k: round(evaluation[k], 3) for k in ("fid", "precision", "recall", "label_accuracy") if k in evaluation}
    results["eval_num_samples"] = evaluation["num_samples"]
    if "scheduler" in evaluation:
        results["eval_sampler"] = f"{evaluation['scheduler']}, {evaluation['steps']} steps"
        if evaluation.get("noise_scale", 1) != 1:
            results["eval_sampler"] += f", noise scale {evaluation['noise_scale']}"
    return results
