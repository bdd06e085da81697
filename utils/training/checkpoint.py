"""Training checkpoints (trainable weights, optimiser, scheduler, step, RNG states) and the
run folder's bookkeeping files: the settings a run records and a resume must match.

A checkpoint holds exactly what `fit` needs to continue as if never stopped, so a run
interrupted and resumed ends with the same weights as an uninterrupted one. Files are
written atomically (`tsr.files`): a crash or a full disk while saving leaves the previous
checkpoint intact, never a half-written one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsr.errors import UserInputError, brief
from tsr.files import save_torch, write_text
from tsr.model import TSR
from utils.training import lora
from utils.training.config import TrainConfig

CHECKPOINT_NAME = "last.pt"  # <run>/checkpoints/last.pt, replaced at every save
CHECKPOINT_KEYS = {"step", "trainable", "optimizer", "scheduler", "rng", "config"}
# Settings a resumed run may change: how long it goes on, how often it looks and saves, how it
# saves memory and which weights it ends on. Any other change would be recorded in config.json
# yet not reach the optimiser's restored state (lr) or break what was learnt (rank), so it is
# refused.
CHANGEABLE_ON_RESUME = {
    "resume_from", "max_steps", "epochs", "val_every", "checkpoint_every", "mesh_every",
    "early_stopping_patience", "restore_best", "grad_checkpointing", "progress",
}  # fmt: skip


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (adapter weights in LoRA mode), by name, on the CPU."""
    return {
        name: param.detach().cpu().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def capture_rng_states(data_generator: torch.Generator) -> dict[str, Any]:
    """This process's random states: the ones the training loop draws from. torch's global
    CPU and CUDA generators (LoRA dropout) and the data generator (rays, patches); object
    order and supervision views are pure functions of (seed, step) and need no state."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": data_generator.get_state(),
    }


def restore_rng_states(states: dict[str, Any], data_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    data_generator.set_state(states["data"])


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    rng_states_per_rank: list[dict[str, Any]],
    settings: dict[str, Any],
    best: dict[str, Any] | None = None,
) -> Path:
    """Everything needed to continue training after `step` optimiser steps.

    `settings`: the run's settings (TrainConfig fields, the LoRA settings, the supervision
    views), so a resume with other settings is refused by name (`resume_conflicts`) instead
    of failing on a shape or training on silently. `best`: the best validation so far
    ({"step", "value", "trainable"}), so a resumed run still restores and stops by it."""
    state = {
        "step": step,
        "best": best,
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states_per_rank,  # one entry per DDP rank, rank order
        "config": settings,
    }
    return save_torch(state, path)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint a --resume path means: the file itself, or the one in a run folder."""
    path = Path(path)
    if path.is_dir():  # a run folder or its checkpoints folder
        candidates = [path / "checkpoints" / CHECKPOINT_NAME, path / CHECKPOINT_NAME]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise UserInputError(
            "no checkpoint there", path,
            "pass a run folder or a .pt written by fit(), or start without --resume",
        )  # fmt: skip
    return path


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (weights_only: no code is unpickled).
    `mmap`: map the tensors instead of reading them (to look at the settings only)."""
    path = checkpoint_file(path)
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # not a zip file: read it whole, for a readable old format or the real error
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file raises anything from EOFError to IndexError
        raise UserInputError(
            f"not a readable checkpoint ({brief(error)})", path,
            "it is damaged or was not written by fit(): resume from another run's "
            "checkpoints/last.pt, or start afresh without --resume",
        ) from error  # fmt: skip
    missing = CHECKPOINT_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise UserInputError(
            f"not a training checkpoint (no {', '.join(sorted(missing))})", path,
            "pass a checkpoints/last.pt written by fit(), or start without --resume",
        )  # fmt: skip
    checkpoint["path"] = str(path)  # for the messages of restore_checkpoint
    return checkpoint


def resume_conflicts(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """The settings of a resumed run that differ from its checkpoint's and that it cannot
    change: 'lr 0.0001 -> 0.01', 'lora.r 4 -> 8'. `saved` and `wanted` as checkpoints record
    them (`run_settings`); settings one of them lacks (older checkpoints) are not compared."""
    found = []
    for name in sorted(set(saved) & set(wanted) - (set() if prefix else CHANGEABLE_ON_RESUME)):
        old, new = saved[name], wanted[name]
        if isinstance(old, dict) and isinstance(new, dict):
            found += resume_conflicts(old, new, f"{prefix}{name}.")
        elif old != new:
            found.append(f"{prefix}{name} {old!r} -> {new!r}")
    return found


def refuse_resume_conflicts(saved: dict[str, Any], wanted: dict[str, Any], checkpoint) -> None:
    """One UserInputError naming every setting a resume would change but cannot."""
    conflicts = resume_conflicts(saved, wanted)
    if conflicts:
        raise UserInputError(
            "resuming with settings other than the run's: " + ", ".join(conflicts), checkpoint,
            "leave those flags out to continue the run as it was, or start a new run "
            "(another --run_name) to change them",
        )  # fmt: skip


def restore_checkpoint(
    checkpoint: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_generator: torch.Generator,
    rank: int = 0,
) -> int:
    """Put a checkpoint's state back into live objects; returns the step it was taken at."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = checkpoint["trainable"]
    misshaped = [
        f"{name} {tuple(saved[name].shape)} vs {tuple(param.shape)}"
        for name, param in trainable.items()
        if name in saved and saved[name].shape != param.shape
    ]
    if set(saved) != set(trainable) or misshaped:
        missing, unexpected = (
            sorted(set(trainable) - set(saved)),
            sorted(set(saved) - set(trainable)),
        )
        raise UserInputError(
            "the checkpoint does not fit the model's trainable weights (missing "
            f"{missing[:2]}, unexpected {unexpected[:2]}, other shapes {misshaped[:2]})",
            checkpoint.get("path", "the checkpoint"),
            "resume with the train_mode, LoRA rank (--r) and targets of the interrupted run",
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    states = checkpoint["rng"]
    if rank >= len(states):
        warnings.warn(
            f"checkpoint has RNG states for {len(states)} processes, this is rank {rank}: "
            "reusing another rank's; the run continues but not bit for bit",
            stacklevel=2,
        )
    restore_rng_states(states[rank % len(states)], data_generator)
    return int(checkpoint["step"])


# What fit() writes into a run folder: a folder holding any of them holds a run
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "checkpoints", "adapter", "model")


def start_afresh(run_dir: Path, overwrite: bool, remove: bool = True) -> None:
    """Make sure a fresh run loses no earlier one: refuse a folder that holds a run, or with
    `overwrite` remove that run's files (only those: the folder may hold other things).
    `remove`: False on all DDP ranks but one, which check alike but leave the removing."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not overwrite:
        raise UserInputError(
            f"this folder already holds a run ({', '.join(found)})", run_dir,
            "continue it with --resume, choose another --run_name, or pass --overwrite to "
            "replace it",
        )  # fmt: skip
    for name in found if remove else ():
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def start_run_folder(run_dir: Path, resolved_config: dict[str, Any], resume_step: int) -> Path:
    """Write <run>/config.json; start metrics.jsonl afresh, or, resuming, keep its records up
    to the checkpoint's step and drop those of steps that are about to be redone.
    -> the metrics.jsonl path"""
    write_text(run_dir / "config.json", json.dumps(resolved_config, indent=2, default=str))
    metrics_path = run_dir / "metrics.jsonl"
    kept = []
    if resume_step and metrics_path.is_file():
        try:
            records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        except json.JSONDecodeError as error:
            raise UserInputError(
                f"a line that is not JSON ({error})", metrics_path,
                "remove that line (a record cut short), then resume again",
            ) from error  # fmt: skip
        kept = [record for record in records if record["step"] <= resume_step]
    write_text(metrics_path, "".join(json.dumps(record) + "\n" for record in kept))
    return metrics_path


def resume(model, optimizer, scheduler, generator, settings: dict, config, rank: int) -> tuple:
    """Load the checkpoint config.resume_from names, refusing changed settings (recorded and
    ignored would be worse). -> (its step, its best validation state)"""
    checkpoint = load_checkpoint(config.resume_from)
    refuse_resume_conflicts(checkpoint["config"], settings, checkpoint["path"])
    step = restore_checkpoint(checkpoint, model, optimizer, scheduler, generator, rank)
    return step, checkpoint.get("best")


def run_settings(model: TSR, config: TrainConfig, train_dataset) -> dict:
    """What a checkpoint records and a resumed run must match: the config, the base model, the
    LoRA settings and the training data: the supervision views per object (fine_tuning.py's --views) and
    which objects, in order (another --input_folder or split would train on other data)."""
    ids = getattr(train_dataset, "object_ids", None)
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12] if ids else None
    return {
        **dataclasses.asdict(config),
        "base_model": getattr(model, "source", None),  # a shipped name, folder or Hub id
        "lora": lora.lora_settings(model),
        "supervision_views": getattr(train_dataset, "n_supervision_views", None),
        "train_objects": f"{len(ids)} objects, ids sha256 {digest}" if ids else None,
    }


def resolved_config(model: TSR, config: TrainConfig, setup, n_objects, world) -> dict:
    """config.json: the config as run, with everything fit() chose itself."""
    return {
        **dataclasses.asdict(config), "max_steps": setup.total_steps, "world_size": world,
        "grad_checkpointing": setup.grad_checkpointing, "bf16_autocast": setup.use_bf16,
        "occupancy_level": setup.occupancy_level, "n_train_objects": n_objects,
        "lora": lora.trainable_parameter_report(model),
        "model_source": getattr(model, "source", None), "model_config": model.config.to_dict(),
    }  # fmt: skip
