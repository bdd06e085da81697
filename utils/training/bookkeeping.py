"""What fit() keeps besides the weights: the best validation and early stopping, the record
of the run (metrics.jsonl, callbacks), the checkpoints, and when and why a run ends."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tsr.files import append_text
from utils.training.checkpoint import capture_rng_states, save_checkpoint, trainable_state
from utils.training.config import HIGHER_IS_BETTER, TrainConfig
from utils.training.distributed import agree


class BestWeights:
    """The best validation so far and early stopping: which weights a run ends on.

    state: {"step", "value", "trainable"} of the best validation (saved in checkpoints, so a
    resumed run still restores and stops by it)."""

    def __init__(self, metric: str, patience: int, state: dict | None = None):
        self.metric, self.patience, self.state, self.stale = metric, patience, state, 0

    def is_better(self, value: float) -> bool:
        if self.state is None:
            return True
        if self.metric in HIGHER_IS_BETTER:
            return value > self.state["value"]
        return value < self.state["value"]

    def update(self, record: dict | None, step: int, model: torch.nn.Module, world: int) -> bool:
        """Keep the weights if `record` (rank 0's; None elsewhere) is the best so far. Call on
        every rank. -> True when patience has run out."""
        improved = record is not None and self.is_better(record[self.metric])
        stop = not improved and self.patience > 0 and self.stale + 1 >= self.patience
        improved, stop = agree((improved, stop), world)
        if improved:
            value = record[self.metric] if record is not None else None
            self.state = {"step": step, "value": value, "trainable": trainable_state(model)}
        self.stale = 0 if improved else self.stale + 1
        return stop

    def stopping_message(self, step: int) -> str:
        return (
            f"early stop at step {step}: {self.metric} has not improved for {self.patience} "
            f"validations (best at step {self.step})"
        )

    @property
    def step(self) -> int | None:
        return None if self.state is None else self.state["step"]

    def restore(self, model: torch.nn.Module, step: int) -> None:
        """Put the best validation's weights back (unless they are the current ones)."""
        if self.state is None or self.state["step"] == step:
            return
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self.state["trainable"]:
                    parameter.copy_(self.state["trainable"][name])


class RunLog:
    """Where every record goes: the history, metrics.jsonl and the callbacks (rank 0)."""

    def __init__(self, path: Path, callbacks: Sequence[Any], is_main: bool):
        self.path, self.callbacks, self.is_main, self.history = path, callbacks, is_main, []

    def __call__(self, record: dict, event: str) -> None:
        self.history.append(record)
        if self.is_main:
            append_text(self.path, json.dumps(record) + "\n")
            self.event(event, record["step"], record)

    def event(self, event: str, *args) -> None:
        for callback in self.callbacks:
            if hasattr(callback, event):
                getattr(callback, event)(*args)


class Checkpoints:
    """<run>/checkpoints/last.pt, replaced at every save; remembers the steps saved."""

    def __init__(self, path: Path, world: int, is_main: bool, resumed_step: int | None):
        self.path, self.world, self.is_main = path, world, is_main
        self.saved = [] if resumed_step is None else [resumed_step]

    def save(self, step, model, optimizer, scheduler, generator, settings, best) -> None:
        states = [capture_rng_states(generator)]
        if self.world > 1:  # every rank's sampler state, so each resumes its own stream
            states = [None] * self.world
            dist.all_gather_object(states, capture_rng_states(generator))
        if self.is_main:
            save_checkpoint(self.path, model, optimizer, scheduler, step, states, settings, best)
        self.saved.append(step)

    def last(self) -> str:
        return f"{self.path} (step {self.saved[-1]})" if self.saved else "none yet"


def refuse_non_finite(sums: dict, grad_norm: float, step: int, checkpoints) -> None:
    """Stop on a non-finite loss or gradient, before it reaches the weights."""
    if math.isfinite(sums["loss"]) and math.isfinite(grad_norm):
        return
    raise FloatingPointError(
        f"non-finite loss {sums['loss']} / grad norm {grad_norm} at step {step + 1}: "
        f"training stopped. The last good checkpoint is {checkpoints.last()}; resume "
        "from it with a lower --lr, or check the data of this step"
    )


def run_ending(
    step: int, total_steps: int, seconds: float, config: TrainConfig, world
) -> str | None:
    """Whether the run ends after this step, and why: its last step, or its time budget spent
    after `seconds` of it (rank 0's clock decides for every rank, so all stop at the same step)."""
    if step == total_steps:
        return "max_steps"
    if config.time_budget_s is None:
        return None
    spent = seconds >= config.time_budget_s
    return "time_budget" if agree((spent, spent), world)[0] else None


def ending_message(stopped_by: str, step: int, total_steps: int, config, best) -> str | None:
    """The line a run that ended before its last step prints."""
    if stopped_by == "early_stopping":
        return best.stopping_message(step)
    if stopped_by != "time_budget":
        return None
    weights = "the last step's"
    if config.restore_best and best.step is not None:
        weights = f"those of step {best.step}, the best validation"
    return (
        f"time budget of {config.time_budget_s:g} s spent at step {step} of {total_steps}: "
        f"stopped after a final validation; the weights kept are {weights}"
    )
