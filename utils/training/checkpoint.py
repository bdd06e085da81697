"""Training checkpoints (trainable weights, optimiser, scheduler, step, RNG states) and the
run folder's bookkeeping files.

A checkpoint holds exactly what `fit` needs to continue as if never stopped, so a run
interrupted and resumed ends with the same weights as an uninterrupted one. Files are
written atomically (temporary file in the same folder, then `os.replace`): a crash while
saving leaves the previous checkpoint intact, never a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_NAME = "last.pt"  # <run>/checkpoints/last.pt, replaced at every save


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained (adapter weights in LoRA mode), by name, on the CPU."""
    return {
        name: param.detach().cpu().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file next to `path`, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):  # only when saving failed before the rename
            os.remove(temporary)
    return path


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
    config: dict[str, Any],
    best: dict[str, Any] | None = None,
) -> Path:
    """Everything needed to continue training after `step` optimiser steps.

    `best`: the best validation so far ({"step", "value", "trainable"}), so a resumed run
    still restores and stops by it."""
    return atomic_save(
        {
            "step": step,
            "best": best,
            "trainable": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states_per_rank,  # one entry per DDP rank, rank order
            "config": config,
        },
        path,
    )


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (weights_only: no code is unpickled)."""
    path = Path(path)
    if path.is_dir():  # a run folder or its checkpoints folder
        candidates = [path / "checkpoints" / CHECKPOINT_NAME, path / CHECKPOINT_NAME]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: pass a run folder or a .pt written by fit(), "
            "or start without --resume"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


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
    if set(saved) != set(trainable):
        missing, unexpected = (
            sorted(set(trainable) - set(saved)),
            sorted(set(saved) - set(trainable)),
        )
        raise ValueError(
            "checkpoint does not fit the model's trainable parameters "
            f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...): resume with the same "
            "train_mode, LoRA rank and targets as the interrupted run"
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


def start_run_folder(run_dir: Path, resolved_config: dict[str, Any], resume_step: int) -> Path:
    """Write <run>/config.json; start metrics.jsonl afresh, or, resuming, keep its records up
    to the checkpoint's step and drop those of steps that are about to be redone.
    -> the metrics.jsonl path"""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(resolved_config, indent=2, default=str))
    metrics_path = run_dir / "metrics.jsonl"
    kept = []
    if resume_step and metrics_path.is_file():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
        kept = [record for record in records if record["step"] <= resume_step]
    metrics_path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    return metrics_path
