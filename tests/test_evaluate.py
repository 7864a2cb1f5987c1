"""The classifier and the evaluator's arithmetic, on known cases and on real test digits."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.classifier import classify, load_classifier
from pipeline.cli import main
from pipeline.evaluate import (
    MAX_ENTROPY,
    class_statistics,
    evaluate_digits,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)

DATA = np.load(Path(__file__).parent / "data" / "mnist_test_500.npz")
DIGITS, LABELS = DATA["images"], DATA["labels"].astype(np.int64)


@pytest.fixture(scope="module")
def real_features() -> np.ndarray:
    """Classifier features of the 500 real test digits."""
    return classify(load_classifier(), torch.from_numpy(DIGITS))[0].numpy()


def test_shipped_classifier_reads_real_digits():
    features, probs = classify(load_classifier(), torch.from_numpy(DIGITS))
    assert features.shape == (500, 128) and probs.shape == (500, 10)
    assert (probs.argmax(1).numpy() == LABELS).mean() >= 0.99


def test_frechet_distance_known_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5000, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    # Same covariance, mean shifted by 2 along every axis: FID = |delta mu|^2 = 8 * 4.
    assert frechet_distance(a, a + 2) == pytest.approx(32, rel=1e-6)
    # Scaled by 3: |3 mu - mu|^2 + tr(S + 9S - 2 * 3S) = 4 |mu|^2 + 4 tr(S).
    expected = 4 * (a.mean(0) ** 2).sum() + 4 * np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 3 * a) == pytest.approx(expected, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 16))
    assert abs(kernel_inception_distance(a, b, subsets=20, subset_size=500)) < 0.01
    assert kernel_inception_distance(a, b + 1, subsets=20, subset_size=500) > 0.5


def test_precision_and_recall(real_features):
    assert precision_recall(real_features, real_features) == (1.0, 1.0)
    # Samples far from every real digit are neither precise nor do they recall anything.
    far = real_features + 1000
    assert precision_recall(real_features, far) == (0.0, 0.0)


@pytest.mark.slow
def test_only_zeros_to_fours_have_low_entropy_and_recall(real_features):
    full = evaluate_digits(DIGITS, real_features)
    assert full["class_entropy"] > 2.25 and full["fid"] < 1e-6 and full["confidence"] > 0.9
    low = evaluate_digits(DIGITS[LABELS < 5], real_features)
    assert low["class_entropy"] == pytest.approx(np.log(5), abs=0.05) and np.log(5) < MAX_ENTROPY - 0.6
    assert sum(low["class_histogram"][5:]) < 0.02
    assert low["recall"] < full["recall"] - 0.2 and low["fid"] > 10
    with_labels = evaluate_digits(DIGITS, real_features, labels=LABELS)
    assert with_labels["label_accuracy"] >= 0.99 and min(with_labels["label_accuracy_per_digit"]) >= 0.9
    shuffled = evaluate_digits(DIGITS, real_features, labels=np.roll(LABELS, 1))
    assert shuffled["label_accuracy"] < 0.3


def test_class_statistics():
    probs = np.eye(10)[[0, 0, 1, 1]] * 0.9 + 0.01
    stats = class_statistics(probs)
    assert stats["class_histogram"][:2] == [0.5, 0.5] and stats["class_entropy"] == pytest.approx(np.log(2))
    assert stats["confidence"] == pytest.approx(0.91)


def test_evaluate_command_end_to_end(tiny_pipeline, mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MNIST_DIFFUSION_CACHE", str(tmp_path / "cache"))
    tiny_pipeline.save_pretrained(tmp_path / "model")
    out = tmp_path / "results.json"
    main(["evaluate", "--model", str(tmp_path / "model"), "--num_samples", "20", "--num_inference_steps", "5"]
         + ["--dataset_name", str(mnist_dir), "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    assert results["num_samples"] == 20 and len(results["class_histogram"]) == 10
    assert {"fid", "kid", "precision", "recall", "confidence", "class_entropy"} <= set(results)
    assert "fid" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the real features were cached
    # Digits made elsewhere, from an .npy file.
    np.save(tmp_path / "digits.npy", DIGITS[:50])
    main(["evaluate", "--samples", str(tmp_path / "digits.npy"), "--dataset_name", str(mnist_dir)])
    assert "num_samples" in capsys.readouterr().out


def test_evaluate_needs_exactly_one_source(tmp_path):
    with pytest.raises(SystemExit, match="exactly one of --model"):
        main(["evaluate", "--dataset_name", str(tmp_path)])


def test_digit_files_in_any_range_or_layout_score_the_same_and_bad_files_are_one_line(tmp_path, monkeypatch):
    from pipeline.cli import read_digits

    digits = DATA["images"][:8]
    for name, array in {
        "uint8.npy": digits,
        "unit.npy": digits.astype(np.float32) / 255,  # the pipeline's "np" output
        "bytes_as_float.npy": digits.astype(np.float32),  # [0, 255] floats: not to be clipped to black and white
        "ints.npy": digits.astype(np.int64),
        "nhwc.npy": digits[..., None],
        "nchw.npy": digits[:, None],
    }.items():
        np.save(tmp_path / name, array)
        np.testing.assert_array_equal(read_digits(str(tmp_path / name)), digits, err_msg=name)
    np.save(tmp_path / "one.npy", digits[0])
    assert read_digits(str(tmp_path / "one.npy")).shape == (1, 28, 28)
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "other.npz", pixels=digits)
    np.save(tmp_path / "negative.npy", -digits.astype(np.float32))
    np.save(tmp_path / "none.npy", np.zeros((0, 28, 28), np.uint8))
    cases = {
        "empty.npy": "not a readable .npy file",
        "other.npz": "not the key 'images'",
        "negative.npy": "must lie in [0, 1] or [0, 255]",
        "one.npy": "needs at least 4 digits, got 1",
        "none.npy": "needs at least 4 digits, got 0",
    }
    monkeypatch.setenv("MNIST_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("pipeline.evaluate.reference_features", lambda *a: np.zeros((10, 128)))
    for name, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--samples", str(tmp_path / name)])
        assert message in str(exit_info.value.code) and "Traceback" not in str(exit_info.value.code), name
