"""One training loop for LoRA fine-tuning and full training: `fit(model, dataset, config)`.

Each step conditions on view 0 of `batch_size` objects and supervises rays (or patches)
sampled from their other views. The loop is flat stanzas in nanoGPT's order: data ->
forward/backward (x grad_accum_steps) -> DDP gradient average -> finite check -> clip ->
optimiser and scheduler step -> log -> validate -> checkpoint. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tsr.model import TSR
from utils.data.dataset import sample_patches, sample_rays
from utils.evaluation.validate import validate
from utils.training import adapters
from utils.training.bookkeeping import (
    BestWeights,
    Checkpoints,
    RunLog,
    ending_message,
    refuse_non_finite,
    run_ending,
)
from utils.training.checkpoint import (
    CHECKPOINT_NAME,
    resolved_config,
    resume,
    run_settings,
    start_afresh,
    start_run_folder,
)
from utils.training.config import TrainConfig
from utils.training.curves import plot_loss_curves
from utils.training.distributed import all_reduce_mean, distributed, objects_for
from utils.training.losses import load_lpips, occupancy_losses, render_loss
from utils.training.setup import Setup, optimiser, prepare


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimiser steps done in total (including those before a resume)
    history: list[dict]  # every metrics record of this run (train and validation)
    artefact: Path | None  # the adapter folder (lora) or model folder (full); None on ranks > 0
    best_step: int | None = None  # the validation whose weights the artefact holds
    stopped_by: str = "max_steps"  # what ended it: "max_steps", "early_stopping", "time_budget"


SURFACE_BAND = 0.05  # labelled points this close to the surface supervise its colour


def _micro_batch(dataset, micro_batch: int, config: TrainConfig, rank: int, world: int) -> list:
    """The items of one micro-batch of this rank."""
    epoch, indices = objects_for(micro_batch, len(dataset), config, rank, world)
    if hasattr(dataset, "set_epoch"):  # other supervision views every epoch
        dataset.set_epoch(epoch)
    return [dataset[i] for i in indices]


def _supervision(item: dict, config: TrainConfig, generator: torch.Generator) -> dict:
    """Rays (N, ...) or patches (P, S, S, ...) with targets, never whole images."""
    if config.sampling == "rays":
        return sample_rays(item, config.rays_per_object, generator)
    n_patches = max(1, config.rays_per_object // config.patch_size**2)
    return sample_patches(item, n_patches, config.patch_size, generator, config.object_bias)


def _object_losses(
    model: TSR, scene_code: torch.Tensor, item: dict, config: TrainConfig, setup: Setup,
    generator: torch.Generator, lpips_network,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """One object's loss terms: rendered rays or patches against its views, then the 3D
    terms on its labelled points. -> {"loss": weighted total, "loss_<term>": detached}"""
    terms = {"loss": scene_code.new_zeros((), dtype=torch.float32)}
    if config.rays_per_object > 0:
        target = {k: v.to(setup.device) for k, v in _supervision(item, config, generator).items()}
        rendered = model.render_rays(scene_code, target["rays_o"], target["rays_d"])
        terms = render_loss(rendered, target, config.loss_weights(), lpips_network)
        terms["loss_render"] = terms["loss"].detach()  # what validation measures too
    if config.lambda_occupancy > 0 and "occupancy_points" in item:
        points = occupancy_losses(
            model, scene_code, item, config.occupancy_points, setup.occupancy_level, generator,
            config.occupancy_sdf_scale, SURFACE_BAND if config.lambda_surface_colour > 0 else 0.0,
        )  # fmt: skip
        terms["loss"] = terms["loss"] + config.lambda_occupancy * points["occupancy"]
        if "surface_colour" in points:
            terms["loss"] = terms["loss"] + config.lambda_surface_colour * points["surface_colour"]
        terms.update({f"loss_{k}": v.detach() for k, v in points.items()})
    return terms


def _add_means(sums: dict[str, float], losses: list[dict], n_micro_batches: int) -> None:
    """Add this micro-batch's share of the step's mean of every logged term."""
    for terms in losses:
        for key, value in terms.items():
            share = float(value.detach()) / (len(losses) * n_micro_batches)
            sums[key] = sums.get(key, 0.0) + share


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _forward_backward(model, dataset, step, config, setup, rank, world, generator, lpips) -> dict:
    """Gradients of one optimiser step, over its micro-batches. -> the step's mean loss terms"""
    sums: dict[str, float] = {}
    for accumulation in range(config.grad_accum_steps):
        micro_batch = step * config.grad_accum_steps + accumulation
        items = _micro_batch(dataset, micro_batch, config, rank, world)
        losses = _forward(model, items, config, setup, generator, lpips)
        loss = torch.stack([terms["loss"] for terms in losses]).mean()
        (loss / config.grad_accum_steps).backward()
        _add_means(sums, losses, config.grad_accum_steps)
    return sums


def _validate(model: TSR, dataset, config: TrainConfig) -> dict[str, float]:
    """Validation measures the training's render loss (no LPIPS: its rays are no patches)."""
    weights = config.loss_weights()
    return validate(
        model, dataset, config.val_objects, config.val_rays_per_view,
        lambda rendered, target: render_loss(rendered, target, weights)["loss"],
    )  # fmt: skip


def _validation(model, dataset, config, step, log: RunLog, best: BestWeights, world) -> bool:
    """Validate on rank 0, log it, track the best weights on every rank. -> stop early"""
    record = {"step": step, **_validate(model, dataset, config)} if log.is_main else None
    if log.is_main:
        log(record, "on_validation")
    return best.update(record, step, model, world)


def _save_artefact(model, config: TrainConfig, run_dir: Path, step: int, best_step, stopped_by):
    """The adapter (lora, peft format) or the whole model (full), and loss.png. -> its path"""
    extra = {
        "train_config": dataclasses.asdict(config), "steps": step, "best_step": best_step,
        "stopped_by": stopped_by,
    }  # fmt: skip
    if config.train_mode == "lora":
        artefact = adapters.save_adapter(model, run_dir / "adapter", extra_metadata=extra)
    else:
        artefact = model.save_pretrained(run_dir / "model")
    if (run_dir / "metrics.jsonl").stat().st_size:
        plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return artefact


def _lpips(config: TrainConfig, setup, rank: int):
    """The LPIPS network when the recipe weighs it (None otherwise or when unavailable)."""
    if config.lambda_lpips <= 0:
        return None
    return load_lpips(setup.device, config.sampling == "patches", verbose=rank == 0)


def _forward(model: TSR, items: list, config, setup, generator, lpips_network) -> list[dict]:
    """One micro-batch: condition on the items' view 0 (bf16 autocast on CUDA), then each
    object's loss terms."""
    cond = torch.stack([item["cond_image"] for item in items]).to(setup.device)  # (B,H,W,3)
    with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.use_bf16):
        scene_codes = model.encode(cond)  # (B, 3, C, 2P, 2P)
        return [
            _object_losses(model, code, item, config, setup, generator, lpips_network)
            for code, item in zip(scene_codes, items, strict=True)
        ]


def fit(
    model: TSR,
    train_dataset,
    config: TrainConfig,
    val_dataset=None,
    callbacks: Sequence[Any] = (),
    output_dir: str | os.PathLike = "outputs_lora/run",
    mesh_metrics: Callable[[TSR, Any], dict[str, float]] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train `model` in place; returns where the run's files are and what it logged.

    Writes <output_dir>/config.json, metrics.jsonl, loss.png, checkpoints/last.pt and the
    adapter (lora, peft format) or the model (full, config.yaml + model.safetensors).
    Under torchrun (WORLD_SIZE > 1) it joins the process group itself, trains on its rank's
    share of the objects and averages gradients with one all-reduce per step; `train_dataset`
    is anything with len() and [index] -> item (a MultiViewDataset, a list of items).
    `mesh_metrics(model, val_dataset) -> dict` runs every `config.mesh_every` steps.
    A folder that already holds a run is continued (config.resume_from) or, only with
    `overwrite`, cleared of it first; otherwise fit() refuses before any work.
    """
    started = time.perf_counter()  # the time budget counts from here
    rank, world = distributed()
    run_dir = Path(output_dir)
    if not config.resume_from:
        start_afresh(run_dir, overwrite, remove=rank == 0)
    setup = prepare(model, train_dataset, config, rank, world)
    settings = run_settings(model, config, train_dataset)
    optimizer, scheduler = optimiser(model, setup, config)
    torch.manual_seed(config.seed + rank)  # LoRA dropout draws from torch's global generator
    data_generator = torch.Generator().manual_seed(config.seed * 1_000 + rank)  # rays, patches
    lpips_network = _lpips(config, setup, rank)

    # ---- resume, or start the run folder
    step, best_state = 0, None
    if config.resume_from:
        step, best_state = resume(
            model, optimizer, scheduler, data_generator, settings, config, rank
        )
    best = BestWeights(config.early_stopping_metric, config.early_stopping_patience, best_state)
    log = RunLog(run_dir / "metrics.jsonl", callbacks, is_main=rank == 0)
    checkpoints = Checkpoints(
        run_dir / "checkpoints" / CHECKPOINT_NAME, world, rank == 0,
        step if config.resume_from else None,
    )  # fmt: skip
    if rank == 0:
        resolved = resolved_config(model, config, setup, len(train_dataset), world)
        start_run_folder(run_dir, resolved, step)
    # closed on any way out (an error included), so a message is not glued to the bar
    with tqdm(
        total=setup.total_steps, initial=step, disable=not (rank == 0 and config.progress)
    ) as progress:
        stopped_by = "max_steps"
        model.train()
        if val_dataset is not None and step == 0:  # the starting point of the curves
            _validation(model, val_dataset, config, 0, log, best, world)
        while step < setup.total_steps:
            step_started = time.perf_counter()
            # ---- forward and backward over the micro-batches of this step
            optimizer.zero_grad(set_to_none=True)
            sums = _forward_backward(
                model, train_dataset, step, config, setup, rank, world, data_generator,
                lpips_network,
            )  # fmt: skip

            # ---- average gradients and logged losses over processes (DDP)
            if world > 1:
                sums = all_reduce_mean(setup.trainable, sums, world)

            # ---- stop on a non-finite loss or gradient, before it reaches the weights
            grad_norm = float(torch.nn.utils.clip_grad_norm_(setup.trainable, config.grad_clip))
            refuse_non_finite(sums, grad_norm, step, checkpoints)

            # ---- optimiser and schedule
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{sums['loss']:.4f}")
            seconds = time.perf_counter() - step_started
            record = {"step": step, "lr": lr, "grad_norm": grad_norm, "seconds": seconds}
            log({**record, **sums}, "on_step")

            # ---- validation and mesh metrics (rank 0), checkpoint; the end: last step, budget
            ending = run_ending(
                step, setup.total_steps, time.perf_counter() - started, config, world
            )
            if val_dataset is not None and (ending or _every(step, config.val_every)):
                patience_out = _validation(model, val_dataset, config, step, log, best, world)
                ending = ending or ("early_stopping" if patience_out else None)
            if rank == 0 and mesh_metrics is not None and _every(step, config.mesh_every):
                mesh_record = {f"val_{k}": v for k, v in mesh_metrics(model, val_dataset).items()}
                log({"step": step, **mesh_record}, "on_validation")
            if ending or _every(step, config.checkpoint_every):
                checkpoints.save(
                    step, model, optimizer, scheduler, data_generator, settings, best.state
                )
            if ending:
                stopped_by = ending
                break
    message = ending_message(stopped_by, step, setup.total_steps, config, best)
    if rank == 0 and message:
        print(message)
    if config.restore_best:  # the artefact holds the best validation's weights, not the last
        best.restore(model, step)

    # ---- final artefacts
    artefact = None
    if rank == 0:
        artefact = _save_artefact(model, config, run_dir, step, best.step, stopped_by)
        log.event("on_end")
    model.eval()
    return TrainResult(
        run_dir=run_dir, steps=step, history=log.history, artefact=artefact,
        best_step=best.step, stopped_by=stopped_by,
    )  # fmt: skip
