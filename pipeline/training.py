"""What `train_ddpm.py` builds its loop from: atomic checkpoints, exact data order, EMA swaps, stop signals."""

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.training_utils import EMAModel

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
CHECKPOINT_CONFIG = "model_config.json"  # the model and scheduler configs a checkpoint was written with
TRAINING_STATE = "training_state.json"  # the settings it was written with, and the training minutes so far
# Settings a resumed run may change. The learning-rate schedule is rebuilt from the new ones, from the resume step on.
SCHEDULE_SETTINGS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "num_epochs", "max_train_steps")
# Settings added after checkpoints began to record theirs, with the value that the runs before them trained with.
ADDED_SETTINGS = {"stratified_timesteps": False, "stable_target_reference_size": 0}
# These touch no step's data, noise or update, or (precision, clipping) are what a diverged run needs changed.
FREE_SETTINGS = (
    "output_dir", "resume_from_checkpoint", "logger", "logging_dir", "save_images_epochs", "save_model_epochs",
    "eval_epochs", "eval_num_samples", "eval_split", "eval_batch_size", "checkpointing_steps",
    "checkpoints_total_limit", "push_to_hub", "hub_model_id", "hub_private_repo", "dataloader_num_workers",
    "cache_dir", "mixed_precision", "max_grad_norm",
)  # fmt: skip


def checkpoint_steps(output_dir: str) -> list[int]:
    """The steps of the complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m[1]) for d in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.fullmatch(d)))


def find_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    steps = checkpoint_steps(output_dir)
    return os.path.join(output_dir, f"checkpoint-{steps[-1]}") if steps else None


def checkpoint_step(path: str) -> int:
    """The step a `checkpoint-N` folder was saved at."""
    return int(CHECKPOINT_PATTERN.fullmatch(os.path.basename(os.path.normpath(path)))[1])


def as_saved(config: dict) -> dict:
    """A config as JSON stores it, without diffusers' private keys (version, class name, path)."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if not k.startswith("_")}


def check_same_config(saved: dict, current: dict, what: str) -> None:
    """Refuse to mix a saved model with a differently configured one."""
    saved, current = as_saved(saved), as_saved(current)
    diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here" for k in diff[:4])
        raise ValueError(
            f"{what} holds a differently configured model ({changes}). Train with the same "
            "--model_config_name_or_path / --prediction_type, or use a new --output_dir."
        )


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None, model_config: dict) -> str | None:
    """The checkpoint to resume from (None: a new run, also for "latest" before the first checkpoint), after checking
    that it and `output_dir` hold this model."""
    for component, file in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        saved = os.path.join(output_dir, component, file)
        if os.path.isfile(saved):
            with open(saved) as f:
                check_same_config(json.load(f), model_config[component], f"--output_dir {output_dir}")
    if resume_from_checkpoint is None:
        if find_checkpoint(output_dir):
            raise ValueError(
                f"--output_dir {output_dir} already holds {os.path.basename(find_checkpoint(output_dir))}. "
                "Continue it with --resume_from_checkpoint latest, or train into a new --output_dir."
            )
        return None
    if resume_from_checkpoint == "latest":
        path = find_checkpoint(output_dir)
        if path is None:
            return None
    else:
        path = resume_from_checkpoint
        if not os.path.isdir(path) or not CHECKPOINT_PATTERN.fullmatch(os.path.basename(os.path.normpath(path))):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {path!r} is not a checkpoint-N folder; "
                "use 'latest' or one of the checkpoint-N folders in --output_dir."
            )
    try:
        with open(os.path.join(path, CHECKPOINT_CONFIG)) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Checkpoint {path} is incomplete or corrupt ({e}).") from e
    for component in ("unet", "scheduler"):
        check_same_config(saved[component], model_config[component], f"Checkpoint {path}")
    return path


def setting_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """The settings that differ from a checkpoint's, as "name: old -> new": those that would break exact resumption,
    and the learning-rate schedule's, which a resumed run applies."""
    saved = {**ADDED_SETTINGS, **saved}
    changed = sorted(
        k for k in saved.keys() | current.keys() if k not in FREE_SETTINGS and saved.get(k) != current.get(k)
    )
    describe = {k: f"--{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed}
    breaking = [text for k, text in describe.items() if k not in SCHEDULE_SETTINGS]
    return breaking, [text for k, text in describe.items() if k in SCHEDULE_SETTINGS]


def read_training_state(checkpoint: str) -> dict | None:
    """What `training_state.json` holds, or None for a checkpoint written before it existed."""
    path = os.path.join(checkpoint, TRAINING_STATE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Checkpoint {checkpoint} is incomplete or corrupt ({e}).") from e


def check_resume_settings(checkpoint: str | None, settings: dict, num_processes: int) -> tuple[dict | None, list[str]]:
    """The checkpoint's training state, and the schedule changes to apply; refuses changes that break exactness.

    Checkpoints written before `training_state.json` existed are not compared."""
    state = read_training_state(checkpoint) if checkpoint is not None else None
    if state is None:
        return None, []
    breaking, schedule_changes = setting_changes(
        {**state["args"], "num_processes": state["num_processes"]}, {**settings, "num_processes": num_processes}
    )
    if breaking:
        raise ValueError(
            f"Checkpoint {checkpoint} was written with other settings ({'; '.join(breaking)}), so resuming would not "
            "continue that run. Resume with its settings, or train into a new --output_dir."
        )
    return state, schedule_changes


def set_aside_newer_checkpoints(output_dir: str, step: int) -> list[str]:
    """Rename the checkpoints after `step` to `superseded-checkpoint-N`, so that "latest" follows the resumed run."""
    moved = []
    for newer in [s for s in checkpoint_steps(output_dir) if s > step]:
        target = os.path.join(output_dir, f"superseded-checkpoint-{newer}")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(os.path.join(output_dir, f"checkpoint-{newer}"), target)
        moved.append(target)
    return moved


class OutputDirLock:
    """An exclusive lock on a training output folder, held while the process lives (the OS drops it if it dies)."""

    def __init__(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, ".train_ddpm.lock"), "w")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ValueError(
                f"Another training run is writing to --output_dir {output_dir}. Wait for it to end, or train into "
                "a new --output_dir."
            ) from None


def load_checkpoint(accelerator: Accelerator, path: str, weights: Callable[[], list[torch.Tensor]]) -> int:
    """`accelerator.load_state(path)`, with damaged files and non-finite loaded `weights()` named; the step."""
    try:
        accelerator.load_state(path)
    except Exception as e:  # safetensors, torch.load and json errors alike mean the files are damaged
        # torch.load's own advice (to unpickle with weights_only=False) is never the fix for a damaged file.
        detail = str(e).splitlines()[0] if "weights_only" not in str(e).lower() else "not a file torch can read safely"
        raise ValueError(
            f"Checkpoint {path} could not be loaded ({type(e).__name__}: {detail}). It is corrupt or incomplete: "
            "resume from an earlier checkpoint-N folder instead."
        ) from e
    if not all(torch.isfinite(w).all() for w in weights()):
        raise ValueError(
            f"Checkpoint {path} holds weights that are not finite numbers: it is damaged. Resume from an earlier "
            "checkpoint-N folder instead."
        )
    return checkpoint_step(path)


def remove_partial_checkpoints(output_dir: str) -> None:
    """Delete the half-written checkpoints of a run that was killed while saving."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith("partial-checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name))


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """`accelerator.save_state` into a temporary folder that becomes `checkpoint-{step}` only once complete."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = os.path.join(output_dir, f"partial-checkpoint-{step}")
    if accelerator.is_main_process:
        if os.path.exists(partial):
            shutil.rmtree(partial)  # left by a run that died while saving
        os.makedirs(partial)
    accelerator.wait_for_everyone()  # the folder exists before any process writes into it
    try:
        accelerator.save_state(partial)
        accelerator.wait_for_everyone()  # every process has written its part (each writes its own RNG state)
        if accelerator.is_main_process:
            for root, _, files in os.walk(partial):
                for name in files:
                    with open(os.path.join(root, name), "rb+") as f:
                        os.fsync(f.fileno())
    except OSError as e:  # disk full, quota, permissions: keep what was saved before, say what happened
        shutil.rmtree(partial, ignore_errors=True)
        earlier = find_checkpoint(output_dir)
        raise OSError(
            f"Could not write checkpoint-{step} in {output_dir} ({e.strerror or e}). "
            + (f"{os.path.basename(earlier)} is intact: " if earlier else "")
            + "free space or fix permissions, then resume with --resume_from_checkpoint latest."
        ) from e
    if accelerator.is_main_process:
        if os.path.exists(final):  # resumed from an earlier checkpoint and reached this step again
            shutil.rmtree(final)
        os.replace(partial, final)  # atomic: `latest` never sees a half-written checkpoint
        dir_fd = os.open(output_dir, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        if total_limit is not None:
            for old in checkpoint_steps(output_dir)[:-total_limit]:
                shutil.rmtree(os.path.join(output_dir, f"checkpoint-{old}"))
    accelerator.wait_for_everyone()
    return final


def use_plain_attention(model: torch.nn.Module, device: torch.device) -> None:
    """On CPU, swap scaled_dot_product_attention for the plain matmul-softmax processor.

    PyTorch's CPU flash-attention backward is slow on short bf16 sequences such as 7x7 = 49 tokens (docs/speed.md)."""
    if device.type == "cpu":
        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())


def device_name(device: torch.device) -> str:
    """The processor a run trained on, for its model card: the GPU's name, or the CPU's and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def seed_for(*keys: int) -> int:
    """A well-mixed seed derived from integers, so every step's randomness is a pure function of (seed, step)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def epoch_permutation(num_images: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The data order of an epoch, a function of (seed, epoch) alone, so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed_for(seed, 0, epoch))
    return torch.randperm(num_images, generator=generator).to(device)


def micro_batch_slice(
    step_in_epoch: int, micro_step: int, accumulation_steps: int, num_processes: int, process_index: int, size: int
) -> slice:
    """Where a process's micro-batch lies in the epoch's permutation: every image once per epoch, across all ranks."""
    start = ((step_in_epoch * accumulation_steps + micro_step) * num_processes + process_index) * size
    return slice(start, start + size)


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema_model: EMAModel | None) -> Iterator[None]:
    """Temporarily swap the EMA weights into `model` (no-op without EMA)."""
    if ema_model is None:
        yield
        return
    ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield
    finally:
        ema_model.restore(model.parameters())


class StopSignals:
    """Records SIGTERM (preemption) and SIGINT (Ctrl-C) so that training can checkpoint and stop at a step's end.

    A second signal acts at once, the default way."""

    def __init__(self) -> None:
        self.received: list[int] = []
        signal.signal(signal.SIGTERM, self._record)
        signal.signal(signal.SIGINT, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


class TrainingClock:
    """Minutes of training, without the pauses spent sampling, scoring and saving; a resumed run starts from the
    minutes its checkpoint recorded."""

    def __init__(self) -> None:
        self.start()

    def start(self, minutes_before: float = 0.0) -> None:
        """Start counting, from the minutes an earlier run recorded."""
        self.started, self.pauses = time.perf_counter() - 60 * minutes_before, 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.pauses += time.perf_counter() - started

    def minutes(self) -> float:
        """Training minutes so far."""
        return (time.perf_counter() - self.started - self.pauses) / 60
