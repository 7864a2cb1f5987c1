"""Load an image dataset once into a uint8 tensor: the whole of MNIST is 47 MB, so no per-item pipeline is needed."""

import io
import os

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels")


def looks_like_path(name: str) -> bool:
    """Whether a dataset or model name is meant as a local folder: Hub ids are "name" or "owner/name"."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _find_column(features: datasets.Features, feature_type: type, names: tuple[str, ...]) -> str | None:
    """The first column of the given feature type, else the first column with a conventional name."""
    for name, feature in features.items():
        if isinstance(feature, feature_type):
            return name
    return next((name for name in names if name in features), None)


def _open_dataset(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    split: str,
    cache_dir: str | None,
) -> datasets.Dataset:
    """`load_dataset` from the Hub, a local copy or an image folder, with errors that say what to do."""
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir!r} is not a folder.")
        name, args = train_data_dir, ("imagefolder",)
        kwargs = {"data_dir": train_data_dir}
    else:
        if looks_like_path(dataset_name) and not os.path.exists(dataset_name):
            raise FileNotFoundError(f"--dataset_name {dataset_name!r}: no such folder.")
        name, args, kwargs = dataset_name, (dataset_name, dataset_config_name), {}
    try:
        dataset = datasets.load_dataset(*args, cache_dir=cache_dir, **kwargs)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise FileNotFoundError(
            f"Could not load dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0]}). Check the name, or "
            "without network access point --dataset_name at a local copy in the Hub's layout."
        ) from e
    except ValueError as e:  # e.g. 'Instruction "train" corresponds to no data!' for an empty dataset
        raise ValueError(f"Could not load dataset {name!r}: {e}") from e
    if split not in dataset:
        raise ValueError(f"Dataset {name!r} has no split {split!r}; it has {sorted(dataset)}.")
    return dataset[split]


def load_images(
    dataset_name: str | None = "ylecun/mnist",
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_train_samples: int | None = None,
    indices: list[int] | None = None,
    resolution: int | None = None,
    size: int = 28,
    num_proc: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode a dataset split (its first `max_train_samples` rows, or the rows at `indices`) into `(N, 1, size, size)`
    uint8 images and `(N,)` int64 labels (or None).

    Images must already be 1-channel `size` x `size`; with `resolution` set, any other image is converted to grayscale,
    resized and center-cropped to `resolution` (which must then equal `size`) instead of rejected.
    """
    dataset = _open_dataset(dataset_name, dataset_config_name, train_data_dir, split, cache_dir)
    name = train_data_dir or dataset_name
    image_column = image_column or _find_column(dataset.features, datasets.Image, IMAGE_COLUMN_NAMES)
    if not isinstance(dataset.features.get(image_column), datasets.Image):
        raise ValueError(
            f"Dataset {name!r} has no image column{f' {image_column!r}' if image_column else ''}; its columns are "
            f"{dict(dataset.features)}. Name it with --image_column."
        )
    named_label_column = label_column is not None
    if label_column is None:
        label_column = _find_column(dataset.features, datasets.ClassLabel, LABEL_COLUMN_NAMES)
    elif label_column not in dataset.features:
        raise ValueError(f"Dataset {name!r} has no column {label_column!r}; its columns are {list(dataset.features)}.")
    if max_train_samples is not None:
        dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    if indices is not None:
        outside = [i for i in indices if not 0 <= i < len(dataset)]
        if outside:
            raise ValueError(
                f"Index {outside[0]} is outside split {split!r} of {name!r}, which has {len(dataset)} rows "
                f"(0 to {len(dataset) - 1})."
            )
        dataset = dataset.select(indices)
    if resolution is not None and resolution != size:
        raise ValueError(f"--resolution {resolution} differs from the model's sample_size {size}.")

    def decode(batch: dict, indices: list[int]) -> dict:
        pixels = []
        for index, item in zip(indices, batch[image_column], strict=True):
            try:
                image = Image.open(io.BytesIO(item["bytes"]) if item["bytes"] else item["path"])
                image.load()
            except (UnidentifiedImageError, OSError, TypeError) as e:
                raise ValueError(f"Row {index} of {name!r} ({image_column!r}) is not a decodable image: {e}") from e
            if image.mode != "L" or image.size != (size, size):
                if resolution is None:
                    raise ValueError(
                        f"Row {index} of {name!r} is a {image.width}x{image.height} {image.mode} image; the model takes "
                        f"1-channel {size}x{size} images. Pass --resolution {size} to convert and resize them."
                    )
                image = ImageOps.fit(image.convert("L"), (size, size), Image.BILINEAR)
            pixels.append(np.asarray(image, dtype=np.uint8))
        return {"pixels": pixels}

    # Decode ourselves, so that a broken row is reported by its index instead of failing deep inside datasets.
    features = {"pixels": datasets.Array2D((size, size), "uint8")}
    if label_column:
        features[label_column] = dataset.features[label_column]
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False)).map(
        decode,
        batched=True,
        with_indices=True,
        num_proc=num_proc or None,
        remove_columns=[c for c in dataset.column_names if c != label_column],
        features=datasets.Features(features),
        desc="Decoding images",
    )
    # datasets' numpy formatter widens integers to int64 unless told the dtype: 8x the memory.
    images = torch.from_numpy(dataset.with_format("numpy", dtype=np.uint8)["pixels"][:]).unsqueeze(1).contiguous()
    labels = None
    if label_column:
        values = dataset.with_format("numpy")[label_column][:]
        if values.dtype.kind in "iu":  # strings, floats or missing values are no class labels
            labels = torch.from_numpy(values.astype(np.int64))
        elif named_label_column:
            raise ValueError(
                f"Column {label_column!r} of {name!r} holds {values.dtype} values; class labels must be integers."
            )
    return images, labels
