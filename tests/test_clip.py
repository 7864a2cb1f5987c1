"""The CLIP trained here: what its captions say, its tokenizer, and the folder train_clip.py writes."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_weights, draw_digits
from PIL import Image
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPTokenizerFast

import train_clip
from pipeline import MNISTDiffusionPipeline
from pipeline.captions import (
    ATTRIBUTES,
    EXAMPLE_PROMPT,
    NUMBER_WORDS,
    attribute_levels,
    attribute_thresholds,
    caption,
    measure,
    named_attributes,
)
from pipeline.clip import image_embeddings, text_embeddings, train_tokenizer, zero_shot_accuracy
from pipeline.model import load_text_encoder

PHRASINGS = ("a handwritten {}", "a thin {}", "a bold {}", "a left-slanted {}", "a right-slanted {}", "a small {}",
             "a large {}")  # fmt: skip


def digits_as_array(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Font digits `(N, 1, 28, 28)` uint8 and their labels."""
    images, labels = draw_digits(n, seed)
    return np.stack([np.asarray(image) for image in images])[:, None], np.array(labels)


def test_measurements_follow_how_a_digit_is_drawn():
    images, _ = digits_as_array(8, seed=0)
    x = torch.from_numpy(images).float()
    bolder = F.max_pool2d(x, 3, stride=1, padding=1)  # every stroke a pixel wider on each side
    # Shear: each row moves right in proportion to its height above the centre, as a right-leaning hand writes.
    theta = torch.tensor([[1.0, 0.4, 0.0], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)
    leaning = F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    smaller = F.pad(F.interpolate(x, size=14, mode="bilinear"), (7, 7, 7, 7))
    before = measure(images)
    assert (measure(bolder)["thickness"] > before["thickness"]).all()
    assert (measure(leaning)["slant"] > before["slant"] + 0.2).all()
    assert (measure(smaller)["size"] < before["size"]).all()


def test_captions_name_the_digit_and_a_random_subset_of_its_attributes():
    rng = np.random.default_rng(0)
    levels = {"thickness": 0, "slant": 2, "size": 2}  # thin, right-slanted, large
    texts = [caption(7, levels, rng) for _ in range(400)]
    assert all("seven" in t or "7" in t for t in texts)
    for word in ("thin", "right-slanted", "large"):
        assert 0.2 < np.mean([word in t for t in texts]) < 0.8, word
    assert not any(word in t for t in texts for word in ("bold", "regular", "left-slanted", "upright", "small"))
    assert {"a handwritten seven", "a seven", "a thin seven", "the number 7"} <= set(texts)
    assert "an eight" in {caption(8, {"thickness": 1, "slant": 1, "size": 1}, rng) for _ in range(100)}
    assert "a small seven" in {caption(7, {"size": 0}, rng) for _ in range(100)}  # the middle size goes unsaid
    # What a caption says can be read back (stable targets match reference digits by it): a subset of the levels.
    said = [named_attributes(t) for t in texts]
    assert all(s.items() <= levels.items() for s in said) and {"thickness": 0, "slant": 2, "size": 2} in said
    assert named_attributes("the digit 3, regular, upright and small") == {"thickness": 1, "slant": 1, "size": 0}


def test_attribute_words_split_each_digit_in_thirds():
    rng = np.random.default_rng(0)
    labels = rng.integers(10, size=3000)
    measured = {name: rng.normal(labels, 1.0) for name in ATTRIBUTES}  # each digit measured in its own range
    levels = attribute_levels(measured, labels, attribute_thresholds(measured, labels))
    for name in ATTRIBUTES:
        for digit in np.unique(labels):
            shares = np.bincount(levels[name][labels == digit], minlength=3) / (labels == digit).sum()
            assert np.abs(shares - 1 / 3).max() < 0.15, (name, digit, shares)


def test_the_tokenizer_learns_each_caption_word_as_one_token(tmp_path):
    tokenizer = train_tokenizer(train_clip.caption_corpus(seed=0, size=2000))
    tokenizer.save_pretrained(tmp_path)
    for cls in (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path)
        for phrasing in PHRASINGS:
            text = phrasing.format("seven")
            tokens = loaded.convert_ids_to_tokens(loaded(text).input_ids)
            words = text.replace("-", " - ").split()
            assert tokens == ["<|startoftext|>", *(w + "</w>" for w in words), "<|endoftext|>"], tokens


def test_train_clip_writes_a_clip_folder_that_transformers_loads_and_resumes_exactly(mnist_dir, tmp_path, monkeypatch):
    uploads = []

    class Repo:
        repo_id = "someone/mnist-clip"

    monkeypatch.setattr("pipeline.training.create_repo", lambda repo_id, **kwargs: Repo())
    monkeypatch.setattr(
        train_clip,
        "upload_folder",
        lambda repo_id, folder_path, **kwargs: uploads.append(sorted(os.listdir(folder_path))),
    )

    def run(out, *extra):
        argv = ["--dataset_name", str(mnist_dir), "--output_dir", str(out), "--width", "16", "--layers", "1",
                "--train_batch_size", "16", "--lr_warmup_steps", "1", "--checkpointing_steps", "2", *extra]  # fmt: skip
        train_clip.main(train_clip.parse_args(argv))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, "--max_train_steps", "4", "--push_to_hub")
    assert uploads == [["attributes.json", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                        "tokenizer_config.json"]]  # fmt: skip
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")  # as if killed after step 2
    run(resumed, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_same_weights(straight / "model.safetensors", resumed / "model.safetensors")

    model = CLIPModel.from_pretrained(straight)
    processor = CLIPProcessor.from_pretrained(straight)
    digit = Image.fromarray(digits_as_array(1, seed=2)[0][0, 0])
    inputs = processor(images=digit, text=["a thin seven", "a bold seven"], padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 1, 28, 28)
    assert inputs["pixel_values"].min() >= -1 and inputs["pixel_values"].max() <= 1
    assert model(**inputs).logits_per_image.shape == (1, 2)
    thresholds = json.loads((straight / "attributes.json").read_text())["terciles_per_digit"]
    assert set(thresholds) == set(ATTRIBUTES) and all(len(per_digit) == 10 for per_digit in thresholds.values())
    record = json.loads((straight / "eval.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 4 and 0 <= record["zero_shot_accuracy"] <= 1
    # Its text tower is what text-conditional training takes.
    text_encoder, tokenizer = load_text_encoder(str(straight))
    assert all(
        torch.equal(value, model.text_model.state_dict()[key]) for key, value in text_encoder.state_dict().items()
    )
    assert tokenizer("a large seven").input_ids == processor.tokenizer("a large seven").input_ids


def test_the_shipped_clip_loads_as_any_clip_and_reads_real_digits():
    folder = Path(__file__).parents[1] / "pretrained" / "mnist-clip"
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    for phrasing in PHRASINGS:  # each word of the phrasings one token of its vocabulary
        ids = processor.tokenizer(phrasing.format("seven")).input_ids
        assert (
            len(ids) == len(phrasing.replace("-", " - ").split()) + 2
            and processor.tokenizer.unk_token_id not in ids[1:-1]
        )
    real = np.load(Path(__file__).parent / "data" / "mnist_test_500.npz")
    images, labels = torch.from_numpy(real["images"][:200, None]), real["labels"][:200]
    assert zero_shot_accuracy(model, processor.tokenizer, images, labels) >= 0.95
    digit = Image.fromarray(real["images"][0])
    inputs = processor(
        images=digit, text=[EXAMPLE_PROMPT.format(w) for w in NUMBER_WORDS], padding=True, return_tensors="pt"
    )
    assert model(**inputs).logits_per_image.argmax().item() == labels[0]


@pytest.mark.slow
def test_clip_guidance_draws_an_unconditional_model_toward_the_prompt(tiny_pipeline):
    root = Path(__file__).parents[1] / "pretrained"
    pipe = MNISTDiffusionPipeline.from_pretrained(root / "ddpm-mnist")
    pipe.set_progress_bar_config(disable=True)
    clip = CLIPModel.from_pretrained(root / "mnist-clip").eval()
    tokenizer = CLIPTokenizer.from_pretrained(root / "mnist-clip")
    prompts = [EXAMPLE_PROMPT.format(NUMBER_WORDS[d]) for d in range(10)]

    def similarity(scale):
        digits = pipe(
            prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(10)], num_inference_steps=8,
            clip_model=clip, clip_tokenizer=tokenizer, clip_guidance_scale=scale, output_type="pt",
        ).images  # fmt: skip
        images = image_embeddings(clip, digits * 2 - 1)
        return float((images * text_embeddings(clip, tokenizer, prompts)).sum(1).mean())

    unguided = pipe(batch_size=10, generator=[torch.Generator().manual_seed(i) for i in range(10)],
                    num_inference_steps=8, output_type="pt").images  # fmt: skip
    assert torch.equal(unguided, pipe(prompt=prompts, generator=[torch.Generator().manual_seed(i) for i in range(10)],
                       num_inference_steps=8, clip_model=clip, clip_tokenizer=tokenizer, output_type="pt").images)  # fmt: skip
    assert similarity(500.0) > similarity(0.0) + 0.1
    for kwargs, message in (
        ({"clip_guidance_scale": -1.0}, "0 or more"),
        ({"clip_guidance_scale": float("nan")}, "0 or more"),
        ({"clip_tokenizer": None}, "clip_tokenizer"),
        ({"prompt": None, "batch_size": 1}, "takes a `prompt`"),
    ):
        with pytest.raises(ValueError, match=message):
            pipe(**{"prompt": "a seven", "clip_model": clip, "clip_tokenizer": tokenizer, **kwargs})
    with pytest.raises(ValueError, match="needs a model with a text encoder"):  # a prompt without a CLIP
        tiny_pipeline(prompt="a seven")


def test_sample_guides_any_model_by_a_clip_from_the_command_line(tiny_pipeline, tmp_path, capsys):
    from pipeline.cli import main

    tiny_pipeline.save_pretrained(tmp_path / "model")
    clip = str(Path(__file__).parents[1] / "pretrained" / "mnist-clip")
    common = ["sample", "--model", str(tmp_path / "model"), "--num_images", "2", "--num_inference_steps", "3",
              "--precision", "fp32"]  # fmt: skip
    grids = {}
    for scale in ("0", "500"):
        grids[scale] = tmp_path / f"guided{scale}.png"
        main([*common, "--prompt", "a bold seven", "--clip_model", clip, "--clip_guidance_scale", scale,
              "--out", str(grids[scale])])  # fmt: skip
    assert grids["0"].read_bytes() != grids["500"].read_bytes()
    for extra, message in (
        (["--clip_model", clip], "--clip_model guides the digits toward --prompt"),
        (["--prompt", "a seven", "--clip_model", str(tmp_path / "nope")], "no such folder"),
        (["--prompt", "a seven"], "needs a model with a text encoder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *extra, "--out", str(tmp_path / "x.png")])
        assert message in str(exit_info.value.code)


@pytest.mark.slow
def test_text_benchmark_prompts_a_model_and_scores_attribute_control(tiny_pipeline, mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import text

    tiny_pipeline.save_pretrained(tmp_path / "model")
    argv = ["text.py", "--model", str(tmp_path / "model"), "--clip", str(Path(__file__).parents[1] / "pretrained" /
            "mnist-clip"), "--dataset_name", str(mnist_dir), "--clip_guidance_scales", "0", "300", "--num_samples",
            "10", "--attribute_pairs", "1", "--num_inference_steps", "2", "--out", str(tmp_path / "t.json")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    text.main()
    rows = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [row["clip_guidance_scale"] for row in rows] == [0, 300]
    for row in rows:
        assert len(row["label_accuracy_per_digit"]) == 10 and row["fid"] > 0 and row["seconds_per_digit"] > 0
        assert set(row["attribute_control"]) == set(ATTRIBUTES)
        assert all(0 <= v <= 1 for scores in row["attribute_control"].values() for v in scores.values())
    assert (
        rows[0]["label_accuracy_per_digit"] != rows[1]["label_accuracy_per_digit"] or rows[0]["fid"] != rows[1]["fid"]
    )
    assert Image.open(tmp_path / "t.png").size == (2 * (10 * 30 + 2), 2 * (7 * 30 + 2))  # 10 digits by 7 phrasings
