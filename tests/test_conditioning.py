"""Class- and text-conditional models: training, classifier-free guidance, saving and loading, bad input."""

import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import base_args, run_python, train

from pipeline import MNISTDiffusionPipeline

STEPS = ("--max_train_steps", "4", "--save_images_epochs", "100")


@pytest.fixture(scope="module")
def class_model(mnist_dir, tiny_unet_config, tmp_path_factory):
    """A class-conditional pipeline folder trained for a few steps."""
    out = tmp_path_factory.mktemp("class_model")
    train(*base_args(mnist_dir, tiny_unet_config, out, *STEPS, "--conditioning", "class"))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def test_class_labels_steer_sampling_with_guidance(class_model):
    pipe = MNISTDiffusionPipeline.from_pretrained(class_model)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.conditioning == "class" and pipe.unet.config.num_class_embeds == 11

    def sample(**kwargs):
        return pipe(generator=torch.manual_seed(0), num_inference_steps=4, output_type="pt", **kwargs).images

    sevens, guided, unconditional = (
        sample(class_labels=[7, 7], guidance_scale=1),
        sample(class_labels=7, batch_size=2),
        sample(batch_size=2),
    )
    assert sevens.shape == guided.shape == unconditional.shape == (2, 1, 28, 28)
    assert not torch.allclose(sevens, unconditional)  # the label reaches the UNet
    assert not torch.allclose(sevens, guided)  # guidance moves away from the unconditional prediction
    # Guidance extrapolates along (conditional - unconditional): the guided predictions for w = 1, 2, 3 are equally spaced.
    predictions = []

    def keep_prediction(pipe, i, t, tensors):
        predictions.append(tensors["model_output"])

    for w in (1, 2, 3):
        pipe(class_labels=[3], guidance_scale=w, generator=torch.manual_seed(0), num_inference_steps=1,
             callback_on_step_end=keep_prediction, callback_on_step_end_tensor_inputs=["model_output"])  # fmt: skip
    torch.testing.assert_close(predictions[2] - predictions[1], predictions[1] - predictions[0], atol=1e-5, rtol=0)
    assert (predictions[1] - predictions[0]).abs().max() > 1e-3


@pytest.mark.slow
def test_class_conditional_folder_loads_in_a_fresh_process_without_the_package(class_model):
    result = run_python(
        "import torch\nfrom diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(class_model)!r}, trust_remote_code=True)\n"
        "images = pipe(class_labels=[0, 9], num_inference_steps=2, output_type='np').images\n"
        "print(type(pipe).__name__, pipe.conditioning, images.shape)",
        cwd=class_model,
        block_package=True,
    )
    assert "MNISTDiffusionPipeline class (2, 28, 28, 1)" in result.stdout


@pytest.mark.slow
def test_text_conditional_trains_saves_reloads_and_generates(mnist_dir, tiny_text_unet_config, tiny_clip, tmp_path):
    out = tmp_path / "text"
    train(*base_args(mnist_dir, tiny_text_unet_config, out, *STEPS, "--conditioning", "text",
                     "--text_encoder", str(tiny_clip)))  # fmt: skip
    assert (out / "text_encoder" / "model.safetensors").is_file() and (out / "tokenizer").is_dir()
    result = run_python(
        "import torch\nfrom diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "kwargs = dict(num_inference_steps=3, output_type='pt', guidance_scale=3.0)\n"
        "seven = pipe(prompt='a handwritten 7', generator=torch.manual_seed(0), **kwargs).images\n"
        "avoid = pipe(prompt='a handwritten 7', negative_prompt='the digit one', generator=torch.manual_seed(0),"
        " **kwargs).images\n"
        "print(type(pipe).__name__, type(pipe.text_encoder).__name__, pipe.conditioning, tuple(seven.shape),"
        " bool((seven - avoid).abs().max() > 0))",
        cwd=out,
        block_package=True,
    )
    assert "MNISTDiffusionPipeline CLIPTextModel text (1, 1, 28, 28) True" in result.stdout


def test_unconditional_folders_have_no_text_components(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    pipe = MNISTDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.conditioning == "none" and pipe.text_encoder is None and pipe.tokenizer is None


def test_numpy_and_tensor_labels_are_whole_numbers_too(class_model):
    pipe = MNISTDiffusionPipeline.from_pretrained(class_model)
    pipe.set_progress_bar_config(disable=True)
    for labels in (np.int64(7), np.array([7]), torch.tensor([7]), [np.int64(7)]):
        assert len(pipe(class_labels=labels, num_inference_steps=2, output_type="np").images) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_labels": [3, 10]}, "whole numbers in 0..9"),
        ({"class_labels": [-1]}, "whole numbers in 0..9"),
        ({"class_labels": [1.5]}, "whole numbers in 0..9, got \\[1.5\\]"),
        ({"class_labels": [7.0]}, "whole numbers in 0..9, got \\[7.0\\]"),
        ({"class_labels": [1], "guidance_scale": float("nan")}, "at least 1"),
        ({"prompt": "a handwritten 7"}, "pass `class_labels` instead"),
        ({"class_labels": [1], "guidance_scale": 0.5}, "at least 1"),
        ({"class_labels": [1, 2, 3], "batch_size": 2}, "Got 3 `class_labels` for batch_size=2"),
    ],
)
def test_bad_conditions_are_clear_errors(class_model, kwargs, message):
    pipe = MNISTDiffusionPipeline.from_pretrained(class_model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("`", "`")):
        pipe(num_inference_steps=1, **kwargs)


def test_labels_to_an_unconditional_model_are_a_clear_error(tiny_pipeline):
    with pytest.raises(ValueError, match="need a class-conditional model; this one is conditioned on none"):
        tiny_pipeline(class_labels=[1], num_inference_steps=1)


def test_command_line_draws_and_scores_the_digits_asked_for(class_model, mnist_dir, tmp_path, monkeypatch):
    from pipeline.cli import main

    monkeypatch.setenv("MNIST_DIFFUSION_CACHE", str(tmp_path / "cache"))
    npz = tmp_path / "sevens.npz"
    main(["sample", "--model", str(class_model), "--num_images", "3", "--class_labels", "7", "--guidance_scale", "3"]
         + ["--num_inference_steps", "4", "--out", str(tmp_path / "g.png"), "--npz", str(npz)])  # fmt: skip
    assert np.load(npz)["images"].shape == (3, 28, 28)
    out = tmp_path / "results.json"
    main(["evaluate", "--model", str(class_model), "--num_samples", "20", "--num_inference_steps", "4"]
         + ["--dataset_name", str(mnist_dir), "--out", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    assert 0 <= results["label_accuracy"] <= 1 and results["guidance_scale"] == 2.0


@pytest.mark.slow
def test_several_processes_draw_the_digits_asked_for_in_order(class_model):
    from pipeline.sampling import digit_cycle, generate, load_sampler

    pipe, _, steps = load_sampler(str(class_model), "dpm++", 3)
    labels = digit_cycle(5)
    one, two, shifted = (
        generate(pipe, 5, 0, 2, steps, wanted, progress=False, num_processes=n).astype(int)
        for wanted, n in ((labels, 1), (labels, 2), (np.roll(labels, 1), 1))
    )
    assert np.abs(two - one).max() <= 1  # a rounding of 1 at most, from the threads' summation order
    assert np.abs(shifted - one).max() > 1  # so the labels reach each batch in its process
