"""The README's Python examples run as written, on tiny models saved where the examples look."""

import os
import re

import pytest
import torch
from conftest import ROOT, TINY_UNET
from diffusers import LCMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline import MNISTDiffusionPipeline, create_model_and_scheduler


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, tiny_clip, monkeypatch):
    _, scheduler = create_model_and_scheduler()
    torch.manual_seed(0)
    folders = {
        "pretrained/ddpm-mnist": (UNet2DModel(**TINY_UNET), None, None),
        "pretrained/ddpm-mnist-cond": (UNet2DModel(**TINY_UNET, num_class_embeds=11), None, None),
        "pretrained/ddpm-mnist-text": (
            UNet2DConditionModel(
                **{**TINY_UNET, "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                   "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]},
                cross_attention_dim=32,
            ),
            CLIPTextModel.from_pretrained(tiny_clip),
            CLIPTokenizer.from_pretrained(tiny_clip),
        ),
    }  # fmt: skip
    for folder, (unet, text_encoder, tokenizer) in folders.items():
        pipe = MNISTDiffusionPipeline(unet, scheduler, text_encoder, tokenizer)
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(tmp_path / folder)
    # A distilled pipeline: its own few-step scheduler and step count.
    fast = MNISTDiffusionPipeline(
        UNet2DModel(**TINY_UNET), LCMScheduler.from_config(scheduler.config), default_num_inference_steps=2
    )
    fast.set_progress_bar_config(disable=True)
    fast.save_pretrained(tmp_path / "pretrained/ddpm-mnist-fast")
    monkeypatch.chdir(tmp_path)
    examples = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert len(examples) >= 3
    namespace = {}
    for code in examples:
        exec(compile(code, "README.md", "exec"), namespace)
    assert os.path.isfile("digit.png") and len(namespace["sevens"]) == 8
