"""Faults: kills at random moments, preemption signals, diverging loss, a full disk, corrupt files, secrets."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import ROOT, assert_same_weights, base_args, cli_error, distill, train
from safetensors.torch import load_file, save_file

import train_ddpm
from pipeline.checkpoint import check_resume_settings, find_checkpoint, setting_changes
from pipeline.training import cli

FINAL = ("unet/diffusion_pytorch_model.safetensors",)


def start(args: list[str], log: Path, env: dict | None = None, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start train_ddpm.py in its own process group, its output going to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, *launcher, str(ROOT / "train_ddpm.py"), *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env or os.environ,
            start_new_session=True,
        )


def wait_for_checkpoint(process: subprocess.Popen, output_dir: Path, step: int, timeout: float = 300) -> None:
    """Wait until the run has saved checkpoint-`step` or a later one, or has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if find_checkpoint(str(output_dir)) and int(find_checkpoint(str(output_dir)).split("-")[-1]) >= step:
            return
        time.sleep(0.01)
    if process.poll() is None:
        raise TimeoutError(f"checkpoint-{step} not reached")


def wait_for_step(log: Path, step: int, timeout: float = 300) -> None:
    """Wait until the run's progress bar shows `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if f"| {step}/" in log.read_text(errors="ignore"):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached:\n{log.read_text()[-2000:]}")


def finish(process: subprocess.Popen, log: Path) -> str:
    """Wait for the run to end; its output."""
    process.wait(timeout=300)
    return log.read_text()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_same_weights(mnist_dir, tiny_unet_config, tmp_path):
    flags = ["--max_train_steps", "24", "--checkpointing_steps", "2", "--save_images_epochs", "100"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(*base_args(mnist_dir, tiny_unet_config, straight, *flags))
    rng = random.Random(0)
    kills = tries = 0
    log = tmp_path / "log.txt"
    while True:
        process = start(
            base_args(mnist_dir, tiny_unet_config, killed, *flags, "--resume_from_checkpoint", "latest"), log
        )
        if tries < 5:  # let it reach a random checkpoint, then kill it a random moment later: in a step or a save
            tries += 1
            wait_for_checkpoint(process, killed, rng.randrange(2, 22, 2))
            time.sleep(rng.uniform(0, 0.1))
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                kills += 1
            process.wait()
            continue
        output = finish(process, log)
        assert process.returncode == 0, output[-3000:]
        break
    print(f"kills survived: {kills}/{tries}")
    assert kills >= 3
    assert not list(killed.glob("partial-checkpoint-*"))  # what a kill left half-written was cleaned up
    for name in (*FINAL, "checkpoint-24/model.safetensors"):
        assert_same_weights(straight / name, killed / name)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resumes_exactly(mnist_dir, tiny_unet_config, tmp_path):
    flags = ["--max_train_steps", "40", "--checkpointing_steps", "1000", "--save_images_epochs", "100"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(*base_args(mnist_dir, tiny_unet_config, straight, *flags))
    log = tmp_path / "log.txt"
    process = start(base_args(mnist_dir, tiny_unet_config, stopped, *flags), log)
    wait_for_step(log, 5)
    os.killpg(process.pid, signal.SIGTERM)
    output = finish(process, log)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Stopped by SIGTERM at step" in output and "--resume_from_checkpoint latest" in output
    assert "Traceback" not in output
    (checkpoint,) = stopped.glob("checkpoint-*")
    assert 5 <= int(checkpoint.name.split("-")[1]) < 40
    train(*base_args(mnist_dir, tiny_unet_config, stopped, *flags, "--resume_from_checkpoint", "latest"))
    assert_same_weights(straight / FINAL[0], stopped / FINAL[0])


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(mnist_dir, tiny_unet_config, tmp_path):
    out = tmp_path / "ddp"
    args = base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "200", "--checkpointing_steps", "1000")
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    log = tmp_path / "log.txt"
    process = start(args, log, env=env, launcher=launcher)
    wait_for_step(log, 3)
    workers = []
    for _ in range(50):  # the launcher's children are the two workers
        workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        if len(workers) == 2:
            break
        time.sleep(0.1)
    os.kill(int(max(workers, key=int)), signal.SIGTERM)  # the later-started worker: usually rank 1
    output = finish(process, log)
    assert output.count("Stopped by SIGTERM at step") == 1, output[-3000:]
    (checkpoint,) = out.glob("checkpoint-*")
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert f"at step {checkpoint.name.split('-')[1]};" in output


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    mnist_dir, tiny_unet_config, tmp_path, capsys
):
    out = tmp_path / "run"
    # An absurd learning rate overflows the weights within a few steps; every step is a checkpointing step.
    diverge = ["--max_train_steps", "50", "--checkpointing_steps", "1", "--learning_rate", "1e30"]
    diverge += ["--max_grad_norm", "1e30"]
    message = cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, out, *diverge))
    assert "Training diverged at step" in message, message
    step = int(message.split(" at step ")[1].split(" ")[0])
    latest = find_checkpoint(str(out))
    assert latest == str(out / f"checkpoint-{step - 1}") and f"The latest checkpoint is {latest}" in message
    weights = load_file(str(Path(latest) / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(
    mnist_dir, tiny_unet_config, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    real_save_state = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        if output_dir.endswith("checkpoint-4"):
            Path(output_dir, "model.safetensors").write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    message = cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "6"),
                        "--checkpointing_steps", "2")  # fmt: skip
    assert "Could not write checkpoint-4" in message and "No space left on device" in message
    assert "checkpoint-2 is intact" in message
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_every_part_of_a_model_folder_missing_or_damaged_is_one_line(tiny_pipeline, tmp_path, capsys):
    from pipeline.cli import main

    tiny_pipeline.save_pretrained(tmp_path / "saved")
    weights = "unet/diffusion_pytorch_model.safetensors"

    def truncate(folder):
        (folder / weights).write_bytes((folder / weights).read_bytes()[:500])

    def only_pickled_weights(folder):  # never unpickled: a .bin may run code
        (folder / weights).rename(folder / "unet" / "diffusion_pytorch_model.bin")

    def config_of_another_model(folder):
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 3}))

    for i, (damage, named) in enumerate(
        (
            (truncate, "diffusion_pytorch_model.safetensors"),
            (only_pickled_weights, "diffusion_pytorch_model.safetensors"),
            (lambda folder: (folder / "scheduler" / "scheduler_config.json").unlink(), "scheduler_config.json"),
            (lambda folder: (folder / "unet" / "config.json").write_text("{not json"), "config.json"),
            (config_of_another_model, "conv_in.weight"),
        )
    ):
        folder = tmp_path / f"damaged{i}"
        shutil.copytree(tmp_path / "saved", folder)
        damage(folder)
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", "--model", str(folder), "--out", str(tmp_path / "g.png")])
        message = str(exit_info.value.code)
        assert "missing or damaged" in message and named in message and "Hub" not in message, message
        assert "unsafe" not in capsys.readouterr().err and not (tmp_path / "g.png").exists()


@pytest.mark.slow
def test_resuming_never_unpickles_arbitrary_objects(mnist_dir, tiny_unet_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    AcceleratorState._reset_state(reset_partial_state=True)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    assert calls and all(weights_only is True for weights_only in calls), calls


@pytest.mark.slow
def test_resuming_applies_a_new_learning_rate_and_refuses_settings_that_break_exactness(
    mnist_dir, tiny_unet_config, tmp_path, capsys
):
    out = tmp_path / "run"
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    resume = base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "4", "--checkpointing_steps", "2")
    resume += ["--resume_from_checkpoint", "latest"]
    # What the divergence message advises: a lower, constant learning rate from the checkpoint on.
    lower = ["--learning_rate", "1e-5", "--lr_scheduler", "constant", "--lr_warmup_steps", "0"]
    refused = cli_error(capsys, *resume, *lower, "--train_batch_size", "8", "--seed", "1")
    assert "--seed: 0 -> 1; --train_batch_size: 16 -> 8" in refused and "Resume with its settings" in refused
    assert "learning_rate" not in refused  # that one could change
    train(*resume, *lower)
    assert "Applied from step 2 on: --learning_rate: 0.001 -> 1e-05" in capsys.readouterr().out
    optimizer = torch.load(out / "checkpoint-4" / "optimizer.bin", weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == [1e-5]


def test_checkpoints_from_before_a_setting_was_added_renamed_or_retired(tmp_path):
    saved = {"seed": 0, "weighting_scheme": "logit_normal"}  # written before --stable_target_reference_size existed
    current = {**saved, "stable_target_reference_size": 0}
    assert setting_changes(saved, current) == ([], [])
    breaking, _ = setting_changes(saved, {**current, "stable_target_reference_size": 4096})
    assert breaking == ["--stable_target_reference_size: 0 -> 4096"]
    # train_ddpm.py's distillation checkpoints recorded the denoising settings and --distill_from too.
    saved = {"seed": 0, "distill_from": "teacher", "conditioning": "none", "immiscible_noise": False}
    assert setting_changes(saved, {"seed": 0, "pretrained_teacher_model": "teacher"}) == ([], [])
    # A run that trained with a retired lever on is refused in one line that says so.
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    state = {"train_minutes": 1.0, "num_processes": 1, "args": {**saved, "snr_gamma": 5.0}}
    (checkpoint / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"trained with --snr_gamma 5.0, a lever this version retired"):
        check_resume_settings(str(checkpoint), {"seed": 0}, 1)


@pytest.mark.slow
def test_one_run_at_a_time_per_output_dir_and_a_dead_run_frees_it(mnist_dir, tiny_unet_config, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.checkpoint import OutputDirLock; "
         f"lock = OutputDirLock({str(out)!r}); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    message = cli_error(capsys, *base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2"))
    assert "Another training run is writing to --output_dir" in message
    holder.kill()  # the OS drops a dead run's lock: no stale lock file blocks the next run
    holder.wait()
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2"))
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(mnist_dir, tiny_unet_config, tmp_path, capsys):
    out = tmp_path / "run"
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "6", "--checkpointing_steps", "3",
                     "--checkpoints_total_limit", "1", "--resume_from_checkpoint", str(out / "checkpoint-2")))  # fmt: skip
    assert "Set aside" in capsys.readouterr().out
    assert find_checkpoint(str(out)) == str(out / "checkpoint-6")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-6",
        "superseded-checkpoint-4",
    ]


def test_too_few_evaluation_samples_are_refused_before_training(mnist_dir, tiny_unet_config, tmp_path, capsys):
    args = base_args(mnist_dir, tiny_unet_config, tmp_path / "run", "--eval_epochs", "1", "--eval_num_samples", "3")
    assert "--eval_num_samples must be at least 4" in cli_error(capsys, *args)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_damaged_checkpoints_and_missing_files_are_one_line_without_unsafe_advice(
    mnist_dir, tiny_unet_config, tmp_path, capsys
):
    out = tmp_path / "run"
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    resume = base_args(
        mnist_dir, tiny_unet_config, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"
    )
    for name in ("scheduler.bin", "optimizer.bin"):
        saved = (out / "checkpoint-2" / name).read_bytes()
        (out / "checkpoint-2" / name).write_bytes(b"not a pickle at all")
        message = cli_error(capsys, *resume)
        assert "checkpoint-2 could not be loaded" in message and "weights_only" not in message.lower(), message
        (out / "checkpoint-2" / name).write_bytes(saved)
    shutil.rmtree(out / "checkpoint-2" / "unet_ema")
    assert "the EMA weights, is missing" in cli_error(capsys, *resume)
    missing = base_args(mnist_dir, tmp_path / "no" / "unet", tmp_path / "other")
    assert "no such file or folder" in cli_error(capsys, *missing)


@pytest.mark.slow
def test_damaged_weights_in_a_checkpoint_are_named_not_resumed_from_in_a_loop(
    mnist_dir, tiny_unet_config, tmp_path, capsys
):
    out = tmp_path / "run"
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    weights = out / "checkpoint-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4000:-3000] = b"\xff" * 1000  # NaN floats where weights were; the header still parses
    weights.write_bytes(bytes(data))
    resume = base_args(
        mnist_dir, tiny_unet_config, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"
    )
    message = cli_error(capsys, *resume)
    assert "checkpoint-2 holds weights that are not finite numbers: it is damaged" in message
    # Finite garbage (every weight times 1e30) diverges at the first step: the message points at the checkpoint.
    shutil.rmtree(out)
    train(*base_args(mnist_dir, tiny_unet_config, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    save_file({k: v * 1e30 for k, v in load_file(str(weights)).items()}, str(weights))
    message = cli_error(capsys, *resume)
    assert "the first step after resuming from" in message and "may be damaged" in message, message


def test_a_distillation_checkpoint_from_before_the_split_resumes_to_the_same_weights(
    real_mnist_dir, tmp_path, monkeypatch
):
    old = Path(__file__).parent / "data" / "distill_before_split"
    # The checkpoint records relative paths (tests/data/README.md): lay the folder out as it was made.
    shutil.copytree(real_mnist_dir, tmp_path / "mnist")
    shutil.copytree(old / "teacher", tmp_path / "teacher")
    shutil.copytree(old / "checkpoint-2", tmp_path / "out" / "checkpoint-2")
    monkeypatch.chdir(tmp_path)
    # train_distill.py continues it, the old --distill_from recorded as its --pretrained_teacher_model.
    distill(
        *("--dataset_name", "mnist", "--pretrained_teacher_model", "teacher", "--output_dir", "out"),
        *("--train_batch_size", "16"),
        *(
            "--eval_batch_size",
            "4",
            "--lr_warmup_steps",
            "2",
            "--mixed_precision",
            "no",
            "--save_images_epochs",
            "100",
        ),
        *("--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"),
        *("--resume_from_checkpoint", "latest"),
    )
    assert_same_weights(
        tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors", old / "final_unet.safetensors"
    )


@pytest.mark.slow
def test_sigterm_in_every_phase_of_a_run_stops_at_once_and_loses_no_step(
    mnist_dir, tiny_unet_config, tmp_path, monkeypatch, capsys
):
    from pipeline import training

    # 2 steps an epoch: the sample grids and scores of epochs 1 and 2 come before the end of the run at step 5.
    flags = ["--max_train_samples", "32", "--max_train_steps", "5", "--checkpointing_steps", "3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(*base_args(mnist_dir, tiny_unet_config, straight, *flags))
    save_outputs, load_data = train_ddpm.save_outputs, training.load_data

    def preempted(*args, **kwargs):  # the scheduler's SIGTERM lands while this runs
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the stop signal was ignored")

    def preempted_at_step(step):
        def outputs(run, pipeline, ema_model, record, end):
            if record["step"] == step:
                preempted()
            save_outputs(run, pipeline, ema_model, record, end)

        return outputs

    def run(*extra):
        args = train_ddpm.parse_args(base_args(mnist_dir, tiny_unet_config, stopped, *flags, *extra))
        with pytest.raises(SystemExit) as exit_info:
            cli(train_ddpm.main, args, "train_ddpm.py")
        assert exit_info.value.code == 128 + signal.SIGTERM
        return capsys.readouterr().out

    monkeypatch.setattr(training, "load_data", preempted)  # start-up: nothing to lose, one line, not a traceback
    assert "Stopped by SIGTERM before the first step of training; nothing was lost" in run()
    monkeypatch.setattr(training, "load_data", load_data)
    monkeypatch.setattr(train_ddpm, "save_outputs", preempted_at_step(2))  # an epoch's grid and scores: no waiting
    assert f"Stopped by SIGTERM at step 2; saved {stopped / 'checkpoint-2'}" in run()
    monkeypatch.setattr(train_ddpm, "save_outputs", preempted_at_step(5))  # the end of the run
    out = run("--resume_from_checkpoint", "latest")
    assert "Stopped by SIGTERM while writing the end-of-run outputs; checkpoint-5 holds all 5 steps" in out
    assert not (stopped / "model_index.json").exists()
    monkeypatch.setattr(train_ddpm, "save_outputs", save_outputs)
    train(*base_args(mnist_dir, tiny_unet_config, stopped, *flags, "--resume_from_checkpoint", "latest"))
    assert_same_weights(straight / FINAL[0], stopped / FINAL[0])
