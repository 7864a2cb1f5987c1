"""Loading datasets into uint8 tensors, and the errors bad datasets get."""

import datasets
import numpy as np
import pytest
import torch
from conftest import draw_digits, write_hub_dataset

from pipeline.data import load_images


def test_hub_layout_folder_loads_as_uint8_with_labels(mnist_dir):
    images, labels = load_images(str(mnist_dir))
    assert images.shape == (128, 1, 28, 28) and images.dtype == torch.uint8
    expected_images, expected_labels = draw_digits(128, seed=0)
    np.testing.assert_array_equal(images[5, 0].numpy(), np.asarray(expected_images[5]))
    assert labels.tolist() == expected_labels
    test_images, _ = load_images(str(mnist_dir), split="test", max_train_samples=10)
    assert test_images.shape == (10, 1, 28, 28)


def test_image_folder(tmp_path):
    images, _ = draw_digits(5, seed=2)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    loaded, labels = load_images(train_data_dir=str(tmp_path))
    assert loaded.shape == (5, 1, 28, 28) and labels is None


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_images(str(tmp_path / "nope" / "mnist"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_images(train_data_dir=str(tmp_path / "nope"))


def test_unreachable_hub_dataset_says_how_to_work_offline():
    with pytest.raises(FileNotFoundError, match="local copy"):
        load_images("someone-who-does-not-exist/no-such-dataset")


def test_unknown_split_lists_the_splits(mnist_dir):
    with pytest.raises(ValueError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        load_images(str(mnist_dir), split="validation")


def test_missing_image_column_names_the_columns(mnist_dir):
    with pytest.raises(ValueError, match="no image column 'pixels'.*--image_column"):
        load_images(str(mnist_dir), image_column="pixels")


def test_rgb_or_wrong_size_needs_resolution(tmp_path):
    rgb = write_hub_dataset(tmp_path / "rgb", {"train": draw_digits(4, seed=0, mode="RGB")})
    with pytest.raises(ValueError, match=r"Row 0 .* 28x28 RGB image.*--resolution 28"):
        load_images(str(rgb))
    images, _ = load_images(str(rgb), resolution=28)
    assert images.shape == (4, 1, 28, 28) and images.max() == 255

    big = write_hub_dataset(tmp_path / "big", {"train": draw_digits(4, seed=0, size=32)})
    with pytest.raises(ValueError, match=r"32x32 L image.*--resolution 28"):
        load_images(str(big))
    assert load_images(str(big), resolution=28)[0].shape == (4, 1, 28, 28)
    with pytest.raises(ValueError, match="differs from the model's sample_size"):
        load_images(str(big), resolution=32)


def test_undecodable_row_is_named(tmp_path):
    images, labels = draw_digits(3, seed=0)
    broken = write_hub_dataset(tmp_path / "broken", {"train": ([images[0], b"not a png", images[2]], labels)})
    with pytest.raises(ValueError, match="Row 1 of .* not a decodable image"):
        load_images(str(broken))


def test_empty_dataset(tmp_path):
    empty = write_hub_dataset(tmp_path / "empty", {"train": ([], [])})
    with pytest.raises(ValueError, match="Could not load dataset .*empty.*no data"):
        load_images(str(empty))
    half_empty = write_hub_dataset(tmp_path / "half", {"train": draw_digits(2, seed=0), "test": ([], [])})
    with pytest.raises(ValueError, match='"test" corresponds to no data'):
        load_images(str(half_empty), split="test")


def test_labels_that_are_not_integers_are_no_labels(tmp_path):
    images, _ = draw_digits(4, seed=0)
    for name, labels in {
        "strings": ["7", "1", "2", "3"],
        "floats": [7.0, 1.5, 2.0, 3.0],
        "missing": [7, None, 2, 3],
    }.items():
        datasets.Dataset.from_dict({"image": images, "label": labels}).to_parquet(tmp_path / name / "train-0.parquet")
        pixels, found = load_images(str(tmp_path / name))  # unconditional training needs no labels
        assert pixels.shape == (4, 1, 28, 28) and found is None, name
        with pytest.raises(ValueError, match="class labels must be integers"):
            load_images(str(tmp_path / name), label_column="label")
