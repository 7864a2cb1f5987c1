"""The model factory, the noise schedule and MNISTDiffusionPipeline: sampling, saving, loading, pushing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_UNET, run_python
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipeline import MNISTDiffusionPipeline, check_unet_config, create_model_and_scheduler, image_grid
from pipeline.card import model_card, push_pipeline, save_pipeline
from pipeline.cli import main
from pipeline.sampling import make_scheduler


def test_default_model_and_schedule():
    unet, scheduler = create_model_and_scheduler()
    assert unet.config.sample_size == 28 and unet.config.in_channels == unet.config.out_channels == 1
    assert len(unet.config.block_out_channels) == 3  # 28 -> 14 -> 7
    assert unet.config.layers_per_block == 1 and 1e6 <= sum(p.numel() for p in unet.parameters()) <= 5e6
    assert scheduler.config.num_train_timesteps == 50
    # Step 50 is pure noise: almost nothing of the digit is left.
    assert scheduler.alphas_cumprod[-1] < 1e-3
    # A forward pass keeps the shape.
    out = unet(torch.zeros(2, 1, 28, 28), torch.tensor([0, 49])).sample
    assert out.shape == (2, 1, 28, 28)


def test_every_resnet_block_of_the_default_unet_sees_the_timestep():
    """GroupNorm with one channel a group erases the time embedding a ResNet block adds before it; the default UNet's
    groups are wide enough that every block's output depends on t."""
    unet, _ = create_model_and_scheduler()
    embedding = unet.time_embedding(unet.time_proj(torch.tensor([5, 45])))
    blocks = [*unet.mid_block.resnets]
    for block in [*unet.down_blocks, *unet.up_blocks]:
        blocks += block.resnets
    torch.manual_seed(0)
    with torch.no_grad():
        for block in blocks:
            x = torch.randn(1, block.conv1.in_channels, 7, 7).expand(2, -1, -1, -1)
            early, late = block(x, embedding)
            assert (early - late).abs().max() > 1e-3


def test_the_stable_target_depends_on_the_noisy_digit_not_on_which_digit_made_it():
    from pipeline.loss import DiffusionLoss, predicted_digit_and_noise

    digits = torch.from_numpy(np.load(ROOT / "tests" / "data" / "mnist_test_500.npz")["images"])[:, None]
    digits = digits.float() / 127.5 - 1
    own, reference = digits[:8], digits[8:264]
    _, scheduler = create_model_and_scheduler()
    loss = DiffusionLoss(scheduler)
    noise = torch.randn(own.shape, generator=torch.manual_seed(0))
    for t in (0, 45, 49):
        timesteps = torch.full((8,), t)
        noisy = scheduler.add_noise(own, noise, timesteps)
        stable = loss.stable_target(own, noisy, timesteps, reference)
        if t == 0:  # nearly clean: the digit itself is the posterior, and the target the plain one
            torch.testing.assert_close(stable, loss.target(own, noise, timesteps), atol=1e-4, rtol=0)
        elif t == 49:  # pure noise: every digit is as likely, and x_0 their mean
            x_0, _ = predicted_digit_and_noise(scheduler, stable, noisy, timesteps)
            expected = (own + reference.sum(0)) / (1 + len(reference))
            torch.testing.assert_close(x_0, expected, atol=0.02, rtol=0)
        else:  # claim that another digit made the same noisy one: its plain target moves, the stable one hardly
            other, alone = own.roll(1, 0), reference[:0]  # with no reference digits, the plain target
            plain_move = loss.stable_target(other, noisy, timesteps, alone) - loss.stable_target(
                own, noisy, timesteps, alone
            )
            stable_move = loss.stable_target(other, noisy, timesteps, reference) - stable
            assert stable_move.norm() < 0.05 * plain_move.norm()


def test_a_conditional_stable_target_keeps_to_its_class_unless_the_condition_is_dropped():
    from types import SimpleNamespace

    from pipeline.loss import DiffusionLoss, predicted_digit_and_noise

    data = np.load(ROOT / "tests" / "data" / "mnist_test_500.npz")
    digits, labels = torch.from_numpy(data["images"])[:, None].float() / 127.5 - 1, torch.from_numpy(data["labels"])
    own, reference = digits[:8], digits[8:]
    match = labels[:8, None] == labels[8:]
    _, scheduler = create_model_and_scheduler()
    loss = DiffusionLoss(scheduler)
    timesteps = torch.full((8,), 49)  # pure noise: x_0 is the mean of the digits the posterior keeps
    noisy = scheduler.add_noise(own, torch.randn(own.shape, generator=torch.manual_seed(0)), timesteps)
    x_0, _ = predicted_digit_and_noise(scheduler, loss.stable_target(own, noisy, timesteps, reference, match), noisy,
                                       timesteps)  # fmt: skip
    for i in range(8):
        class_mean = (own[i] + reference[match[i]].sum(0)) / (1 + match[i].sum())
        torch.testing.assert_close(x_0[i], class_mean, atol=0.02, rtol=0)
    # Through the loss: a model that predicts zeros scores the targets' mean square. With no reference digit of its
    # class a digit's target is its plain one; with every condition dropped, the posterior is over all of them.
    zeros = lambda x, t, **condition: SimpleNamespace(sample=torch.zeros_like(x))  # noqa: E731
    condition, null = {"class_labels": labels[:8]}, {"class_labels": torch.tensor(10)}
    none = torch.zeros_like(match)

    def score(dropout: float, **targets) -> torch.Tensor:
        step = DiffusionLoss(scheduler, condition_dropout=dropout)
        return step(zeros, own, torch.manual_seed(1), condition, null, **targets)

    torch.testing.assert_close(score(0.0, reference=reference, reference_match=none), score(0.0))
    torch.testing.assert_close(score(1.0, reference=reference, reference_match=none), score(1.0, reference=reference))
    assert not torch.allclose(score(0.0, reference=reference, reference_match=match), score(0.0))


def test_four_levels_at_28_is_a_clear_error(tmp_path):
    config = dict(TINY_UNET, block_out_channels=[8, 16, 16, 16])
    config["down_block_types"] = ["DownBlock2D"] * 4
    config["up_block_types"] = ["UpBlock2D"] * 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"4 resolution levels cannot run at 28x28 \(28 -> 14 -> 7 -> 3.5\).*at most 3"
    ):
        create_model_and_scheduler(model_config_name_or_path=tmp_path)
    check_unet_config(UNet2DModel(**dict(config, sample_size=32)).config)  # 32 -> 16 -> 8 -> 4 is fine


def test_rgb_model_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY_UNET, in_channels=3, out_channels=3)))
    with pytest.raises(ValueError, match="MNIST digits need 1 and 1"):
        create_model_and_scheduler(model_config_name_or_path=tmp_path)


def test_output_types_and_determinism(tiny_pipeline):
    images = tiny_pipeline(batch_size=3, generator=torch.manual_seed(0)).images
    assert len(images) == 3 and all(
        isinstance(i, Image.Image) and i.mode == "L" and i.size == (28, 28) for i in images
    )
    array = tiny_pipeline(batch_size=3, generator=torch.manual_seed(0), output_type="np").images
    assert array.shape == (3, 28, 28, 1) and array.min() >= 0 and array.max() <= 1
    np.testing.assert_array_equal(np.asarray(images[1]), (array[1, ..., 0] * 255).round().astype(np.uint8))
    tensor = tiny_pipeline(batch_size=3, generator=torch.manual_seed(0), output_type="pt").images
    assert tensor.shape == (3, 1, 28, 28)
    torch.testing.assert_close(tensor[:, 0], torch.from_numpy(array[..., 0]))
    other = tiny_pipeline(batch_size=3, generator=torch.manual_seed(1), output_type="np").images
    assert np.abs(other - array).max() > 0.01
    (first,) = tiny_pipeline(batch_size=1, generator=torch.manual_seed(0), output_type="np", return_dict=False)
    assert first.shape == (1, 28, 28, 1)


def test_steps_default_to_training_steps_and_cannot_exceed_them(tiny_pipeline):
    seen = []
    tiny_pipeline(batch_size=1, callback_on_step_end=lambda pipe, i, t, kw: seen.append(int(t)))
    assert seen == list(range(49, -1, -1))
    with pytest.raises(ValueError, match="between 1 and 50"):
        tiny_pipeline(num_inference_steps=1000)
    with pytest.raises(ValueError, match="batch_size"):
        tiny_pipeline(batch_size=0)
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipeline(output_type="numpy")
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        tiny_pipeline(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"])


def test_intermediate_steps_end_at_the_returned_images(tiny_pipeline):
    frames = []
    out = tiny_pipeline(
        batch_size=2,
        generator=torch.manual_seed(3),
        output_type="pt",
        callback_on_step_end=lambda pipe, i, t, kw: frames.append(kw["latents"].clone()),
    ).images
    assert len(frames) == 50
    torch.testing.assert_close((frames[-1] / 2 + 0.5).clamp(0, 1), out)


def test_other_schedulers_swap_in(tiny_pipeline):
    tiny_pipeline.scheduler = DDIMScheduler.from_config(tiny_pipeline.scheduler.config)
    steps = []
    images = tiny_pipeline(
        batch_size=2,
        num_inference_steps=10,
        output_type="np",
        callback_on_step_end=lambda p, i, t, kw: steps.append(t),
    ).images
    assert images.shape == (2, 28, 28, 1) and len(steps) == 10 and steps[0] == 49  # from pure noise
    # A sampler whose spacing starts short of pure noise is re-spaced to start there.
    tiny_pipeline.scheduler = DDIMScheduler.from_config(tiny_pipeline.scheduler.config, timestep_spacing="leading")
    steps.clear()
    tiny_pipeline(num_inference_steps=10, callback_on_step_end=lambda p, i, t, kw: steps.append(int(t)))
    assert steps == list(range(49, 0, -5)) and tiny_pipeline.scheduler.config.timestep_spacing == "leading"
    # DDIM steps by 50 // n: a count that does not divide 50 cannot reach the digit, and says what can.
    with pytest.raises(ValueError, match=r"divides 50 \(\[1, 2, 5, 10, 25, 50\]\); got 20"):
        tiny_pipeline(num_inference_steps=20)


def test_autoguidance_steps_away_from_the_guide_within_its_interval(tiny_pipeline, tmp_path):
    def digits(pipe, **kwargs):
        return pipe(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0), output_type="np", **kwargs)

    unguided = digits(tiny_pipeline).images
    unet, scheduler = tiny_pipeline.unet, tiny_pipeline.scheduler
    torch.manual_seed(1)
    weaker = UNet2DModel(**TINY_UNET)
    calls = []
    weaker.register_forward_hook(lambda module, args, output: calls.append(int(args[1])))
    guided = MNISTDiffusionPipeline(unet, scheduler, guide_unet=weaker)
    guided.set_progress_bar_config(disable=True)
    assert not np.allclose(digits(guided).images, unguided)
    assert len(calls) == 5
    # guidance_scale 1 is the model alone, without calling the guide.
    np.testing.assert_array_equal(digits(guided, guidance_scale=1.0).images, unguided)
    assert len(calls) == 5
    # guide + w (model - guide): a guide identical to the model changes nothing.
    same = MNISTDiffusionPipeline(unet, scheduler, guide_unet=unet)
    same.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(digits(same, guidance_scale=3.0).images, unguided, atol=1e-5)
    # Only the timesteps inside the interval are guided, and the interval is saved and loaded with the guide.
    interval = MNISTDiffusionPipeline(unet, scheduler, guide_unet=weaker, guidance_interval=[0, 30])
    interval.set_progress_bar_config(disable=True)
    calls.clear()
    outside = digits(interval).images
    assert calls and max(calls) <= 30 and len(calls) < 5
    interval.save_pretrained(tmp_path)
    loaded = MNISTDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.config.guidance_interval == [0, 30] and isinstance(loaded.guide_unet, UNet2DModel)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(digits(loaded).images, outside, atol=1e-5)


def test_a_guide_of_another_kind_is_a_clear_error(tiny_pipeline):
    torch.manual_seed(0)
    other = UNet2DModel(**dict(TINY_UNET, num_class_embeds=11))
    pipe = MNISTDiffusionPipeline(tiny_pipeline.unet, tiny_pipeline.scheduler, guide_unet=other)
    with pytest.raises(ValueError, match="`guide_unet` must be a UNet2DModel with the same num_class_embeds"):
        pipe(batch_size=1)
    pipe = MNISTDiffusionPipeline(tiny_pipeline.unet, tiny_pipeline.scheduler, guidance_interval=[30, 10])
    with pytest.raises(ValueError, match="`guidance_interval` must be two timesteps"):
        pipe(batch_size=1)


class ScaledNoiseDPMSolver(DPMSolverMultistepScheduler):
    """The reference for `noise_scale`: stochastic DPM-Solver++ whose own noise draws are scaled by 0.8."""

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        noise = randn_tensor(model_output.shape, generator=generator, dtype=torch.float32)
        return super().step(model_output, timestep, sample, generator, 0.8 * noise, return_dict)


def test_noise_scale_is_a_temperature_of_stochastic_dpm_solver(tiny_pipeline, tmp_path):
    """With stochastic DPM-Solver++ `noise_scale` scales the starting noise and every draw of the step; `resave` saves
    it as the folder's default, which the deterministic samplers ignore and refuse when asked."""

    def digits(pipe, **kwargs):
        generator = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(batch_size=2, generator=generator, num_inference_steps=5, output_type="np", **kwargs).images

    config = tiny_pipeline.scheduler.config
    pipe = MNISTDiffusionPipeline(unet=tiny_pipeline.unet, scheduler=make_scheduler("dpm++sde", config))
    plain, scaled = digits(pipe), digits(pipe, noise_scale=0.8)
    assert not np.allclose(plain, scaled)
    reference = MNISTDiffusionPipeline(
        unet=pipe.unet, scheduler=ScaledNoiseDPMSolver.from_config(pipe.scheduler.config)
    )
    reference.scheduler.init_noise_sigma = 0.8
    np.testing.assert_allclose(scaled, digits(reference), atol=1e-5)
    tiny_pipeline.save_pretrained(tmp_path)  # a folder that keeps the training scheduler, DDPM
    main(["resave", "--model", str(tmp_path), "--noise_scale", "0.8"])
    loaded = MNISTDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.config.noise_scale == 0.8
    loaded.scheduler = make_scheduler("dpm++sde", loaded.scheduler.config)
    np.testing.assert_allclose(digits(loaded), scaled, atol=1e-5)
    loaded.scheduler = make_scheduler("dpm++", config)  # the ODE takes no noise scale: the folder's is ignored
    ode = MNISTDiffusionPipeline(unet=pipe.unet, scheduler=loaded.scheduler)
    np.testing.assert_allclose(digits(loaded), digits(ode), atol=1e-6)
    with pytest.raises(ValueError, match=r"stochastic samplers .* not DPMSolverMultistepScheduler \(dpmsolver\+\+\)"):
        digits(loaded, noise_scale=0.8)


def test_image_grid_is_nearest_neighbour():
    digits = np.zeros((3, 28, 28), dtype=np.uint8)
    digits[1, 0, 0] = 255
    grid = image_grid(digits, nrow=2, scale=3, pad=2)
    assert grid.mode == "L" and grid.size == ((2 * 30 + 2) * 3, (2 * 30 + 2) * 3)
    pixels = np.asarray(grid)
    # The one white pixel of digit 1 becomes a sharp 3x3 block: no interpolated grey.
    assert set(np.unique(pixels)) == {0, 255} and (pixels == 255).sum() == 9


def test_save_pipeline_writes_a_complete_folder(tiny_pipeline, tmp_path):
    training_args = {"learning_rate": 0.001, "hub_token": "hf_s3cr3t", "immiscible_noise": False}
    save_pipeline(tiny_pipeline, tmp_path, training_args=training_args)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "model_index.json",
        "unet",
        "scheduler",
        "pipeline_mnist_diffusion.py",
        "README.md",
        "samples.png",
    } <= names
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_mnist_diffusion", "MNISTDiffusionPipeline"]
    # The saved configs are complete: reloading never depends on the code's current defaults.
    unet_config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert {"block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "norm_num_groups"} <= set(
        unet_config
    )
    scheduler_config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["num_train_timesteps"] == 50 and scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    card = (tmp_path / "README.md").read_text()
    assert "library_name: diffusers" in card and "- unconditional-image-generation" in card and "- mnist" in card
    assert "samples.png" in card and "learning_rate" in card
    assert "immiscible_noise" not in card  # a retired lever that was off says nothing about the model
    assert "hf_s3cr3t" not in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file())
    # Hub metadata names Hub datasets; a local folder is named as one, never by a path of the training machine.
    assert "- ylecun/mnist" in str(model_card(tiny_pipeline, {"dataset_name": "ylecun/mnist"}))
    local = str(model_card(tiny_pipeline, {"dataset_name": str(tmp_path / "mnist")}))
    assert (
        "datasets:" not in local
        and str(tmp_path) not in local
        and "| dataset_name | `a local copy (mnist)` |" in local
    )
    # A plain save_pretrained (what a pipeline loaded with trust_remote_code has) saves what loading needs.
    tiny_pipeline.save_pretrained(tmp_path / "plain")
    assert MNISTDiffusionPipeline.from_pretrained(tmp_path / "plain").conditioning == "none"


@pytest.mark.slow
def test_reload_three_ways_in_fresh_processes(tiny_pipeline, tmp_path):
    folder = tmp_path / "pipe"
    tiny_pipeline.save_pretrained(folder)
    expected = tiny_pipeline(batch_size=2, generator=torch.manual_seed(0), output_type="np").images
    np.save(tmp_path / "expected.npy", expected)
    sample = (
        "import numpy as np, torch\n"
        "images = pipe(batch_size=2, generator=torch.manual_seed(0), output_type='np').images\n"
        f"np.testing.assert_allclose(images, np.load(r'{tmp_path / 'expected.npy'}'), atol=1e-4)\n"
    )
    # 1. Through the package's own class: no code from the folder runs.
    run_python(
        "from pipeline import MNISTDiffusionPipeline\n"
        f"pipe = MNISTDiffusionPipeline.from_pretrained(r'{folder}')\n"
        "assert type(pipe) is MNISTDiffusionPipeline\n" + sample,
        cwd=tmp_path,
    )
    # 2. Through diffusers alone, where this package cannot be imported: the folder's module file defines the class.
    # 3. Each component alone (in the same fresh interpreter, which starting costs seconds).
    run_python(
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained(r'{folder}', trust_remote_code=True)\n"
        "assert type(pipe).__name__ == 'MNISTDiffusionPipeline', type(pipe)\n" + sample + "import torch\n"
        "from diffusers import DDPMScheduler, UNet2DModel\n"
        f"unet = UNet2DModel.from_pretrained(r'{folder}', subfolder='unet')\n"
        f"scheduler = DDPMScheduler.from_pretrained(r'{folder}', subfolder='scheduler')\n"
        "assert scheduler.alphas_cumprod[-1] < 1e-3 and unet.config.sample_size == 28\n"
        "assert unet(torch.zeros(1, 1, 28, 28), 10).sample.shape == (1, 1, 28, 28)\n",
        cwd=tmp_path,
        block_package=True,
    )


def test_remote_code_needs_explicit_trust(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_push_to_hub_uploads_the_saved_folder_and_card(tiny_pipeline, monkeypatch):
    calls = {}

    class Repo:
        repo_id = "someone/ddpm-mnist"

    def fake_create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo()

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, kwargs)
        calls["files"] = {p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*")}
        calls["card"] = open(f"{folder_path}/README.md").read()
        return "https://huggingface.co/someone/ddpm-mnist/commit/1"

    monkeypatch.setattr("pipeline.card.create_repo", fake_create_repo)
    monkeypatch.setattr("diffusers.utils.hub_utils.upload_folder", fake_upload_folder)
    url = push_pipeline(tiny_pipeline, "ddpm-mnist", private=True, token="hf_SECRET", training_args={"seed": 0})
    assert url.endswith("/commit/1")
    assert calls["create_repo"] == ("ddpm-mnist", {"private": True, "token": "hf_SECRET", "exist_ok": True})
    assert calls["upload"][0] == "someone/ddpm-mnist" and calls["upload"][1]["token"] == "hf_SECRET"
    assert {
        "model_index.json",
        "pipeline_mnist_diffusion.py",
        "README.md",
        "samples.png",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    } <= calls["files"]
    assert "library_name: diffusers" in calls["card"] and "| seed | `0` |" in calls["card"]
    assert "hf_SECRET" not in calls["card"]


@pytest.mark.parametrize("folder", sorted(p.parent for p in (ROOT / "pretrained").glob("*/model_index.json")), ids=str)
def test_shipped_folders_run_the_package_code_and_start_from_pure_noise(folder):
    shipped = (folder / "pipeline_mnist_diffusion.py").read_text()
    assert shipped == (ROOT / "pipeline" / "pipeline_mnist_diffusion.py").read_text(), (
        f"{folder.name} carries an old module file: mnist-diffusion resave --model pretrained/{folder.name}"
    )
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for steps in range(1, scheduler.config.num_train_timesteps + 1):
        scheduler.set_timesteps(steps)
        assert int(scheduler.timesteps[0]) == scheduler.config.num_train_timesteps - 1, steps


@pytest.mark.slow
def test_resave_makes_a_stale_folder_current_and_keeps_weights_and_settings(tiny_pipeline, tmp_path):
    from pipeline.cli import main

    tiny_pipeline.scheduler = DDPMScheduler.from_config(tiny_pipeline.scheduler.config, timestep_spacing="leading")
    save_pipeline(
        tiny_pipeline,
        tmp_path,
        training_args={"learning_rate": 0.002, "dataset_name": "ylecun/mnist"},
        results={"training_minutes": 12.5, "fid": 9.0, "eval_num_samples": 1000},
    )
    # A later evaluation of the folder's model replaces the evaluation the card reports; the training figures stay.
    evaluation = {"num_samples": 10000, "fid": 4.46797, "precision": 0.7171, "scheduler": "dpm++sde", "steps": 20}
    evaluation["noise_scale"] = 0.95
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    (tmp_path / "pipeline_mnist_diffusion.py").write_text("# an older version\n")
    weights = (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    main(["resave", "--model", str(tmp_path), "--guidance_interval", "9", "45"])
    assert json.loads((tmp_path / "model_index.json").read_text())["guidance_interval"] == [9, 45]
    assert (tmp_path / "pipeline_mnist_diffusion.py").read_text() == (
        ROOT / "pipeline" / "pipeline_mnist_diffusion.py"
    ).read_text()
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["timestep_spacing"] == "trailing"
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    card = (tmp_path / "README.md").read_text()
    assert all(
        row in card
        for row in (
            "| training_minutes | `12.5` |",
            "| fid | `4.468` |",
            "| precision | `0.717` |",
            "| eval_num_samples | `10000` |",
            "| eval_sampler | `dpm++sde, 20 steps, noise scale 0.95` |",
        )
    )
    assert "| fid | `9.0` |" not in card and card.index("## Results") < card.index("## Training settings")
    assert (
        "| learning_rate | `0.002` |" in card
        and "- ylecun/mnist" in card
        and "_name_or_path" not in "".join(p.read_text() for p in tmp_path.rglob("*.json"))
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_targets_and_timesteps(prediction_type):
    from pipeline.loss import DiffusionLoss

    _, scheduler = create_model_and_scheduler(prediction_type=prediction_type)
    loss = DiffusionLoss(scheduler)
    x0, noise, t = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.tensor([0, 25, 49])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}
    torch.testing.assert_close(loss.target(x0, noise, t), expected[prediction_type])
    # The densities stay on the training grid; logit_normal follows its density, with most mass mid-way.
    edges = torch.linspace(0, 1, 51).double()
    mass = np.diff(torch.special.ndtr(torch.logit(edges)).numpy())
    for scheme, expected_share in (("none", np.full(50, 1 / 50)), ("logit_normal", mass)):
        drawn = DiffusionLoss(scheduler, weighting_scheme=scheme).sample_timesteps(4096, torch.manual_seed(0), "cpu")
        share = torch.bincount(drawn, minlength=50).numpy() / 4096
        assert drawn.min() >= 0 and drawn.max() <= 49 and np.abs(share - expected_share).max() < 0.01


@pytest.mark.slow
def test_shipped_models_draw_the_digits_they_drew_before_the_reorganisation():
    # tests/data/README.md: each folder's own sampler and settings, seed 0. fp32 kernels differ between CPUs by ~1e-6.
    before = np.load(Path(__file__).parent / "data" / "shipped_digits.npz")
    asks = {"ddpm-mnist": {"batch_size": 4}, "ddpm-mnist-cond": {"class_labels": [0, 3, 7, 9]}}
    for name in ("ddpm-mnist", "ddpm-mnist-cond", "ddpm-mnist-fast"):
        pipe = MNISTDiffusionPipeline.from_pretrained(ROOT / "pretrained" / name)
        pipe.set_progress_bar_config(disable=True)
        digits = pipe(
            generator=torch.Generator().manual_seed(0), output_type="np", **asks.get(name, asks["ddpm-mnist"])
        )
        np.testing.assert_allclose(digits.images[..., 0], before[name], atol=2e-3, rtol=0, err_msg=name)
