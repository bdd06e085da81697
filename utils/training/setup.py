"""What fit() settles before its first step: the data checked against the config, what is
trained (fp32 master weights), memory and precision per device, the optimiser and its
learning-rate schedule."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import sys

import torch

from tsr.errors import UserInputError
from tsr.model import TSR
from utils.training import lora
from utils.training.config import TrainConfig
from utils.training.distributed import objects_for, start_from_rank0


@dataclasses.dataclass
class Setup:
    """What fit() derives once from the model, the data and the config."""

    device: torch.device
    trainable: list[torch.nn.Parameter]  # fp32 master weights of what is trained
    total_steps: int
    use_bf16: bool  # bf16 autocast: CUDA only, fp32 master weights
    grad_checkpointing: bool
    occupancy_level: float  # the density_act the occupancy loss puts at the surface


def _check_supervision(item: dict, config: TrainConfig) -> None:
    """Fail before step 1 when the losses asked for need data the dataset does not have."""
    wants_points = config.lambda_occupancy > 0 or config.rays_per_object == 0
    if wants_points and "occupancy_points" not in item:
        raise UserInputError(
            "the occupancy loss (or rays_per_object=0) needs labelled 3D points, which the "
            f"dataset lacks (object {item['object_id']})", "lambda_occupancy, rays_per_object",
            "build the dataset with --occupancy-points, or set lambda_occupancy=0 and "
            "rays_per_object > 0",
        )  # fmt: skip
    height, width = item["mask"].shape[1:]
    if (
        config.rays_per_object > 0
        and config.sampling == "patches"
        and config.patch_size > min(height, width)
    ):
        raise UserInputError(
            f"patches of {config.patch_size} pixels do not fit the {height}x{width} views",
            "patch_size (--patch)", f"choose a patch size <= {min(height, width)}",
        )  # fmt: skip
    wants_distances = config.occupancy_sdf_scale > 0 or config.lambda_surface_colour > 0
    if wants_points and wants_distances and "occupancy_sdf" not in item:
        raise UserInputError(
            "occupancy_sdf_scale and lambda_surface_colour need signed distances and colours "
            f"in occupancy.npz (object {item['object_id']})",
            "occupancy_sdf_scale, lambda_surface_colour",
            "rebuild the dataset with prepare_data.py --force",
        )  # fmt: skip


def _trainable_parameters(model: TSR, mode: str) -> list[torch.nn.Parameter]:
    """Freeze/unfreeze for the mode; fp32 master copies of what is trained (diffusers' order)."""
    has_lora = any("lora_" in name for name, _ in model.named_parameters())
    if mode == "full":
        if has_lora:
            raise ValueError("train_mode='full' on a model with LoRA layers: use a fresh model")
        model.requires_grad_(True)
    elif not has_lora:
        raise ValueError(
            "train_mode='lora' needs an adapter: call utils.training.lora.add_lora(model) first"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return trainable


def prepare(model: TSR, train_dataset, config: TrainConfig, rank: int, world: int) -> Setup:
    """Check the data against the config, freeze what is not trained, choose memory and
    precision settings; under DDP every rank starts from rank 0's weights."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
    n_objects = len(train_dataset)
    if n_objects == 0:
        raise UserInputError(
            "the training dataset is empty", "--input_folder",
            "check the folder and its split.json (prepare_data.py builds both)",
        )  # fmt: skip
    # on an object this rank trains on anyway, so sharding stays exact (each rank loads its own)
    item = train_dataset[objects_for(0, n_objects, config, rank, world)[1][0]]
    _check_supervision(item, config)
    steps_per_epoch = math.ceil(n_objects / (config.batch_size * world * config.grad_accum_steps))
    if world > 1:
        start_from_rank0(model)
    checkpointing = config.grad_checkpointing
    if checkpointing is None:
        checkpointing = model.config.backbone.num_layers >= 16  # the full-size backbone
    lora.gradient_checkpointing(model, checkpointing)
    if device.type == "cpu":
        return_freed_memory_promptly()
    return Setup(
        device=device,
        trainable=_trainable_parameters(model, config.train_mode),
        total_steps=config.max_steps or config.epochs * steps_per_epoch,
        use_bf16=config.mixed_precision == "auto" and device.type == "cuda",
        grad_checkpointing=checkpointing,
        occupancy_level=config.occupancy_level or model.config.mc_threshold,
    )


def optimiser(model: TSR, setup: Setup, config: TrainConfig) -> tuple:
    """AdamW over the trainable weights (the decoder and upsampler at lr x lr_scale_head),
    with warm-up then cosine. -> (optimizer, scheduler)"""
    head = {id(p) for m in (model.decoder, model.post_processor) for p in m.parameters()}
    groups = [
        {"params": [p for p in setup.trainable if id(p) not in head], "lr": config.lr},
        {
            "params": [p for p in setup.trainable if id(p) in head],
            "lr": config.lr * config.lr_scale_head,
        },
    ]
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]], weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, setup.total_steps, config)
    )
    return optimizer, scheduler


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of config.lr for optimiser step `step` (0-based): warm-up, then cosine."""
    warmup = max(1, round(config.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * progress)
    )


def return_freed_memory_promptly() -> None:
    """A fixed 4 MiB mmap threshold for glibc's malloc. Its default threshold rises after
    every large free, so later big tensors come from the heap, where the few tensors kept
    for backward pin freed memory in place: a full-size LoRA step peaked at 8.0 GB RSS, with
    this 3.6 GB. From mmap, a freed tensor goes back to the OS at once (process-wide)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(-3, 4 << 20)  # -3 = M_MMAP_THRESHOLD
