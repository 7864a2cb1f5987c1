"""Few-step distillation: `train_ddpm.py --distill_from` trains a student that samples in its own few steps."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_weights, base_args, cli_error, run_python, train, train_in_processes
from diffusers import DDPMScheduler, LCMScheduler

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
        "--dataset_name", str(mnist_dir), "--distill_from", str(teacher), "--output_dir", str(out),
        "--train_batch_size", "16", "--eval_batch_size", "4", "--lr_warmup_steps", "2", *extra,
    ]  # fmt: skip


def test_student_saves_its_scheduler_and_samples_in_its_few_steps(mnist_dir, teacher, tmp_path):
    out = tmp_path / "fast"
    train(*distill_args(mnist_dir, teacher, out, "--max_train_steps", "3", "--num_inference_steps", "3"))
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    assert json.loads((out / "model_index.json").read_text())["default_num_inference_steps"] == 3
    assert "distill_from" in (out / "README.md").read_text()
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


@pytest.mark.parametrize(
    "flags", [["--adversarial_weight", "0"], [], ["--distribution_matching_weight", "1", "--fake_score_updates", "2"]],
    ids=["lcm", "adversarial", "distribution-matching"],
)  # fmt: skip
def test_distillation_resumes_exactly(mnist_dir, teacher, tmp_path, flags):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*distill_args(mnist_dir, teacher, straight, "--max_train_steps", "4", "--checkpointing_steps", "4", *flags))
    train(*distill_args(mnist_dir, teacher, resumed, "--max_train_steps", "2", "--checkpointing_steps", "2", *flags))
    train(*distill_args(mnist_dir, teacher, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2",
                        "--resume_from_checkpoint", "latest", *flags))  # fmt: skip
    assert (resumed / "checkpoint-2" / "unet_target").is_dir()
    assert_same_weights(
        straight / "unet" / "diffusion_pytorch_model.safetensors",
        resumed / "unet" / "diffusion_pytorch_model.safetensors",
    )
    # The discriminator and the fake score (the prepared models after the student) are saved and restored with it.
    models = 1 + (flags != ["--adversarial_weight", "0"]) + ("--distribution_matching_weight" in flags)
    assert not (resumed / "checkpoint-2" / f"model_{models}.safetensors").exists()
    for name in ["model.safetensors", *(f"model_{i}.safetensors" for i in range(1, models))]:
        assert_same_weights(straight / "checkpoint-4" / name, resumed / "checkpoint-4" / name)


def test_two_cpu_processes_distil_what_one_process_distils(mnist_dir, teacher, tmp_path):
    # All three terms, two fake-score updates a step; Adam's epsilon 1 keeps steps proportional to gradients
    # (test_distributed.py says why), and the learning rates are high enough to move the student and the fake score
    # well past the tolerance.
    flags = ["--max_train_steps", "3", "--checkpointing_steps", "3", "--mixed_precision", "no", "--adam_epsilon", "1"]
    flags += ["--distribution_matching_weight", "1", "--learning_rate", "1e-2", "--fake_score_learning_rate", "1e-2"]
    flags += ["--fake_score_updates", "2"]
    single = tmp_path / "single"
    train(*distill_args(mnist_dir, teacher, single, *flags), "--train_batch_size", "32")
    ddp = tmp_path / "ddp"  # 2 processes of 16 digits each: the same global batch
    train_in_processes(*distill_args(mnist_dir, teacher, ddp, *flags))
    # The student (model), the discriminator (model_1) and the fake score (model_2) end where one process's did.
    for name in ("model.safetensors", "model_1.safetensors", "model_2.safetensors"):
        assert_same_weights(ddp / "checkpoint-3" / name, single / "checkpoint-3" / name)


def test_bad_distillation_input_is_one_line(mnist_dir, tiny_unet_config, teacher, tmp_path, capsys):
    out = tmp_path / "out"
    assert "no such folder" in cli_error(capsys, *distill_args(mnist_dir, tmp_path / "none", out))
    message = cli_error(capsys, *distill_args(mnist_dir, teacher, out, "--num_ddim_timesteps", "7"))
    assert "--num_ddim_timesteps must divide the teacher's 50 training steps, got 7" in message
    copies = cli_error(capsys, *distill_args(mnist_dir, teacher, out, "--conditioning", "class"))
    assert "the student copies the teacher's UNet" in copies
    cond = tmp_path / "cond"
    train(*base_args(mnist_dir, tiny_unet_config, cond, "--max_train_steps", "1", "--conditioning", "class"))
    assert "class-conditional" in cli_error(capsys, *distill_args(mnist_dir, cond, out))
    for flag in ("--adversarial_weight", "--distribution_matching_weight"):
        assert "needs --distill_from" in cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, out, flag, "1"))
    updates = cli_error(capsys, *distill_args(mnist_dir, teacher, out, "--fake_score_updates", "2"))
    assert "--fake_score_updates must be 1 or more, and more than 1 needs --distribution_matching_weight" in updates
    fast = tmp_path / "fast"
    train(*distill_args(mnist_dir, teacher, fast, "--max_train_steps", "1"))
    assert "distil from the model that was trained" in cli_error(capsys, *distill_args(mnist_dir, fast, out))
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


def test_distribution_matching_trains_the_student_and_the_fake_score_each_on_its_own_loss(tiny_pipeline):
    scheduler = LCMScheduler.from_config(tiny_pipeline.scheduler.config)
    student = tiny_pipeline.unet
    teacher, target = (copy.deepcopy(student).requires_grad_(False) for _ in range(2))
    torch.manual_seed(0)
    fake_score = type(student)(**student.config)  # unlike the teacher, so that the matching gradient is not zero
    images = torch.rand(4, 1, 28, 28) * 2 - 1

    def gradients(weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        student.zero_grad(), fake_score.zero_grad()
        loss = ConsistencyDistillationLoss(
            scheduler, teacher, target, fake_score=fake_score, distribution_matching_weight=weight,
            sampling_timesteps=[49, 32],
        )  # fmt: skip
        loss(student, images, torch.Generator().manual_seed(0)).backward()
        return tuple(torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (student, fake_score))

    plain_student, plain_fake = gradients(0.0)
    matched_student, matched_fake = gradients(1.0)
    # The fake score's denoising loss does not reach the student, the matching loss does not reach the fake score.
    assert not torch.allclose(plain_student, matched_student)
    torch.testing.assert_close(plain_fake, matched_fake)
    assert plain_fake.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # DMD2's extra fake-score updates: the fake score learns from the student's fresh digits, the student not at all.
    student.zero_grad(), fake_score.zero_grad()
    loss = ConsistencyDistillationLoss(scheduler, teacher, target, fake_score=fake_score, sampling_timesteps=[49, 32])
    loss.fake_score_loss(student, images, torch.Generator().manual_seed(1), (0, 1)).backward()
    assert all(p.grad is None for p in student.parameters())
    assert torch.cat([p.grad.flatten() for p in fake_score.parameters()]).abs().sum() > 0
    with pytest.raises(ValueError, match="sampling_timesteps"):
        ConsistencyDistillationLoss(scheduler, teacher, target, fake_score=fake_score)


def test_student_noise_benchmark_sampler_is_lcm_at_gamma_1_and_noise_scale_1(monkeypatch):
    """benchmarks/student_noise.py's 1:1 row is the shipped sampler: its step equals LCMScheduler's, draw for draw."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from student_noise import NoiseLCMScheduler

    lcm = LCMScheduler(
        num_train_timesteps=50,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_scaling=10,
        clip_sample=True,
    )
    schedulers = {
        name: cls.from_config(lcm.config) for name, cls in (("lcm", LCMScheduler), ("noise", NoiseLCMScheduler))
    }
    deterministic = NoiseLCMScheduler.from_config(lcm.config)
    deterministic.gamma = 0.0
    schedulers["gamma 0"] = deterministic
    start = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    finals = {}
    for name, scheduler in schedulers.items():
        scheduler.set_timesteps(timesteps=[49, 39, 29, 19])
        sample = start
        for i, t in enumerate(scheduler.timesteps):
            output = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(10 + i))
            generator = torch.Generator().manual_seed(100 + i)
            sample = scheduler.step(output, t, sample, generator=generator).prev_sample
        finals[name] = sample
    torch.testing.assert_close(finals["noise"], finals["lcm"])
    assert not torch.allclose(finals["gamma 0"], finals["lcm"])  # keeping the predicted noise changes the path


def test_student_noise_benchmark_rows_do_not_depend_on_the_folders_saved_noise_scale(
    tiny_pipeline, mnist_dir, tmp_path, monkeypatch
):
    """Each row of benchmarks/student_noise.py samples at its own scale, not at that times the folder's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("MNIST_DIFFUSION_CACHE", str(tmp_path / "cache"))
    import student_noise

    config = dict(tiny_pipeline.scheduler.config, timestep_spacing="trailing")
    pipe = MNISTDiffusionPipeline(unet=tiny_pipeline.unet, scheduler=LCMScheduler.from_config(config))
    fids = {}
    for saved in (1.0, 0.5):
        pipe.register_to_config(noise_scale=saved)
        pipe.save_pretrained(tmp_path / str(saved))
        out = tmp_path / f"{saved}.json"
        monkeypatch.setattr("sys.argv", ["student_noise.py", "--model", str(tmp_path / str(saved)), "--dataset_name",
                                         str(mnist_dir), "--num_samples", "8", "--settings", "1:1", "1:0.5", "--out",
                                         str(out)])  # fmt: skip
        student_noise.main()
        fids[saved] = [row["fid"] for row in json.loads(out.read_text())["rows"]]
    assert fids[1.0] == fids[0.5]
    assert fids[1.0][0] != fids[1.0][1]  # while the rows' own scales do change the digits


def test_noise_scale_is_a_saved_sampling_setting_of_the_consistency_sampler(tiny_pipeline, tmp_path, monkeypatch):
    """`noise_scale` scales the LCM sampler's starting and fresh noise, as the benchmark measured it; `resave` saves it
    as the folder's default; samplers that cannot take it refuse it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from student_noise import NoiseLCMScheduler

    config = dict(tiny_pipeline.scheduler.config, timestep_spacing="trailing")
    pipe = MNISTDiffusionPipeline(unet=tiny_pipeline.unet, scheduler=LCMScheduler.from_config(config))
    pipe.save_pretrained(tmp_path / "fast")

    def digits(pipe, **kwargs):
        generator = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(batch_size=2, generator=generator, num_inference_steps=3, output_type="np", **kwargs).images

    plain, scaled = digits(pipe), digits(pipe, noise_scale=0.8)
    assert not np.allclose(plain, scaled)
    reference = MNISTDiffusionPipeline(unet=pipe.unet, scheduler=NoiseLCMScheduler.from_config(pipe.scheduler.config))
    reference.scheduler.noise_scale = reference.scheduler.init_noise_sigma = 0.8
    np.testing.assert_allclose(scaled, digits(reference), atol=1e-5)
    main(["resave", "--model", str(tmp_path / "fast"), "--noise_scale", "0.8"])
    loaded = MNISTDiffusionPipeline.from_pretrained(tmp_path / "fast")
    np.testing.assert_allclose(digits(loaded), scaled, atol=1e-6)
    np.testing.assert_allclose(digits(loaded, noise_scale=1.0), plain, atol=1e-6)
    loaded.scheduler = DDPMScheduler.from_config(config)  # the saved default is for samplers that take it only
    digits(loaded)
    with pytest.raises(ValueError, match="stochastic samplers"):
        digits(loaded, noise_scale=0.8)
