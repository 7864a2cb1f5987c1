"""Few-step distillation: `train_distill.py` trains a student that samples in its own few steps."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import (
    assert_same_weights,
    base_args,
    cli_error,
    distill,
    run_python,
    train,
    train_in_processes,
)  # fmt: skip
from diffusers import DDPMScheduler, LCMScheduler
from safetensors.torch import load_file, save_file

import train_distill
from pipeline import MNISTDiffusionPipeline
from pipeline.cli import main
from pipeline.loss import ConsistencyDistillationLoss, Discriminator


@pytest.fixture(scope="module")
def teacher(mnist_dir, tiny_unet_config, tmp_path_factory):
    """A tiny trained pipeline folder to distil from."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    return out


def distill_args(mnist_dir, teacher, out, *extra: str) -> list[str]:
    """Flags for a seconds-long distillation of the tiny teacher."""
    return [
        "--dataset_name", str(mnist_dir), "--pretrained_teacher_model", str(teacher), "--output_dir", str(out),
        "--train_batch_size", "16", "--eval_batch_size", "4", "--lr_warmup_steps", "2", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_student_saves_its_scheduler_and_samples_in_its_few_steps(mnist_dir, teacher, tmp_path):
    out = tmp_path / "fast"
    distill(*distill_args(mnist_dir, teacher, out, "--max_train_steps", "3", "--num_inference_steps", "3"))
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    assert json.loads((out / "model_index.json").read_text())["default_num_inference_steps"] == 3
    assert "pretrained_teacher_model" in (out / "README.md").read_text()
    loaded = MNISTDiffusionPipeline.from_pretrained(out)
    assert loaded.default_num_inference_steps == 3
    assert loaded.guide_unet is None and sorted(k for k, v in loaded.components.items() if v) == ["scheduler", "unet"]
    # The stock loader, in a fresh process, samples in the student's 3 steps by default, from pure noise.
    code = (
        "import torch\nfrom diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "seen = []\n"
        "pipe(generator=torch.manual_seed(0), callback_on_step_end=lambda p, i, t, k: seen.append(int(t)) or {})\n"
        "print(type(pipe.scheduler).__name__, seen)\n"
    )
    # 3 steps: the trailing grid of 4 without its last point (LCMScheduler's own is 49, 33, 16).
    assert "LCMScheduler [49, 37, 24]" in run_python(code, tmp_path).stdout
    # The command line does the same: its default is the model's own sampler and steps.
    main(["sample", "--model", str(out), "--num_images", "3", "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")])  # fmt: skip
    main(["sample", "--model", str(out), "--num_images", "3", "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")]
         + ["--scheduler", "lcm", "--num_inference_steps", "3"])  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])
    main(["evaluate", "--model", str(out), "--num_samples", "10", "--dataset_name", str(mnist_dir)]
         + ["--out", str(tmp_path / "e.json")])  # fmt: skip
    results = json.loads((tmp_path / "e.json").read_text())
    assert (results["scheduler"], results["steps"]) == ("lcm", 3)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--adversarial_weight", "0"], []], ids=["lcm", "adversarial"])
def test_distillation_resumes_exactly(mnist_dir, teacher, tmp_path, flags):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    distill(
        *distill_args(mnist_dir, teacher, straight, "--max_train_steps", "4", "--checkpointing_steps", "4", *flags)
    )
    distill(*distill_args(mnist_dir, teacher, resumed, "--max_train_steps", "2", "--checkpointing_steps", "2", *flags))
    distill(*distill_args(mnist_dir, teacher, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2",
                        "--resume_from_checkpoint", "latest", *flags))  # fmt: skip
    assert (resumed / "checkpoint-2" / "unet_target").is_dir()
    assert_same_weights(
        straight / "unet" / "diffusion_pytorch_model.safetensors",
        resumed / "unet" / "diffusion_pytorch_model.safetensors",
    )
    # The discriminator (the prepared model after the student) is saved and restored with it.
    models = 1 + (flags != ["--adversarial_weight", "0"])
    assert not (resumed / "checkpoint-2" / f"model_{models}.safetensors").exists()
    for name in ["model.safetensors", *(f"model_{i}.safetensors" for i in range(1, models))]:
        assert_same_weights(straight / "checkpoint-4" / name, resumed / "checkpoint-4" / name)


@pytest.mark.slow
def test_two_cpu_processes_distil_what_one_process_distils(mnist_dir, teacher, tmp_path):
    # Both terms; Adam's epsilon 1 keeps steps proportional to gradients (test_distributed.py says why), and the
    # learning rate is high enough to move the student well past the tolerance.
    flags = ["--max_train_steps", "3", "--checkpointing_steps", "3", "--mixed_precision", "no", "--adam_epsilon", "1"]
    flags += ["--learning_rate", "1e-2"]
    single = tmp_path / "single"
    distill(*distill_args(mnist_dir, teacher, single, *flags), "--train_batch_size", "32")
    ddp = tmp_path / "ddp"  # 2 processes of 16 digits each: the same global batch
    train_in_processes(*distill_args(mnist_dir, teacher, ddp, *flags), script="train_distill.py")
    # The student (model) and the discriminator (model_1) end where one process's did.
    for name in ("model.safetensors", "model_1.safetensors"):
        assert_same_weights(ddp / "checkpoint-3" / name, single / "checkpoint-3" / name)


@pytest.mark.slow
def test_bad_distillation_input_is_one_line(mnist_dir, tiny_unet_config, teacher, tmp_path, capsys):
    out = tmp_path / "out"
    error = lambda *argv: cli_error(capsys, *argv, script=train_distill)  # noqa: E731
    assert f"--pretrained_teacher_model {tmp_path / 'none'}: no such folder" in error(
        *distill_args(mnist_dir, tmp_path / "none", out)
    )
    assert "--pretrained_teacher_model someone/nope: no such folder, and no cached copy" in error(
        *distill_args(mnist_dir, "someone/nope", out)
    )
    for flag, value, message in (  # was a ZeroDivisionError, or trained with a loss or boundary that means nothing
        ("--num_ddim_timesteps", "0", "--num_ddim_timesteps must be at least 1"),
        ("--huber_c", "-1", "--huber_c must be positive"),
        ("--timestep_scaling_factor", "nan", "--timestep_scaling_factor must be positive"),
    ):
        assert message in error(*distill_args(mnist_dir, teacher, out, flag, value)), flag
    message = error(*distill_args(mnist_dir, teacher, out, "--num_ddim_timesteps", "7"))
    assert "--num_ddim_timesteps must divide the teacher's 50 training steps, got 7" in message
    steps = error(*distill_args(mnist_dir, teacher, out, "--num_inference_steps", "100"))
    assert "--num_inference_steps must be between 1 and the teacher's 50 training steps" in steps
    cond = tmp_path / "cond"
    train(*base_args(mnist_dir, tiny_unet_config, cond, "--max_train_steps", "1", "--conditioning", "class"))
    assert "class-conditional" in error(*distill_args(mnist_dir, cond, out))
    # The distillation flags moved with it: train_ddpm.py says where, instead of training plain DDPM.
    for flag in ("--distill_from", "--adversarial_weight", "--num_ddim_timesteps", "--loss_type"):
        moved = cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, out, flag, "1"))
        assert f"{flag}: distillation moved to train_distill.py" in moved
    damaged = tmp_path / "damaged"  # a teacher whose weights hold NaN names the teacher, not a divergence
    shutil.copytree(teacher, damaged, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    weights_file = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights_file)
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, weights_file)
    assert "holds weights that are not finite numbers" in error(*distill_args(mnist_dir, damaged, out))
    fast = tmp_path / "fast"
    distill(*distill_args(mnist_dir, teacher, fast, "--max_train_steps", "1"))
    assert "distil from the model that was trained" in error(*distill_args(mnist_dir, fast, out))
    assert not out.exists()


def test_consistency_function_is_the_one_lcm_scheduler_samples_with(tiny_pipeline):
    scheduler = LCMScheduler.from_config(tiny_pipeline.scheduler.config, clip_sample=False)
    unet = tiny_pipeline.unet
    loss = ConsistencyDistillationLoss(scheduler, unet, unet, num_ddim_timesteps=25)
    assert loss.grid.tolist() == list(range(1, 50, 2))
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 1, 28, 28, generator=generator), torch.randn(2, 1, 28, 28, generator=generator)
    for t in (49, 20, 1, 0):
        scheduler.set_timesteps(timesteps=[t])
        expected = scheduler.step(output, t, sample).denoised
        value, x_0, noise = loss.consistency(output, sample, torch.full((2,), t))
        torch.testing.assert_close(value, expected)
        # x_0 and the noise put back together give the sample: the teacher's DDIM step is exact at its own level.
        alpha = scheduler.alphas_cumprod[t]
        torch.testing.assert_close(alpha.sqrt() * x_0 + (1 - alpha).sqrt() * noise, sample, atol=1e-5, rtol=1e-5)
    # At t = 0 the consistency function is the identity (the boundary condition).
    torch.testing.assert_close(loss.consistency(output, sample, torch.zeros(2, dtype=torch.long))[0], sample)


def test_only_the_student_learns_and_the_loss_is_a_function_of_the_seed(tiny_pipeline):
    scheduler = LCMScheduler.from_config(tiny_pipeline.scheduler.config)
    student = tiny_pipeline.unet
    teacher, target = (copy.deepcopy(student).requires_grad_(False) for _ in range(2))
    loss = ConsistencyDistillationLoss(scheduler, teacher, target, huber_c=0.015)
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    value = loss(student, images, torch.Generator().manual_seed(0))
    assert value > 0 and value == loss(student, images, torch.Generator().manual_seed(0))
    value.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in [*teacher.parameters(), *target.parameters()])


def test_an_autoguided_teacher_is_distilled_with_its_guide_inside_its_interval(tiny_pipeline):
    scheduler = LCMScheduler.from_config(tiny_pipeline.scheduler.config)
    student = tiny_pipeline.unet
    teacher, target = (copy.deepcopy(student).requires_grad_(False) for _ in range(2))
    torch.manual_seed(1)
    guide = type(student)(**student.config).requires_grad_(False)
    images = torch.rand(8, 1, 28, 28) * 2 - 1

    def value(**guidance) -> torch.Tensor:
        loss = ConsistencyDistillationLoss(scheduler, teacher, target, **guidance)
        return loss(student, images, torch.Generator().manual_seed(0)).detach()

    plain = value()
    assert value(guide=guide, guidance_scale=1.0) == plain  # scale 1: the teacher alone
    assert value(guide=teacher, guidance_scale=2.0) == plain  # a guide equal to the teacher changes nothing
    assert value(guide=guide, guidance_scale=2.0) != plain
    assert value(guide=guide, guidance_scale=2.0, guidance_interval=(50, 60)) == plain  # no timestep inside


def test_the_adversarial_term_trains_the_student_and_the_discriminator_each_on_its_own_loss(tiny_pipeline):
    scheduler = LCMScheduler.from_config(tiny_pipeline.scheduler.config)
    student = tiny_pipeline.unet
    teacher, target = (copy.deepcopy(student).requires_grad_(False) for _ in range(2))
    torch.manual_seed(0)
    discriminator = Discriminator()
    images = torch.rand(4, 1, 28, 28) * 2 - 1

    def gradients(critic: torch.nn.Module | None, weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        student.zero_grad(), discriminator.zero_grad()
        loss = ConsistencyDistillationLoss(
            scheduler, teacher, target, discriminator=critic, adversarial_weight=weight, sampling_timesteps=[49, 32]
        )
        loss(student, images, torch.Generator().manual_seed(0)).backward()
        flat = [torch.cat([p.grad.flatten() for p in m.parameters()]) if critic or m is student else None
                for m in (student, discriminator)]  # fmt: skip
        return flat[0], flat[1]

    consistency_only, _ = gradients(None, 0.0)
    plain_student, plain_critic = gradients(discriminator, 0.0)
    adversarial_student, adversarial_critic = gradients(discriminator, 1.0)
    # The discriminator's loss does not reach the student, the student's GAN loss does not reach the discriminator.
    torch.testing.assert_close(plain_student, consistency_only)
    assert not torch.allclose(plain_student, adversarial_student)
    torch.testing.assert_close(plain_critic, adversarial_critic)
    assert plain_critic.abs().sum() > 0
    with pytest.raises(ValueError, match="sampling_timesteps"):
        ConsistencyDistillationLoss(scheduler, teacher, target, discriminator=discriminator)


def test_noise_scale_is_a_saved_sampling_setting_of_the_consistency_sampler(tiny_pipeline, tmp_path, monkeypatch):
    """`noise_scale` scales the LCM sampler's starting and fresh noise; `resave` saves it as the folder's default;
    samplers that cannot take it refuse it."""
    config = dict(tiny_pipeline.scheduler.config, timestep_spacing="trailing")
    pipe = MNISTDiffusionPipeline(unet=tiny_pipeline.unet, scheduler=LCMScheduler.from_config(config))
    pipe.save_pretrained(tmp_path / "fast")

    def digits(pipe, **kwargs):
        generator = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(batch_size=2, generator=generator, num_inference_steps=3, output_type="np", **kwargs).images

    plain, scaled = digits(pipe), digits(pipe, noise_scale=0.8)
    assert not np.allclose(plain, scaled)
    # In one step only the starting noise is drawn: scaling it is drawing 0.8 times the same noise.
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    one_step = {"num_inference_steps": 1, "output_type": "np"}
    np.testing.assert_allclose(
        pipe(batch_size=2, latents=noise, noise_scale=0.8, **one_step).images,
        pipe(batch_size=2, latents=0.8 * noise, **one_step).images,
        atol=1e-6,
    )
    main(["resave", "--model", str(tmp_path / "fast"), "--noise_scale", "0.8"])
    loaded = MNISTDiffusionPipeline.from_pretrained(tmp_path / "fast")
    np.testing.assert_allclose(digits(loaded), scaled, atol=1e-6)
    np.testing.assert_allclose(digits(loaded, noise_scale=1.0), plain, atol=1e-6)
    loaded.scheduler = DDPMScheduler.from_config(config)  # the saved default is for samplers that take it only
    digits(loaded)
    with pytest.raises(ValueError, match="stochastic samplers"):
        digits(loaded, noise_scale=0.8)
