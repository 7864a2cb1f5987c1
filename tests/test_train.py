"""train_ddpm.py end to end: training, saving, exact resume, two processes, the Hub, and bad input."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import ROOT, assert_same_weights, base_args, cli_error, run_python, train, weights
from PIL import Image

import train_ddpm
from pipeline import training


@pytest.mark.slow
def test_train_save_and_sample_in_a_fresh_process(mnist_dir, tiny_unet_config, tmp_path):
    out = tmp_path / "run"
    # 128 images / batch 16 = 8 steps per epoch; 2 epochs; "latest" with no checkpoint yet starts fresh.
    cmd = [sys.executable, str(ROOT / "train_ddpm.py"), *base_args(mnist_dir, tiny_unet_config, out)]
    cmd += ["--num_epochs", "2", "--checkpointing_steps", "3", "--checkpoints_total_limit", "2"]
    cmd += ["--resume_from_checkpoint", "latest"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting a new training run" in result.stdout
    assert f"Saved the pipeline to {out} after 16 steps (" in result.stdout
    # Checkpoints at 3, 6, 9, 12, 15 and the last step, 16 (before the end-of-run outputs), pruned to the newest two;
    # no partial folders left.
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-15", "checkpoint-16"]
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "unet_ema", "model_config.json"} <= {
        p.name for p in (out / "checkpoint-15").iterdir()
    }
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # The saved pipeline holds the EMA weights of the last step, not the raw ones.
    final = weights(out / "unet" / "diffusion_pytorch_model.safetensors")
    ema = weights(out / "checkpoint-16" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    raw = weights(out / "checkpoint-16" / "model.safetensors")
    key = "conv_in.weight"
    assert torch.equal(final[key], ema[key]) and not torch.equal(final[key], raw[key])
    # A fresh interpreter loads the folder through diffusers alone and samples.
    run_python(
        "import torch\n"
        "from diffusers import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained(r'{out}', trust_remote_code=True)\n"
        "images = pipe(batch_size=2, generator=torch.manual_seed(0)).images\n"
        "assert [(i.mode, i.size) for i in images] == [('L', (28, 28))] * 2\n",
        cwd=tmp_path,
        block_package=True,
    )


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_same_weights(mnist_dir, tiny_unet_config, tmp_path):
    # 8 steps per epoch; the checkpoint at step 6 is mid-epoch; 12 steps in all.
    flags = ["--max_train_steps", "12", "--checkpointing_steps", "6", "--save_images_epochs", "100"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*base_args(mnist_dir, tiny_unet_config, straight, *flags))
    train(*base_args(mnist_dir, tiny_unet_config, resumed, *flags))

    def roll_back_to_step_6() -> None:
        """Leave the second run as if it had died just after saving checkpoint-6."""
        shutil.rmtree(resumed / "checkpoint-12")
        shutil.rmtree(resumed / "unet")
        (resumed / "model_index.json").unlink()

    final = ["checkpoint-12/model.safetensors", "checkpoint-12/unet_ema/diffusion_pytorch_model.safetensors"]
    final += ["unet/diffusion_pytorch_model.safetensors", "guide_unet/diffusion_pytorch_model.safetensors"]
    for resume_from in ("latest", str(resumed / "checkpoint-6")):
        roll_back_to_step_6()
        train(*base_args(mnist_dir, tiny_unet_config, resumed, *flags, "--resume_from_checkpoint", resume_from))
        for name in final:
            assert_same_weights(straight / name, resumed / name)


@pytest.mark.slow
def test_the_guide_is_the_ema_model_early_in_training(mnist_dir, tiny_unet_config, tmp_path, capsys):
    out = tmp_path / "run"
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                     "--autoguidance_fraction", "0.5", "--guidance_interval", "0", "40"))  # fmt: skip
    ema_at_2 = out / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors"
    for guide in ("checkpoint-2/unet_guide", "checkpoint-4/unet_guide", "guide_unet"):
        assert_same_weights(out / guide / "diffusion_pytorch_model.safetensors", ema_at_2)
    index = json.loads((out / "model_index.json").read_text())
    assert index["guide_unet"] == ["diffusers", "UNet2DModel"] and index["guidance_interval"] == [0, 40]
    # A checkpoint of a run whose guide was taken later or never cannot continue a run that needs one.
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "checkpoint-2" / "unet_guide")
    message = cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "4",
                                           "--checkpointing_steps", "2", "--autoguidance_fraction", "0.5",
                                           "--guidance_interval", "0", "40", "--resume_from_checkpoint", "latest"))  # fmt: skip
    assert "unet_guide, the autoguidance guide of step" in message
    plain = tmp_path / "plain"
    train(*base_args(mnist_dir, tiny_unet_config, plain, "--max_train_steps", "2", "--autoguidance_fraction", "0"))
    assert json.loads((plain / "model_index.json").read_text())["guide_unet"] == [None, None]


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_prediction_types_train_and_sample(mnist_dir, tiny_unet_config, tmp_path, prediction_type):
    from pipeline import MNISTDiffusionPipeline

    train(
        *base_args(
            mnist_dir, tiny_unet_config, tmp_path, "--max_train_steps", "2", "--prediction_type", prediction_type
        )
    )
    pipe = MNISTDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config.prediction_type == prediction_type
    images = pipe(batch_size=2, num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 28, 28, 1) and torch.isfinite(torch.from_numpy(images)).all()


@pytest.mark.slow
def test_eval_epochs_score_samples_against_the_test_split(mnist_dir, tiny_unet_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIFFUSION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    # 128 images in batches of 16: 8 steps per epoch, 3 epochs, scored after each.
    train(*base_args(mnist_dir, tiny_unet_config, out, "--num_epochs", "3", "--eval_epochs", "1",
                     "--eval_num_samples", "12"))  # fmt: skip
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["num_samples"]) for r in records] == [(1, 8, 12), (2, 16, 12), (3, 24, 12)]
    assert all(r["fid"] > 0 and 0 <= r["precision"] <= 1 and r["train_minutes"] > 0 for r in records)
    assert records[0]["train_minutes"] < records[1]["train_minutes"] < records[2]["train_minutes"]
    # The model card reports the last evaluation and how long training took.
    from pipeline.cli import card_values

    results = card_values(str(out), "Results")
    assert results["training_steps"] == 24 and results["training_minutes"] == round(records[2]["train_minutes"], 1)
    assert results["fid"] == round(records[2]["fid"], 3) and results["eval_num_samples"] == 12
    # The training curves: loss from TensorBoard, FID against minutes from eval.jsonl.
    from pipeline.cli import main as cli

    cli(
        ["visualize", "training", "--run", str(out), "--out", str(tmp_path / "curves.png"), "--reference", "floor=0.4"]
    )
    assert Image.open(tmp_path / "curves.png").size == (1100, 360)


@pytest.mark.slow
def test_two_cpu_processes_train_and_save_once(mnist_dir, tiny_unet_config, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "train_ddpm.py"), *base_args(mnist_dir, tiny_unet_config, out)]
    cmd += ["--num_epochs", "2", "--checkpointing_steps", "4"]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Global batch 2 x 16 = 32: 4 steps per epoch, 8 in all, counted once.
    assert result.stdout.count("Saved the pipeline to") == 1
    assert "after 8 steps" in result.stdout
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-8"]
    # Both processes wrote their RNG state into the same, complete checkpoint; only one wrote logs.
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / "checkpoint-8").iterdir()}
    writers = {p.name.split(".")[-2] for p in (out / "logs").rglob("events.out.tfevents.*")}  # ...<host>.<pid>.<n>
    assert len(writers) == 1
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_push_to_hub_at_the_end_never_writes_the_token(mnist_dir, tiny_unet_config, tmp_path, monkeypatch):
    calls = []

    class Repo:
        repo_id = "someone/tiny-mnist"

    def fake_create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs.get("private")))
        return Repo()

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(training, "create_repo", fake_create_repo)
    monkeypatch.setattr("pipeline.card.create_repo", fake_create_repo)
    monkeypatch.setattr("diffusers.utils.hub_utils.upload_folder", fake_upload_folder)
    token = "hf_tok3n_n3v3r_wr1773n"
    train(
        *base_args(mnist_dir, tiny_unet_config, tmp_path, "--max_train_steps", "3", "--checkpointing_steps", "2"),
        *("--push_to_hub", "--hub_model_id", "tiny-mnist", "--hub_private_repo", "--hub_token", token),
    )
    assert calls[0] == ("create_repo", "tiny-mnist", True)  # before training, so a bad login fails early
    assert calls[-1][0:2] == ("upload", "someone/tiny-mnist")
    assert {"README.md", "model_index.json", "pipeline_mnist_diffusion.py", "samples.png", "unet"} <= set(calls[-1][2])
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_stable_targets_resume_exactly_keep_to_the_label_and_are_refused_where_they_do_not_apply(
    mnist_dir, tiny_unet_config, tmp_path, capsys
):
    flags = ["--checkpointing_steps", "2", "--stable_target_reference_size", "64"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*base_args(mnist_dir, tiny_unet_config, straight, "--max_train_steps", "4", *flags))
    # Two steps, then two more from checkpoint-2 (the warm-up spans both runs' first two steps, so they match).
    train(*base_args(mnist_dir, tiny_unet_config, resumed, "--max_train_steps", "2", *flags))
    train(*base_args(mnist_dir, tiny_unet_config, resumed, "--max_train_steps", "4", *flags, "--resume_from_checkpoint",
                     "latest"))  # fmt: skip
    final = "unet/diffusion_pytorch_model.safetensors"
    assert_same_weights(straight / final, resumed / final)
    plain = tmp_path / "plain"  # the same run with the digits' own targets trains other weights
    train(*base_args(mnist_dir, tiny_unet_config, plain, "--max_train_steps", "4", "--checkpointing_steps", "2",
                     "--stable_target_reference_size", "0"))  # fmt: skip
    with pytest.raises(AssertionError):
        assert_same_weights(straight / final, plain / final)
    # A class-conditional run keeps each digit's posterior to its class: other weights than its plain-target twin.
    for size in ("64", "0"):
        train(*base_args(mnist_dir, tiny_unet_config, tmp_path / f"class_{size}", "--max_train_steps", "2",
                         "--conditioning", "class", "--stable_target_reference_size", size))  # fmt: skip
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "class_64" / final, tmp_path / "class_0" / final)
    # On by default for denoising training, conditional too.
    for extra in (["--conditioning", "class"], []):
        args = ["--dataset_name", str(mnist_dir), "--output_dir", str(tmp_path / "x"), *extra]
        assert train_ddpm.parse_args(args).stable_target_reference_size == 16384
        message = cli_error(capsys, *args, "--stable_target_reference_size", "-1")
        assert "--stable_target_reference_size must be 0 or more" in message


def test_bad_input_fails_early_and_clearly(mnist_dir, tiny_unet_config, tmp_path, capsys):
    args = lambda out, *extra: base_args(mnist_dir, tiny_unet_config, tmp_path / out, *extra)  # noqa: E731
    assert "no such folder" in cli_error(capsys, "--dataset_name", str(tmp_path / "no" / "mnist"))
    assert "--train_batch_size must be at least 1" in cli_error(capsys, *args("a", "--train_batch_size", "0"))
    assert "invalid choice" in cli_error(capsys, *args("a", "--mixed_precision", "fp8"))
    assert "unrecognized arguments: --learning-rate" in cli_error(capsys, *args("a", "--learning-rate", "1"))
    assert "fp16 needs a GPU" in cli_error(capsys, *args("a", "--mixed_precision", "fp16"))
    assert "fewer than one global batch" in cli_error(capsys, *args("a", "--train_batch_size", "512"))
    missing = cli_error(capsys, *args("a", "--resume_from_checkpoint", str(tmp_path / "checkpoint-7")))
    assert "is not a checkpoint-N folder" in missing
    for flag, value, message in (  # checked with the options, not once the data is loaded or after training
        ("--adam_beta1", "1.5", "--adam_beta1 must be in [0, 1), got 1.5"),
        ("--max_grad_norm", "nan", "--max_grad_norm must be positive, got nan"),  # was "diverged: lower the LR"
        ("--ema_power", "nan", "--ema_power must be positive"),  # was non-finite digits after training
        ("--ema_max_decay", "2", "--ema_max_decay must be in [0, 1)"),
        ("--lr_warmup_steps", "-5", "--lr_warmup_steps must be 0 or more"),
        ("--dataloader_num_workers", "-1", "--dataloader_num_workers must be 0 or more"),
        ("--logging_dir", "/proc/logs", "Cannot create --output_dir"),
    ):
        assert message in cli_error(capsys, *args("a", flag, value)), flag
    (tmp_path / "file").write_text("")
    assert "is a file; give a folder" in cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, tmp_path / "file"))
    assert not (tmp_path / "a").exists()  # nothing was written by any of these


def test_bf16_on_a_cpu_that_would_emulate_it_is_warned_about(mnist_dir, tmp_path, monkeypatch, caplog):
    args = train_ddpm.parse_args(
        ["--dataset_name", str(mnist_dir), "--output_dir", str(tmp_path), "--mixed_precision", "bf16"]
    )
    for native in (True, False):
        monkeypatch.setattr(training, "native_bf16", lambda device, native=native: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert training.make_accelerator(args).mixed_precision == "bf16"
        AcceleratorState._reset_state(reset_partial_state=True)
        assert ("has no native bf16" in caplog.text) == (not native)


def test_only_cpus_with_avx512_bf16_or_amx_default_to_bf16(monkeypatch):
    # oneDNN calls bf16 supported on AVX512 without BF16 too, where it is emulated (4x slower than fp32).
    from pipeline import sampling

    for flags, native in (
        ({"avx2"}, False),
        ({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, False),
        ({"avx512f", "avx512_bf16"}, True),
        ({"amx_bf16", "amx_tile"}, True),
    ):
        monkeypatch.setattr(sampling, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert sampling.native_bf16(torch.device("cpu")) is native
        if not torch.cuda.is_available():
            assert sampling.default_mixed_precision() == ("bf16" if native else "no")


@pytest.mark.slow
def test_output_dir_and_checkpoints_are_protected(mnist_dir, tiny_unet_config, tmp_path, capsys):
    out = tmp_path / "run"
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # Training again into the same folder would mix two runs.
    assert "already holds checkpoint-2" in cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, out))
    # A different model in the same folder.
    different = base_args(mnist_dir, tiny_unet_config, out, "--prediction_type", "epsilon")
    assert "differently configured model (prediction_type: 'v_prediction' there" in cli_error(capsys, *different)
    # A corrupt checkpoint.
    weights_file = out / "checkpoint-2" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    corrupt = cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, out, "--resume_from_checkpoint", "latest"))
    assert "checkpoint-2 could not be loaded" in corrupt and "corrupt" in corrupt
    # Nothing else that was already written changed.
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p != weights_file}
    assert {p: b for p, b in before.items() if p != weights_file} == after


def test_a_checkpoint_written_before_the_layout_change_resumes_to_the_same_weights(real_mnist_dir, tmp_path):
    old = Path(__file__).parent / "data" / "run_before_layout_change"
    out = tmp_path / "run"
    shutil.copytree(old / "checkpoint-2", out / "checkpoint-2")
    (tmp_path / "unet").mkdir()
    shutil.copy(old / "unet_config.json", tmp_path / "unet" / "config.json")
    # The flags of the run that wrote it (tests/data/README.md), and that run's recipe wherever defaults moved since.
    # fp32: bf16 kernels differ between CPUs (AMX, AVX512-BF16) by 8e-4 after two steps, fp32 ones by 5e-7.
    train(
        *("--dataset_name", str(real_mnist_dir), "--model_config_name_or_path", str(tmp_path / "unet")),
        *("--output_dir", str(out), "--train_batch_size", "16", "--eval_batch_size", "4", "--lr_warmup_steps", "2"),
        *("--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"),
        *("--resume_from_checkpoint", "latest", "--weighting_scheme", "none", "--autoguidance_fraction", "0"),
        *("--mixed_precision", "no", "--stable_target_reference_size", "0"),
    )
    assert_same_weights(out / "unet" / "diffusion_pytorch_model.safetensors", old / "final_unet.safetensors")


@pytest.mark.slow
def test_time_to_fid_benchmark_trains_collects_and_draws(mnist_dir, tiny_unet_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DIFFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import time_to_fid

    flags = f"--model_config_name_or_path {tiny_unet_config} --train_batch_size 16 --num_epochs 2 --eval_batch_size 4"
    flags += " --weighting_scheme none --stable_target_reference_size 256"
    argv = ["time_to_fid.py", "--dataset_name", str(mnist_dir), "--eval_num_samples", "8", "--runs_dir",
            str(tmp_path / "runs"), "--out", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png"),
            "--recipe", "a", flags]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    for _ in range(2):  # the second time, finished runs are collected as they are
        time_to_fid.main()
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["machine"]["matmul_tflops"]["fp32"] > 0 and "cpu_flags" in report["machine"]
    points = report["recipes"]["a"]["evaluations"]
    assert [p["epoch"] for p in points] == [1, 2] and points[1]["train_minutes"] > points[0]["train_minutes"]
    assert Image.open(tmp_path / "t.png").size[0] > 500
