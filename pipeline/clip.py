"""A CLIP for handwritten digits: transformers' `CLIPModel` sized for 28x28 digits and short captions, a tokenizer
trained on the captions, and the image-text scores that classify digits and guide sampling toward a prompt."""

import json
import os
from collections.abc import Iterable

import numpy as np
import torch
from tokenizers import pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from .captions import EXAMPLE_PROMPT, NUMBER_WORDS, save_thresholds
from .data import looks_like_path
from .pipeline_mnist_diffusion import clip_features

MAX_LENGTH = 24  # tokens, with the start and end tokens: the longest caption has 14
CLIP_GUIDANCE_SCALE = 300.0  # pretrained/mnist-clip guiding pretrained/ddpm-mnist in 50 steps: docs/text.md


def train_tokenizer(corpus: Iterable[str]) -> CLIPTokenizer:
    """A CLIP tokenizer (CLIP's normalisation, pre-tokenisation and byte-level BPE) whose merges are learnt from
    `corpus` with `tokenizers`: every word of the captions is one token."""
    tokenizer = CLIPTokenizer(model_max_length=MAX_LENGTH)
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # an upper bound: training stops once every word of the corpus is one token
        special_tokens=[tokenizer.bos_token, tokenizer.eos_token],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.backend_tokenizer.train_from_iterator(corpus, trainer)
    # The trainer learns the same merges every time but numbers the tokens in a different order in each process:
    # number them in one order (special tokens, the alphabet sorted, then the merges), so that every process of a
    # run, and a resumed run, has the same tokenizer.
    learnt = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split() if isinstance(m, str) else m) for m in learnt["merges"]]
    merged = [a + b for a, b in merges]
    specials = [tokenizer.bos_token, tokenizer.eos_token]
    alphabet = sorted(set(learnt["vocab"]) - set(merged) - set(specials))
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *alphabet, *merged]))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def image_processor() -> CLIPImageProcessor:
    """28x28 grayscale digits as they are, scaled to [-1, 1] like the diffusion model's samples."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"height": 28, "width": 28},
        crop_size={"height": 28, "width": 28},
        do_center_crop=False,
        do_convert_rgb=False,
        image_mean=[0.5],
        image_std=[0.5],
    )


def create_clip(tokenizer: CLIPTokenizer, width: int = 128, layers: int = 3) -> CLIPModel:
    """A fresh CLIP: a ViT over 7x7 patches of the digit (16 tokens) and a text transformer over the captions."""
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": 28,
        "patch_size": 7,
        "num_channels": 1,
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
    }
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))


def processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    """What prepares digits and captions for the model, as `CLIPProcessor.from_pretrained` loads it."""
    return CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer)


@torch.no_grad()
def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Unit-length text embeddings of `prompts`."""
    tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(model.device)
    return clip_features(model.get_text_features(**tokens))


def image_embeddings(model: CLIPModel, digits: torch.Tensor) -> torch.Tensor:
    """Unit-length image embeddings of digits `(N, 1, 28, 28)` in [-1, 1] (differentiable, for guidance)."""
    return clip_features(model.get_image_features(pixel_values=digits))


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, labels: np.ndarray) -> float:
    """How often "a handwritten {word}" of the right digit is the closest of the ten prompts, on uint8 images
    `(N, 1, 28, 28)`."""
    text = text_embeddings(model, tokenizer, [EXAMPLE_PROMPT.format(word) for word in NUMBER_WORDS])
    predictions = [
        (image_embeddings(model, chunk.to(model.device).float() / 127.5 - 1) @ text.T).argmax(1).cpu()
        for chunk in images.split(1024)
    ]
    return float((torch.cat(predictions).numpy() == labels).mean())


def save_clip(model: CLIPModel, tokenizer: CLIPTokenizer, thresholds: dict, folder: str | os.PathLike) -> None:
    """The Hub-style CLIP folder: weights and config, the processor (image processor and tokenizer), and the
    attribute thresholds its captions were written with."""
    model.save_pretrained(folder)
    processor(tokenizer).save_pretrained(folder)
    save_thresholds(thresholds, folder)


def load_clip(name_or_path: str, flag: str = "--clip_model") -> tuple[CLIPModel, CLIPTokenizer]:
    """A CLIP and its tokenizer (a folder or Hub id) to guide sampling, in eval mode; bad input is one line."""
    if looks_like_path(name_or_path) and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"{flag} {name_or_path}: no such folder.")
    try:
        model, tokenizer = CLIPModel.from_pretrained(name_or_path), CLIPTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise ValueError(f"{flag} {name_or_path}: not a CLIP folder or Hub id ({str(e).splitlines()[0]}).") from e
    return model.eval().to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer
