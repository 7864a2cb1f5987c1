"""Shared fixtures and helpers: a tiny MNIST look-alike in the Hub's parquet layout, tiny models, training runs."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may wait on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # two workers on two cores: spinning OpenMP threads would fight each other
    os.environ["OMP_NUM_THREADS"] = "1"

import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import train_ddpm  # noqa: E402
import train_distill  # noqa: E402
from pipeline import MNISTDiffusionPipeline, create_model_and_scheduler  # noqa: E402
from pipeline.training import cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY_UNET = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": [8, 16, 16],
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
}


def draw_digits(n: int, seed: int, size: int = 28, mode: str = "L") -> tuple[list[Image.Image], list[int]]:
    """White-on-black digits drawn with a font at random offsets: MNIST-like enough for shape and pipeline tests."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=int(size * 0.8))
    images, labels = [], []
    for _ in range(n):
        label = int(rng.integers(10))
        image = Image.new("L", (size, size))
        center = (size / 2 + rng.integers(-2, 3), size / 2 + rng.integers(-2, 3))
        ImageDraw.Draw(image).text(center, str(label), fill=255, font=font, anchor="mm")
        images.append(image.convert(mode))
        labels.append(label)
    return images, labels


def write_hub_dataset(folder: Path, splits: dict[str, tuple[list, list]]) -> Path:
    """Write splits as `<split>-00000-of-00001.parquet` with the Hub MNIST schema (Image + ClassLabel)."""
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        rows = {"image": [], "label": labels}
        for image in images:
            if isinstance(image, bytes):
                rows["image"].append({"bytes": image, "path": None})
            else:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / f"{split}-00000-of-00001.parquet")
    return folder


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--screenshot PATH`: the browser test also saves the demo page there (images/app.png)."""
    parser.addoption("--screenshot", default=None, help="Where the browser test saves a screenshot of the demo.")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process run builds its Accelerator from scratch (before too: a module fixture may have trained)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def base_args(mnist_dir: Path, tiny_unet_config: Path, output_dir: Path, *extra: str) -> list[str]:
    """Flags for a seconds-long run on the tiny dataset and model."""
    return [
        "--dataset_name", str(mnist_dir),
        "--model_config_name_or_path", str(tiny_unet_config),
        "--output_dir", str(output_dir),
        "--train_batch_size", "16",
        "--eval_batch_size", "4",
        "--lr_warmup_steps", "2",
        "--stable_target_reference_size", "256",  # the default 16,384 costs 0.1 s a step on 128 digits
        *extra,
    ]  # fmt: skip


def train(*argv: str) -> None:
    """Run train_ddpm in this process, as `python train_ddpm.py ARGV` would."""
    train_ddpm.main(train_ddpm.parse_args(list(argv)))


def distill(*argv: str) -> None:
    """Run train_distill in this process, as `python train_distill.py ARGV` would."""
    train_distill.main(train_distill.parse_args(list(argv)))


def train_in_processes(*argv: str, num_processes: int = 2, script: str = "train_ddpm.py") -> None:
    """Run `script ARGV` in `num_processes` CPU processes on this machine (torch.distributed.run)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [*command, str(ROOT / script), *argv], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict."""
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    """Two safetensors files hold the same tensors (CPU, tolerance 1e-5)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0, msg=key)


def cli_error(capsys, *argv: str, script=train_ddpm) -> str:
    """Run a training script's command line (train_ddpm's by default), expect it to fail, and return its one-line
    error."""
    with pytest.raises(SystemExit) as exit_info:
        cli(script.main, script.parse_args(list(argv)), f"{script.__name__}.py")
    AcceleratorState._reset_state(reset_partial_state=True)
    message = str(exit_info.value.code) if exit_info.value.code not in (None, 2) else capsys.readouterr().err
    assert "Traceback" not in message
    return message


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """128 train and 32 test digits in the layout of `ylecun/mnist`."""
    folder = tmp_path_factory.mktemp("mnist")
    return write_hub_dataset(folder, {"train": draw_digits(128, seed=0), "test": draw_digits(32, seed=1)})


@pytest.fixture(scope="session")
def real_mnist_dir(tmp_path_factory) -> Path:
    """The first 128 real test digits of `data/mnist_test_500.npz`, as a train split in the layout of `ylecun/mnist`."""
    data = np.load(Path(__file__).parent / "data" / "mnist_test_500.npz")
    images = [Image.fromarray(x) for x in data["images"][:128]]
    return write_hub_dataset(tmp_path_factory.mktemp("real_mnist"), {"train": (images, data["labels"][:128].tolist())})


@pytest.fixture(scope="session")
def tiny_unet_config(tmp_path_factory) -> Path:
    """A folder holding a ~60k-parameter UNet2DModel config for fast training tests."""
    folder = tmp_path_factory.mktemp("tiny_unet")
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **TINY_UNET}))
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A folder holding a tiny random CLIP text model and a character-level CLIP tokenizer (no download)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    # transformers 5 takes the vocabulary and merges themselves (vocab_file= would be silently ignored).
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24).save_pretrained(folder)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text_unet_config(tmp_path_factory) -> Path:
    """A tiny UNet2DConditionModel config (cross-attention at 7x7, as the default); the width of the text comes later."""
    folder = tmp_path_factory.mktemp("tiny_text_unet")
    config = {
        **TINY_UNET,
        "_class_name": "UNet2DConditionModel",
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def tiny_pipeline() -> MNISTDiffusionPipeline:
    """An untrained tiny pipeline with fixed weights, progress bar off."""
    torch.manual_seed(0)
    _, scheduler = create_model_and_scheduler()
    pipe = MNISTDiffusionPipeline(unet=UNet2DModel(**TINY_UNET), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_python(code: str, cwd: Path, block_package: bool = False) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter; with `block_package`, `import pipeline` fails there as if not installed."""
    prelude = "import sys; sys.modules['pipeline'] = None\n" if block_package else ""
    result = subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
