"""Atomic checkpoints and what resuming checks: the run's lineage, its model config and settings, one writer."""

import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable

import torch
from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
CHECKPOINT_CONFIG = "model_config.json"  # the model and scheduler configs a checkpoint was written with
TRAINING_STATE = "training_state.json"  # the settings it was written with, and the training minutes so far
# Settings a resumed run may change. The learning-rate schedule is rebuilt from the new ones, from the resume step on.
SCHEDULE_SETTINGS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "num_epochs", "max_train_steps")
# Settings added after checkpoints began to record theirs, with the value that the runs before them trained with.
ADDED_SETTINGS = {"stable_target_reference_size": 0}
# Settings retired with the levers that lost (experiments/LOG.md), with the value that meant "off": a run that had
# them off resumes exactly; one that had them on cannot be continued by this code.
RETIRED_SETTINGS = {
    "immiscible_noise": False, "snr_gamma": None, "stratified_timesteps": False, "mode_scale": 1.29,
    "logit_mean": 0.0, "logit_std": 1.0, "distribution_matching_weight": 0.0, "fake_score_learning_rate": 1e-4,
    "fake_score_updates": 1,
}  # fmt: skip
# Settings renamed when distillation moved to train_distill.py (diffusers' names).
RENAMED_SETTINGS = {"distill_from": "pretrained_teacher_model"}
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
        if component in model_config and os.path.isfile(saved):
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
    for component, config in model_config.items():
        check_same_config(saved.get(component, {}), config, f"Checkpoint {path}")
    return path


def setting_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """The settings that differ from a checkpoint's, as "name: old -> new": those that would break exact resumption,
    and the learning-rate schedule's, which a resumed run applies. Only this script's settings are compared (a
    distillation checkpoint of `train_ddpm.py` recorded the denoising ones too)."""
    saved = {**ADDED_SETTINGS, **{RENAMED_SETTINGS.get(k, k): v for k, v in saved.items()}}
    changed = sorted(k for k in current if k not in FREE_SETTINGS and saved.get(k) != current[k])
    describe = {k: f"--{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed}
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
    retired = [f"--{k} {v}" for k, v in state["args"].items() if k in RETIRED_SETTINGS and v != RETIRED_SETTINGS[k]]
    if retired:
        raise ValueError(
            f"Checkpoint {checkpoint} trained with {', '.join(retired)}, a lever this version retired "
            "(experiments/LOG.md), so it cannot be continued exactly: resume it with mnist-diffusion 0.1.0, or train "
            "into a new --output_dir."
        )
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

    def release(self) -> None:
        """Let other runs write to the folder."""
        self.file.close()


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
