"""One training loop for LoRA fine-tuning and full training: `fit(model, dataset, config)`.

Each step conditions on view 0 of `batch_size` objects and supervises rays (or patches)
sampled from their other views. The loop is flat stanzas in nanoGPT's order: data ->
forward/backward (x grad_accum_steps) -> DDP gradient average -> finite check -> clip ->
optimiser and scheduler step -> log -> validate -> checkpoint. Only rank 0 writes files.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tsr.model import TSR

from . import lora
from .checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_states,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    start_run_folder,
    trainable_state,
)
from .data import sample_patches, sample_rays
from .losses import load_lpips, occupancy_losses, render_loss, validate
from .plots import plot_loss_curves


@dataclasses.dataclass
class TrainConfig:
    train_mode: str = "lora"  # "lora": adapter weights only (add_lora first); "full": all weights
    # ---- data
    batch_size: int = 1  # objects per micro-batch and process (the course CLI's --batch_size)
    grad_accum_steps: int = 1  # micro-batches per optimiser step: a bigger batch, same memory
    sampling: str = "rays"  # "rays": random pixels; "patches": S x S crops (LPIPS needs them)
    # 0: no volume rendering in training, 3D losses only (lambda_occupancy > 0)
    rays_per_object: int = 1024  # supervised rays per object and micro-batch, over its views
    patch_size: int = 32  # S in patch mode; rays_per_object // S^2 patches per object (>= 1)
    object_bias: float = 0.75  # share of patches centred on the object, not on empty sky
    # ---- optimisation
    lr: float = 1e-4  # AdamW peak learning rate (the course project's)
    # From scratch the NeRF decoder must grow densities from ~0 to tens, which Adam does at
    # ~lr per step (x10 gave +1.4 dB after 200 steps on 8 objects; pretrain.py docstring)
    lr_scale_head: float = 1.0  # lr multiplier for the decoder and triplane upsampler
    weight_decay: float = 1e-2  # AdamW decoupled weight decay (torch's default)
    max_steps: int | None = None  # optimiser steps; None: epochs x steps per epoch
    epochs: int = 100  # passes over the training objects when max_steps is None (course CLI)
    warmup_fraction: float = 0.05  # linear warm-up over this share of the steps, then cosine
    min_lr_ratio: float = 0.1  # the cosine ends at lr x this, not 0: late steps still learn
    grad_clip: float = 1.0  # max global gradient norm (the course project's)
    # ---- losses (defaults from the TripoSR paper)
    lambda_rgb: float = 1.0  # MSE on colours composited on white, as the renderer composites
    lambda_mask: float = 0.05  # BCE of rendered opacity against the object mask
    lambda_lpips: float = 2.0  # LPIPS(VGG) on patches; off when lpips or its weights are absent
    lambda_depth: float = 0.0  # L1 on ray depth where the object is hit; optional
    # A loss on 3D points labelled inside/outside (datasets built with --occupancy-points):
    # direct geometry supervision, the classroom model's main pretraining loss
    lambda_occupancy: float = 0.0  # weight of the loss on labelled 3D points
    # the density_act the occupancy loss puts at the surface; None: the model's marching-cubes
    # threshold, so fine-tuning moves the surface where its meshes are cut
    occupancy_level: float | None = None
    occupancy_points: int = 1024  # labelled points per object and micro-batch
    # Instead of a BCE on the side, regress the density logit to -scale x signed distance
    # (clamped): every point then also says how far it is (datasets with signed distances)
    occupancy_sdf_scale: float = 0.0  # > 0: occupancy target -scale x signed distance
    # Colour in 3D at points already decoded for occupancy, where rays mostly see background
    lambda_surface_colour: float = 0.0  # MSE of decoded vs surface colour, points near it
    # ---- memory and precision
    mixed_precision: str = "auto"  # "auto": bf16 autocast on CUDA (fp32 weights), "no": fp32
    grad_checkpointing: bool | None = None  # None: on for >= 16 backbone blocks (full size)
    # ---- bookkeeping
    seed: int = 0  # seeds object order, ray sampling and LoRA dropout
    val_every: int = 50  # steps between validations (0: only at the end)
    val_objects: int = 8  # validation objects rendered (cost grows with it)
    val_rays_per_view: int = 1024  # pixels rendered per novel view, on a regular grid
    # Whether or not it stops early, a run ends on the weights of its best validation (step 0
    # included: an adapter that never helps ends as the base model), unless restore_best=False
    early_stopping_patience: int = 0  # validations without a better metric before stopping; 0 off
    early_stopping_metric: str = "val_loss"  # or "val_psnr", "val_mask_iou" (higher is better)
    restore_best: bool = True  # False: keep the last weights
    mesh_every: int = 0  # steps between mesh-metric hooks (0: never); marching cubes is slow
    checkpoint_every: int = 100  # steps between checkpoints; one is also written at the end
    resume_from: str | None = None  # checkpoint file or run folder to continue from
    progress: bool = True  # tqdm bar on rank 0

    def loss_weights(self) -> dict[str, float]:
        return {
            "rgb": self.lambda_rgb,
            "mask": self.lambda_mask,
            "lpips": self.lambda_lpips,
            "depth": self.lambda_depth,
        }


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimiser steps done in total (including those before a resume)
    history: list[dict]  # every metrics record of this run (train and validation)
    artefact: Path | None  # the adapter folder (lora) or model folder (full); None on ranks > 0
    best_step: int | None = None  # the validation whose weights the artefact holds
    stopped_early: bool = False


_HIGHER_IS_BETTER = {"val_psnr", "val_mask_iou"}
SURFACE_BAND = 0.05  # labelled points this close to the surface supervise its colour


def _is_better(value: float, best: dict | None, metric: str) -> bool:
    if best is None:
        return True
    return value > best["value"] if metric in _HIGHER_IS_BETTER else value < best["value"]


def _agree(flags: tuple[bool, bool], world: int) -> tuple[bool, bool]:
    """Rank 0's (improved, stop) decision, on every rank: only rank 0 validates."""
    if world == 1:
        return flags
    shared = [flags]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes if nobody has yet."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _start_from_rank0(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's weights, as DistributedDataParallel does at construction:
    whatever the caller drew per process (peft's LoRA init, an init from torch's global
    generator) would otherwise differ between ranks, and averaged gradients never fix that."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.data, src=0)


def _objects_for(
    micro_batch: int, n_objects: int, config: TrainConfig, rank: int, world: int
) -> tuple[int, list[int]]:
    """(epoch, dataset indices) of one micro-batch: a seeded permutation per epoch, sharded by
    rank. A pure function of the micro-batch counter, so resuming needs no loader state."""
    per_micro_batch = config.batch_size * world
    micro_batches_per_epoch = math.ceil(n_objects / per_micro_batch)
    epoch, position = divmod(micro_batch, micro_batches_per_epoch)
    seed = config.seed * 100_003 + epoch  # no overlap between (seed, epoch) pairs
    order = torch.randperm(n_objects, generator=torch.Generator().manual_seed(seed))
    start = position * per_micro_batch + rank * config.batch_size
    return epoch, [int(order[(start + j) % n_objects]) for j in range(config.batch_size)]


def _supervision(item: dict, config: TrainConfig, generator: torch.Generator) -> dict:
    """Rays (N, ...) or patches (P, S, S, ...) with targets, never whole images."""
    if config.sampling == "rays":
        return sample_rays(item, config.rays_per_object, generator)
    if config.sampling == "patches":
        n_patches = max(1, config.rays_per_object // config.patch_size**2)
        return sample_patches(
            item, n_patches, config.patch_size, generator, object_bias=config.object_bias
        )
    raise ValueError(f"sampling must be 'rays' or 'patches', not {config.sampling!r}")


def _check_supervision(item: dict, config: TrainConfig) -> None:
    """Fail before step 1 when the losses asked for need data the dataset does not have."""
    if config.rays_per_object == 0 and config.lambda_occupancy <= 0:
        raise ValueError("rays_per_object=0 trains on 3D points only: set lambda_occupancy > 0")
    wants_points = config.lambda_occupancy > 0 or config.rays_per_object == 0
    if wants_points and "occupancy_points" not in item:
        raise ValueError(
            "the occupancy loss (or rays_per_object=0) needs labelled 3D points: build the "
            "dataset with --occupancy-points, or set lambda_occupancy=0 and rays_per_object > 0"
        )
    wants_distances = config.occupancy_sdf_scale > 0 or config.lambda_surface_colour > 0
    if wants_points and wants_distances and "occupancy_sdf" not in item:
        raise ValueError(
            "occupancy_sdf_scale and lambda_surface_colour need signed distances and colours "
            "in occupancy.npz: rebuild the dataset with prepare_data.py --force"
        )


def _trainable_parameters(model: TSR, mode: str) -> list[torch.nn.Parameter]:
    """Freeze/unfreeze for the mode; fp32 master copies of what is trained (diffusers' order)."""
    has_lora = any("lora_" in name for name, _ in model.named_parameters())
    if mode == "full":
        if has_lora:
            raise ValueError("train_mode='full' on a model with LoRA layers: use a fresh model")
        model.requires_grad_(True)
    elif mode != "lora":
        raise ValueError(f"train_mode must be 'lora' or 'full', not {mode!r}")
    elif not has_lora:
        raise ValueError(
            "train_mode='lora' needs an adapter: call utils.lora.add_lora(model) first"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return trainable


def _lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of config.lr for optimiser step `step` (0-based): warm-up, then cosine."""
    warmup = max(1, round(config.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


def _all_reduce_mean(
    trainable: list[torch.nn.Parameter], sums: dict[str, float], world: int
) -> dict[str, float]:
    """Average the trainable gradients (one flat all-reduce, like DDP's buckets) and the
    logged losses over all processes; every rank then takes the same optimiser step."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for parameter, chunk in zip(trainable, flat.split([g.numel() for g in grads]), strict=True):
        parameter.grad = chunk.view_as(parameter)
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(keys, (values / world).tolist(), strict=True))


def return_freed_memory_promptly() -> None:
    """A fixed 4 MiB mmap threshold for glibc's malloc. Its default threshold rises after
    every large free, so later big tensors come from the heap, where the few tensors kept
    for backward pin freed memory in place: a full-size LoRA step peaked at 8.0 GB RSS, with
    this 3.6 GB. From mmap, a freed tensor goes back to the OS at once (process-wide)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(-3, 4 << 20)  # -3 = M_MMAP_THRESHOLD


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _callbacks(callbacks: Sequence[Any], event: str, *args) -> None:
    for callback in callbacks:
        if hasattr(callback, event):
            getattr(callback, event)(*args)


def fit(
    model: TSR,
    train_dataset,
    config: TrainConfig,
    val_dataset=None,
    callbacks: Sequence[Any] = (),
    output_dir: str | os.PathLike = "outputs_lora/run",
    mesh_metrics: Callable[[TSR, Any], dict[str, float]] | None = None,
) -> TrainResult:
    """Train `model` in place; returns where the run's files are and what it logged.

    Writes <output_dir>/config.json, metrics.jsonl, loss.png, checkpoints/last.pt and the
    adapter (lora, peft format) or the model (full, config.yaml + model.safetensors).
    Under torchrun (WORLD_SIZE > 1) it joins the process group itself, trains on its rank's
    share of the objects and averages gradients with one all-reduce per step; `train_dataset`
    is anything with len() and [index] -> item (a MultiViewDataset, a list of items).
    `mesh_metrics(model, val_dataset) -> dict` runs every `config.mesh_every` steps.
    """
    rank, world = _distributed()
    is_main = rank == 0
    run_dir = Path(output_dir)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
    n_objects = len(train_dataset)
    if n_objects == 0:
        raise ValueError("the training dataset is empty: check --input_folder and its split.json")
    # on an object this rank trains on anyway, so sharding stays exact (each rank loads its own)
    first_object = _objects_for(0, n_objects, config, rank, world)[1][0]
    _check_supervision(train_dataset[first_object], config)
    steps_per_epoch = math.ceil(n_objects / (config.batch_size * world * config.grad_accum_steps))
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    # ---- model, optimiser, schedule
    if world > 1:
        _start_from_rank0(model)
    trainable = _trainable_parameters(model, config.train_mode)
    checkpointing = config.grad_checkpointing
    if checkpointing is None:
        checkpointing = model.config.backbone.num_layers >= 16  # the full-size backbone
    lora.gradient_checkpointing(model, checkpointing)
    occupancy_level = config.occupancy_level
    if occupancy_level is None:
        occupancy_level = model.config.mc_threshold
    if device.type == "cpu":
        return_freed_memory_promptly()
    if config.early_stopping_metric not in _HIGHER_IS_BETTER | {"val_loss"}:
        raise ValueError(
            "early_stopping_metric must be val_loss, val_psnr or val_mask_iou, "
            f"not {config.early_stopping_metric!r}"
        )
    if config.mixed_precision not in ("auto", "no"):
        raise ValueError(f"mixed_precision must be 'auto' or 'no', not {config.mixed_precision!r}")
    use_bf16 = config.mixed_precision == "auto" and device.type == "cuda"
    use_bf16 = use_bf16 and torch.cuda.is_available()
    head = {id(p) for m in (model.decoder, model.post_processor) for p in m.parameters()}
    groups = [
        {"params": [p for p in trainable if id(p) not in head], "lr": config.lr},
        {"params": [p for p in trainable if id(p) in head], "lr": config.lr * config.lr_scale_head},
    ]
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]], weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, total_steps, config)
    )
    torch.manual_seed(config.seed + rank)  # LoRA dropout draws from torch's global generator
    data_generator = torch.Generator().manual_seed(config.seed * 1_000 + rank)  # rays, patches
    lpips_network = None
    if config.lambda_lpips > 0:
        lpips_network = load_lpips(device, config.sampling == "patches", verbose=is_main)
    weights = config.loss_weights()

    # ---- resume
    start_step = 0
    checkpoint_path = run_dir / "checkpoints" / CHECKPOINT_NAME
    best: dict | None = None  # {"step", "value", "trainable"}: the best validation so far
    stale_validations = 0  # validations since `best` improved
    if config.resume_from:
        checkpoint = load_checkpoint(config.resume_from)
        start_step = restore_checkpoint(
            checkpoint, model, optimizer, scheduler, data_generator, rank
        )
        best = checkpoint.get("best")
    history: list[dict] = []
    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        resolved = {
            **dataclasses.asdict(config), "max_steps": total_steps, "world_size": world,
            "grad_checkpointing": checkpointing, "bf16_autocast": use_bf16,
            "occupancy_level": occupancy_level,
            "n_train_objects": n_objects, "lora": lora.trainable_parameter_report(model),
            "model_source": getattr(model, "source", None), "model_config": model.config.to_dict(),
        }  # fmt: skip
        start_run_folder(run_dir, resolved, start_step)

    def log(record: dict, event: str) -> None:
        history.append(record)
        if is_main:
            with metrics_path.open("a") as file:
                file.write(json.dumps(record) + "\n")
            _callbacks(callbacks, event, record["step"], record)

    def save(step: int) -> None:
        states = [capture_rng_states(data_generator)]
        if world > 1:  # every rank's sampler state, so each resumes its own stream
            states = [None] * world
            dist.all_gather_object(states, capture_rng_states(data_generator))
        if is_main:
            config_dict = dataclasses.asdict(config)
            save_checkpoint(
                checkpoint_path, model, optimizer, scheduler, step, states, config_dict, best
            )
        saved_steps.append(step)

    saved_steps = [start_step] if config.resume_from else []  # steps with a checkpoint on disk
    model.train()
    progress = tqdm(
        total=total_steps, initial=start_step, disable=not (is_main and config.progress)
    )
    step = start_step
    stopped_early = False

    def after_validation(record: dict | None) -> bool:
        """Track the best weights; True when patience has run out. Call on every rank."""
        nonlocal best, stale_validations
        improved = False
        if record is not None:
            improved = _is_better(
                record[config.early_stopping_metric], best, config.early_stopping_metric
            )
        patience = config.early_stopping_patience
        stop = not improved and patience > 0 and stale_validations + 1 >= patience
        improved, stop = _agree((improved, stop), world)
        if improved:
            value = record[config.early_stopping_metric] if record is not None else None
            best = {"step": step, "value": value, "trainable": trainable_state(model)}
            stale_validations = 0
        else:
            stale_validations += 1
        return stop

    validating = val_dataset is not None
    if validating and step == 0:  # the starting point of the curves
        record = {"step": 0, **validate(model, val_dataset, config)} if is_main else None
        if is_main:
            log(record, "on_validation")
        after_validation(record)
    while step < total_steps:
        started = time.perf_counter()
        # ---- forward and backward over the micro-batches of this step
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for accumulation in range(config.grad_accum_steps):
            micro_batch = step * config.grad_accum_steps + accumulation
            epoch, indices = _objects_for(micro_batch, n_objects, config, rank, world)
            if hasattr(train_dataset, "set_epoch"):  # other supervision views every epoch
                train_dataset.set_epoch(epoch)
            items = [train_dataset[i] for i in indices]
            cond = torch.stack([item["cond_image"] for item in items]).to(device)  # (B,H,W,3)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                scene_codes = model.encode(cond)  # (B, 3, C, 2P, 2P)
                losses = []
                for scene_code, item in zip(scene_codes, items, strict=True):
                    terms = {"loss": scene_code.new_zeros((), dtype=torch.float32)}
                    if config.rays_per_object > 0:
                        target = _supervision(item, config, data_generator)
                        target = {k: v.to(device) for k, v in target.items()}
                        rendered = model.render_rays(scene_code, target["rays_o"], target["rays_d"])
                        terms = render_loss(rendered, target, weights, lpips_network)
                    if config.lambda_occupancy > 0 and "occupancy_points" in item:
                        points = occupancy_losses(
                            model, scene_code, item, config.occupancy_points,
                            occupancy_level, data_generator, config.occupancy_sdf_scale,
                            SURFACE_BAND if config.lambda_surface_colour > 0 else 0.0,
                        )  # fmt: skip
                        terms["loss"] = (
                            terms["loss"] + config.lambda_occupancy * points["occupancy"]
                        )
                        if "surface_colour" in points:
                            colour = config.lambda_surface_colour * points["surface_colour"]
                            terms["loss"] = terms["loss"] + colour
                        terms.update({f"loss_{k}": v.detach() for k, v in points.items()})
                    losses.append(terms)
            loss = torch.stack([terms["loss"] for terms in losses]).mean()
            (loss / config.grad_accum_steps).backward()
            for terms in losses:
                for key, value in terms.items():
                    share = float(value.detach()) / (len(losses) * config.grad_accum_steps)
                    sums[key] = sums.get(key, 0.0) + share

        # ---- average gradients and logged losses over processes (DDP)
        if world > 1:
            sums = _all_reduce_mean(trainable, sums, world)

        # ---- stop on a non-finite loss or gradient, before it reaches the weights
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip))
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            progress.close()
            kept = f"{checkpoint_path} (step {saved_steps[-1]})" if saved_steps else "none yet"
            raise FloatingPointError(
                f"non-finite loss {sums['loss']} / grad norm {grad_norm} at step {step + 1}: "
                f"training stopped. The last good checkpoint is {kept}; resume from it with a "
                "lower --lr, or check the data of this step"
            )

        # ---- optimiser and schedule
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{sums['loss']:.4f}")
        seconds = time.perf_counter() - started
        log({"step": step, "lr": lr, "grad_norm": grad_norm, "seconds": seconds, **sums}, "on_step")

        # ---- validation and mesh metrics (rank 0), checkpoint
        last = step == total_steps
        if validating and (last or _every(step, config.val_every)):
            record = {"step": step, **validate(model, val_dataset, config)} if is_main else None
            if is_main:
                log(record, "on_validation")
            stopped_early = after_validation(record) and not last
            last = last or stopped_early
        if is_main and mesh_metrics is not None and _every(step, config.mesh_every):
            mesh_record = {f"val_{k}": v for k, v in mesh_metrics(model, val_dataset).items()}
            log({"step": step, **mesh_record}, "on_validation")
        if last or _every(step, config.checkpoint_every):
            save(step)
        if stopped_early:
            if is_main:
                print(
                    f"early stop at step {step}: {config.early_stopping_metric} has not improved "
                    f"for {config.early_stopping_patience} validations (best at step {best['step']})"
                )
            break
    progress.close()
    if config.restore_best and best is not None and best["step"] != step:
        with torch.no_grad():  # the artefact holds the best validation's weights, not the last
            for name, parameter in model.named_parameters():
                if name in best["trainable"]:
                    parameter.copy_(best["trainable"][name])
    best_step = None if best is None else best["step"]

    # ---- final artefacts
    artefact = None
    if is_main:
        extra = {"train_config": dataclasses.asdict(config), "steps": step, "best_step": best_step}
        if config.train_mode == "lora":
            artefact = lora.save_adapter(model, run_dir / "adapter", extra_metadata=extra)
        else:
            artefact = model.save_pretrained(run_dir / "model")
        if metrics_path.stat().st_size:
            plot_loss_curves(metrics_path, run_dir / "loss.png")
        _callbacks(callbacks, "on_end")
    model.eval()
    return TrainResult(
        run_dir=run_dir, steps=step, history=history, artefact=artefact,
        best_step=best_step, stopped_early=stopped_early,
    )  # fmt: skip
