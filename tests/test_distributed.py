"""Several processes and machines: the data sharding, the shared random draws, and two "machines" on loopback."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_same_weights, base_args, train

from pipeline import create_model_and_scheduler
from pipeline.loss import DiffusionLoss
from pipeline.training import micro_batch_slice


@pytest.mark.parametrize("num_processes", [1, 2, 3])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_every_image_once_per_epoch_across_ranks(num_processes, accumulation_steps):
    num_images, size = 100, 4
    steps_per_epoch = num_images // (size * accumulation_steps * num_processes)
    seen = [
        i
        for step in range(steps_per_epoch)
        for micro_step in range(accumulation_steps)
        for rank in range(num_processes)
        for i in range(num_images)[micro_batch_slice(step, micro_step, accumulation_steps, num_processes, rank, size)]
    ]
    assert len(seen) == len(set(seen)) == steps_per_epoch * size * accumulation_steps * num_processes
    assert set(seen) == set(range(len(seen)))  # the leading images of the epoch's permutation, none twice


def test_shards_of_a_global_batch_draw_what_one_process_draws():
    _, scheduler = create_model_and_scheduler()
    inputs = []

    class Recorder(torch.nn.Module):
        def forward(self, noisy, timesteps, class_labels=None):
            inputs.append((noisy, timesteps, class_labels))
            return type("Output", (), {"sample": noisy})

    loss = DiffusionLoss(scheduler, "logit_normal", condition_dropout=0.5)
    images, labels = torch.randn(6, 1, 28, 28), torch.arange(6)
    null = {"class_labels": torch.tensor(10)}
    loss(Recorder(), images, torch.Generator().manual_seed(0), {"class_labels": labels}, null)
    for rank in range(3):
        part = slice(2 * rank, 2 * rank + 2)
        condition = {"class_labels": labels[part]}
        loss(Recorder(), images[part], torch.Generator().manual_seed(0), condition, null, shard=(rank, 3))
    whole, shards = inputs[0], inputs[1:]
    for i in range(3):
        torch.testing.assert_close(torch.cat([s[i] for s in shards]), whole[i], rtol=0, atol=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_train_what_one_process_trains(mnist_dir, tiny_unet_config, tmp_path):
    flags = ["--num_epochs", "2", "--checkpointing_steps", "4", "--mixed_precision", "no", "--lr_warmup_steps", "2"]
    # Adam scales every step to the learning rate, so rounding noise in a gradient that is zero in exact arithmetic
    # (a convolution's bias before GroupNorm) becomes a full step; epsilon 1 keeps steps proportional to gradients.
    flags += ["--adam_epsilon", "1"]
    # Stable targets are on (the default): every process must draw the same reference digits.
    # One process, global batch 32.
    single = tmp_path / "single"
    train(*base_args(mnist_dir, tiny_unet_config, single, *flags, "--train_batch_size", "32"))
    # Two "machines" on loopback, one process each, 16 images each: the same global batch. The output folder is the
    # one storage they share (docs/distributed.md); each has its own working directory.
    shared, port = tmp_path / "shared", free_port()
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    nodes = []
    for rank in (0, 1):
        workdir = tmp_path / f"node{rank}"
        workdir.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   str(ROOT / "train_ddpm.py"), *base_args(mnist_dir, tiny_unet_config, shared, *flags)]  # fmt: skip
        nodes.append(
            subprocess.Popen(
                command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "Saved the pipeline" in outputs[0] and "Saved the pipeline" not in outputs[1]
    for name in ("unet/diffusion_pytorch_model.safetensors", "checkpoint-8/model.safetensors"):
        assert_same_weights(shared / name, single / name)
    # Rank 1 wrote only its own random state into the checkpoints, and nothing into its working directory.
    files = lambda root: {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "logs" not in p.parts}  # noqa: E731
    extra = {f"checkpoint-{s}/random_states_1.pkl" for s in (4, 8)}
    assert files(shared) == files(single) | extra
    assert not any((tmp_path / "node1").iterdir())


@pytest.mark.slow
def test_gpu_check_runs_in_dry_run_mode(mnist_dir, tiny_unet_config, tiny_pipeline, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    tiny_pipeline.save_pretrained(tmp_path / "model")
    out = tmp_path / "gpu_check.json"
    train_args = f"--model_config_name_or_path {tiny_unet_config} --train_batch_size 16 --max_train_steps 2"
    train_args += " --eval_batch_size 4 --stable_target_reference_size 256"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry_run", "--dataset_name", str(mnist_dir), "--model",
                                      str(tmp_path / "model"), "--num_images", "4", "--train_args", train_args,
                                      "--out", str(out)])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main()
    assert exit_info.value.code == 0
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["dry_run"] and report["sample"]["num_images"] == 4
    assert report["train_one_epoch_eager"]["exit_code"] == 0


@pytest.mark.slow
def test_a_machine_that_dies_stops_the_job_in_one_line_and_the_job_resumes_exactly(
    mnist_dir, tiny_unet_config, tmp_path
):
    flags = ["--num_epochs", "3", "--checkpointing_steps", "2", "--mixed_precision", "no", "--adam_epsilon", "1"]
    reference = tmp_path / "reference"
    train(*base_args(mnist_dir, tiny_unet_config, reference, *flags, "--train_batch_size", "32"))
    shared, env = tmp_path / "shared", dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")

    def launch(port: int) -> list[subprocess.Popen]:
        return [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    "2",
                    "--nproc_per_node",
                    "1",
                    "--node_rank",
                    str(rank),
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(port),
                    str(ROOT / "train_ddpm.py"),
                    *base_args(mnist_dir, tiny_unet_config, shared, *flags),
                    "--resume_from_checkpoint",
                    "latest",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )  # fmt: skip
            for rank in (0, 1)
        ]

    def process_tree(pid: int) -> list[int]:
        parents = {}  # pid -> parent pid, from /proc (field 4 of stat, after the parenthesised name)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue  # ended meanwhile
        children = [child for child, parent in parents.items() if parent == pid]
        return [pid] + [p for child in children for p in process_tree(child)]

    nodes = launch(free_port())
    deadline = time.time() + 300
    while not (shared / "checkpoint-2").exists() and time.time() < deadline:
        time.sleep(0.05)
    for pid in process_tree(nodes[1].pid):  # the whole second machine: its launcher and its worker
        os.kill(pid, signal.SIGKILL)
    output = nodes[0].communicate(timeout=60)[0]  # no hang: the dead peer is noticed at its next collective
    assert nodes[0].returncode != 0 and "rank 0 lost contact with the other processes of the job" in output
    nodes[1].wait()
    nodes = launch(free_port())
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:]
    assert_same_weights(shared / "unet" / "diffusion_pytorch_model.safetensors",
                        reference / "unet" / "diffusion_pytorch_model.safetensors")  # fmt: skip
