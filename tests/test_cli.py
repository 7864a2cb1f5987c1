"""`mnist-diffusion`: sampling and the pictures, on a tiny saved pipeline."""

import itertools
import json
import os
import signal
import time
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from pipeline import MNISTDiffusionPipeline, visualize
from pipeline.cli import main
from pipeline.data import load_images
from pipeline.pipeline_mnist_diffusion import trailing_timesteps
from pipeline.sampling import (
    DEFAULT_SAMPLER,
    SCHEDULERS,
    generate,
    generate_batches,
    make_scheduler,
    sampling_precision,
)


@pytest.fixture
def model_dir(tiny_pipeline, tmp_path):
    """A tiny pipeline saved to a folder."""
    tiny_pipeline.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_sample_writes_grid_pngs_and_npz(model_dir, tmp_path, tiny_pipeline):
    out, npz, folder = tmp_path / "out" / "grid.png", tmp_path / "digits.npz", tmp_path / "digits"
    main(["sample", "--model", str(model_dir), "--num_images", "5", "--seed", "7", "--batch_size", "2"]
         + ["--out", str(out), "--nrow", "4", "--scale", "2", "--npz", str(npz), "--images_dir", str(folder)]
         + ["--scheduler", "ddpm", "--precision", "fp32"])  # fmt: skip
    grid = Image.open(out)
    assert grid.mode == "L" and grid.size == ((4 * 30 + 2) * 2, (2 * 30 + 2) * 2)  # 4 columns, 2 rows, 2 px padding
    digits = np.load(npz)["images"]
    assert digits.shape == (5, 28, 28) and digits.dtype == np.uint8
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "00003.png")), digits[3])
    # Digit i is the pipeline's output for seed + i, whatever the batch size.
    alone = tiny_pipeline(generator=torch.Generator().manual_seed(7 + 3), output_type="np").images
    assert np.abs(digits[3].astype(int) - (alone[0, ..., 0] * 255).round().astype(int)).max() <= 1


def test_sample_defaults_to_the_recommended_sampler(model_dir, tmp_path, tiny_pipeline):
    npz = tmp_path / "d.npz"
    main(
        ["sample", "--model", str(model_dir), "--num_images", "2", "--out", str(tmp_path / "g.png"), "--npz", str(npz)]
    )
    name, steps = DEFAULT_SAMPLER
    tiny_pipeline.scheduler = make_scheduler(name, tiny_pipeline.scheduler.config)
    with sampling_precision(torch.device("cpu")):
        expected = generate(tiny_pipeline, 2, 0, 2, steps, progress=False)
    np.testing.assert_array_equal(np.load(npz)["images"], expected)
    main(["sample", "--model", str(model_dir), "--num_images", "2", "--noise_scale", "0.8"]
         + ["--out", str(tmp_path / "g.png"), "--npz", str(npz)])  # fmt: skip
    tiny_pipeline.register_to_config(noise_scale=0.8)  # a temperature on the default sampler's noise
    with sampling_precision(torch.device("cpu")):
        scaled = generate(tiny_pipeline, 2, 0, 2, steps, progress=False)
    np.testing.assert_array_equal(np.load(npz)["images"], scaled)
    assert not np.array_equal(scaled, expected)
    main(["sample", "--model", str(model_dir), "--num_images", "2", "--scheduler", "ddim"]
         + ["--num_inference_steps", "10", "--out", str(tmp_path / "g.png"), "--npz", str(npz)])  # fmt: skip
    assert not np.array_equal(np.load(npz)["images"], expected)


def test_custom_timesteps_replace_the_samplers_own_spacing(model_dir, mnist_dir, tmp_path, tiny_pipeline):
    npz, out = tmp_path / "d.npz", tmp_path / "eval.json"
    grid = [49, 40, 30, 20, 10, 0]
    main(["sample", "--model", str(model_dir), "--num_images", "3", "--timesteps", *map(str, grid)]
         + ["--out", str(tmp_path / "g.png"), "--npz", str(npz)])  # fmt: skip
    name, _ = DEFAULT_SAMPLER
    tiny_pipeline.scheduler = make_scheduler(name, tiny_pipeline.scheduler.config, custom_timesteps=True)
    with sampling_precision(torch.device("cpu")):
        expected = generate(tiny_pipeline, 3, 0, 3, timesteps=grid, progress=False)
    np.testing.assert_array_equal(np.load(npz)["images"], expected)
    assert tiny_pipeline.scheduler.timesteps.tolist() == grid
    tiny_pipeline.scheduler = make_scheduler(name, tiny_pipeline.scheduler.config)
    with sampling_precision(torch.device("cpu")):
        own = generate(tiny_pipeline, 3, 0, 3, len(grid), progress=False)
    assert tiny_pipeline.scheduler.timesteps.tolist() != grid and not np.array_equal(own, expected)
    main(["evaluate", "--model", str(model_dir), "--num_samples", "4", "--timesteps", *map(str, grid)]
         + ["--dataset_name", str(mnist_dir), "--split", "train", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["timesteps"] == grid


@pytest.mark.slow
def test_sample_in_two_processes_draws_the_same_digits(model_dir, tmp_path, tiny_pipeline):
    npz = tmp_path / "d.npz"
    main(["sample", "--model", str(model_dir), "--scheduler", "dpm++", "--num_inference_steps", "4", "--seed", "3"]
         + ["--num_images", "5", "--batch_size", "2", "--precision", "bf16", "--num_processes", "2"]
         + ["--out", str(tmp_path / "g.png"), "--npz", str(npz)])  # fmt: skip
    tiny_pipeline.scheduler = make_scheduler("dpm++", tiny_pipeline.scheduler.config)
    expected = {}
    for precision in ("fp32", "bf16"):
        with sampling_precision(torch.device("cpu"), precision):
            expected[precision] = generate(tiny_pipeline, 5, 3, 2, 4, progress=False).astype(int)
    # In order, seed by seed, under the asked autocast (up to a rounding of 1 from the threads' summation order).
    assert np.abs(np.load(npz)["images"].astype(int) - expected["bf16"]).max() <= 1
    assert np.abs(expected["bf16"] - expected["fp32"]).max() > 1
    with pytest.raises(ValueError, match="num_processes=1"):
        next(generate_batches(tiny_pipeline, 2, 0, 2, 4, callback_on_step_end=lambda *a: {}, num_processes=2))


def test_bf16_sampling_on_a_cpu_that_would_emulate_it_is_warned_about(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr("pipeline.sampling.native_bf16", lambda device, native=native: native)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            asked, auto = sampling_precision(cpu, "bf16"), sampling_precision(cpu)
        assert isinstance(asked, torch.autocast)  # what was asked for, with a warning where it is emulated
        assert isinstance(auto, torch.autocast) == native
        assert any("has no native bf16" in str(w.message) for w in caught) == (not native)


def test_ddim_is_diffusers_ddim_and_takes_any_step_count(tiny_pipeline):
    config = tiny_pipeline.scheduler.config
    stock = DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False)
    ours = make_scheduler("ddim", config)
    digits = {}
    for name, scheduler in (("stock", stock), ("ours", ours)):
        pipe = MNISTDiffusionPipeline(**{**tiny_pipeline.components, "scheduler": scheduler})
        digits[name] = pipe(generator=torch.manual_seed(0), num_inference_steps=10, output_type="latent").images
    torch.testing.assert_close(digits["ours"], digits["stock"], atol=1e-4, rtol=1e-4)
    # 7 does not divide 50: diffusers' DDIMScheduler would jump to the wrong noise levels, and the pipeline refuses it.
    with pytest.raises(ValueError, match="divides 50"):
        MNISTDiffusionPipeline(**{**tiny_pipeline.components, "scheduler": stock})(num_inference_steps=7)
    seen = []
    pipe = MNISTDiffusionPipeline(**{**tiny_pipeline.components, "scheduler": ours})
    latents = pipe(num_inference_steps=7, output_type="latent", callback_on_step_end=lambda p, i, t, k: seen.append(int(t)) or {}).images  # fmt: skip
    assert seen == trailing_timesteps(50, 7) and torch.isfinite(latents).all()  # 49, 42, 35, 28, 20, 13, 6


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_sampler_starts_from_pure_noise_at_any_step_count(name, tiny_pipeline):
    scheduler = make_scheduler(name, tiny_pipeline.scheduler.config)
    last = tiny_pipeline.scheduler.config.num_train_timesteps - 1
    for steps in range(1, last + 2):
        scheduler.set_timesteps(steps)
        assert int(scheduler.timesteps[0]) == last, (steps, scheduler.timesteps)


def test_forward_frames_start_at_the_digit_and_end_in_noise(mnist_dir, tiny_pipeline):
    digits, _ = load_images(str(mnist_dir), split="train", max_train_samples=64)
    times = visualize.evenly_spaced_times(50, 11)
    assert times == list(range(0, 51, 5))
    frames = visualize.forward_frames(tiny_pipeline.scheduler, digits, times, torch.Generator().manual_seed(0))
    assert frames.shape == (64, 11, 28, 28)
    torch.testing.assert_close(frames[:, 0], digits[:, 0].float() / 127.5 - 1)
    last = frames[:, -1]
    assert abs(last.mean().item()) < 0.05 and abs(last.std().item() - 1) < 0.05
    # What is left of the digit shrinks as t grows.
    clean = frames[:, 0]
    correlation = [torch.corrcoef(torch.stack([clean.flatten(), frames[:, i].flatten()]))[0, 1] for i in range(11)]
    assert all(a > b for a, b in zip(correlation, correlation[1:], strict=False)) and correlation[-1] < 0.05


def test_backward_last_frame_is_the_pipeline_output(tiny_pipeline):
    times = visualize.evenly_spaced_times(50, 6)
    frames, output = visualize.backward_frames(tiny_pipeline, [3, 4], times)
    assert frames.shape == (2, 6, 28, 28)
    for row, seed in enumerate([3, 4]):
        alone = tiny_pipeline(generator=torch.Generator().manual_seed(seed), output_type="np").images[0, ..., 0]
        torch.testing.assert_close((frames[row, -1] / 2 + 0.5).clamp(0, 1), torch.from_numpy(alone), atol=1e-4, rtol=0)
        np.testing.assert_allclose(output[row, ..., 0], alone, atol=1e-4)
    # The first frame is the starting noise.
    assert abs(frames[:, 0].std().item() - 1) < 0.1


@pytest.mark.parametrize(
    "picture, extra",
    [
        ("forward", ["--index", "0", "5", "--num_frames", "6"]),
        ("backward", ["--num_seeds", "2", "--num_frames", "6"]),
        ("schedule", []),
        ("animation", ["--num_images", "4"]),
    ],
)
def test_each_picture_is_a_valid_image(model_dir, mnist_dir, tmp_path, picture, extra):
    out = tmp_path / (f"{picture}.gif" if picture == "animation" else f"{picture}.png")
    if picture == "forward":
        extra = [*extra, "--dataset_name", str(mnist_dir), "--split", "train"]
    main(["visualize", picture, "--model", str(model_dir), "--out", str(out), *extra])
    image = Image.open(out)
    if picture == "animation":
        assert image.n_frames == 51 and image.size == ((2 * 30 + 2) * 3,) * 2  # noise + 50 steps, 2x2 grid, x3
    elif picture == "schedule":
        assert image.size == (600, 360)
    else:
        width, height = image.size
        assert width > 6 * 28 and height > 2 * 28 and width > height  # 6 columns of t, 2 rows
        pixels = np.asarray(image.convert("L"))
        assert pixels.mean() < 128  # white digits on black


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--model", "{tmp}/missing/model", "--out", "{tmp}/g.png"], "no such folder"),
        (["sample", "--model", "{tmp}", "--out", "{tmp}/g.png"], "is not a saved pipeline"),
        (["sample", "--model", "someone/nope", "--out", "{tmp}/g.png"], "no cached copy of that Hub id while HF_HUB"),
        (["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--num_inference_steps", "80"], "between 1 and 50"),
        (["sample", "--model", "{model}", "--out", "{file}/g.png"], "Cannot write"),
        (["sample", "--model", "{model}", "--out", "{tmp}/grid"], "with an image extension, e.g. "),
        (["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--npz", "{tmp}"], "ending in .npz"),
        (["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--npz", "{tmp}/digits"], "ending in .npz"),
        (
            ["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--images_dir", "{file}"],
            "is a file; give a folder",
        ),
        (["sample", "--model", "{model}", "--out", "{tmp}/dir.png"], "it is a folder; give a file name"),
        (["sample", "--model", "{model}", "--out", "/proc/digits.png"], "Cannot write /proc/digits.png"),
        (["evaluate", "--model", "{model}", "--num_samples", "3"], "--num_samples must be 4 to 100,000, got 3"),
        (["evaluate", "--model", "{model}", "--num_samples", "1000000000000"], "must be 4 to 100,000"),
        (
            ["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--scheduler", "ddpm", "--noise_scale", "0.9"],
            "A noise scale is for the stochastic samplers (lcm, dpm++sde), not ddpm",
        ),
        (
            ["visualize", "forward", "--model", "{model}", "--out", "{tmp}/f.png", "--dataset_name", "{mnist}"]
            + ["--split", "test", "--index", "32"],
            "Index 32 is outside split 'test'",
        ),  # fmt: skip
        (["visualize", "backward", "--model", "{model}", "--out", "{tmp}/b.png", "--num_frames", "1"], "at least 2"),
        (
            ["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--timesteps", "49", "20", "20", "0"],
            "distinct and",
        ),
        (["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--timesteps", "60", "20", "0"], "must start at 49"),
        (
            ["sample", "--model", "{model}", "--out", "{tmp}/g.png", "--timesteps", "49", "0"]
            + ["--num_inference_steps", "2"],
            "not both",
        ),
    ],
)
def test_bad_input_is_one_line(model_dir, mnist_dir, tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "dir.png").mkdir()
    fill = {"tmp": tmp_path, "model": model_dir, "mnist": mnist_dir, "file": tmp_path / "a_file"}
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**fill) for a in argv])
    text = str(exit_info.value.code)
    assert message in text and "\n" not in text and "Traceback" not in text


@pytest.mark.parametrize("argv", [["sample", "--model", "m", "--out", "o.png", "--num_images", "0"]])
def test_non_positive_counts_are_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err


def test_interrupted_sampling_writes_the_digits_done(model_dir, tmp_path, monkeypatch, capsys):
    import pipeline.cli as cli

    def two_batches_then_sigterm(*args, **kwargs):  # a scheduler's SIGTERM keeps the digits done, as Ctrl-C does
        yield np.zeros((2, 28, 28), np.uint8)
        yield np.ones((2, 28, 28), np.uint8)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was ignored")

    def two_batches_then_ctrl_c(*args, **kwargs):
        yield from itertools.islice(two_batches_then_sigterm(), 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate_batches", two_batches_then_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    npz = tmp_path / "digits.npz"
    main(
        [
            "sample",
            "--model",
            str(model_dir),
            "--num_images",
            "100",
            "--out",
            str(tmp_path / "g.png"),
            "--npz",
            str(npz),
        ]
    )
    assert "writing the 4 digits done" in capsys.readouterr().out
    assert np.load(npz)["images"].shape == (4, 28, 28) and (tmp_path / "g.png").is_file()
    assert signal.getsignal(signal.SIGTERM) is handler  # and only while it samples
    monkeypatch.setattr(cli, "generate_batches", two_batches_then_ctrl_c)
    # Ctrl-C in evaluate scores the digits done, if there are enough; else one line, nothing written.
    monkeypatch.setattr("pipeline.evaluate.reference_features", lambda *a: np.random.default_rng(0).random((64, 128)))
    out = tmp_path / "eval.json"
    main(["evaluate", "--model", str(model_dir), "--num_samples", "100", "--out", str(out)])
    assert "scoring the 4 digits done" in capsys.readouterr().out and json.loads(out.read_text())["num_samples"] == 4

    def one_batch_then_ctrl_c(*args, **kwargs):
        yield np.zeros((2, 28, 28), np.uint8)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "generate_batches", one_batch_then_ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(model_dir), "--num_samples", "100", "--out", str(tmp_path / "e2.json")])
    assert "Interrupted after 2 digits, too few to score" in str(exit_info.value.code)
    assert not (tmp_path / "e2.json").exists()


def test_non_finite_digits_are_never_written_with_exit_0(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:  # refused before any digit is drawn
        main(["sample", "--model", str(model_dir), "--num_images", "2", "--guidance_scale", "inf", "--out", str(out)])
    assert "`guidance_scale` must be a finite number" in str(exit_info.value.code)
    weights_file = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights_file)
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, weights_file)
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning, match="not finite numbers"):
        main(["sample", "--model", str(model_dir), "--num_images", "2", "--out", str(out)])
    assert "drew digits that are not finite numbers" in str(exit_info.value.code) and not out.exists()


def test_a_hub_id_that_cannot_be_reached_is_one_line_without_diffusers_advice(monkeypatch, tmp_path):
    def unreachable(*args, **kwargs):
        raise OSError(
            "Cannot load model someone/ddpm: the model is not fully cached locally (outgoing traffic has been "
            "disabled; pass 'local_files_only=False').\nPlease check out the root cause in the stacktrace above."
        )

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # as on a machine without network
    monkeypatch.setattr(MNISTDiffusionPipeline, "from_pretrained", unreachable)
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", "someone/ddpm", "--out", str(tmp_path / "grid.png")])
    message = str(exit_info.value.code)
    assert message == (
        "mnist-diffusion sample: error: --model someone/ddpm: could not load it from the Hub (Cannot load model "
        "someone/ddpm: the model is not fully cached locally). Check the id and the network, or pass a local folder."
    )
