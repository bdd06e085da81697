"""The training recipe as one dataclass: every field a plain value with the reason for it.

CLIs generate their flags from these fields (fine_tuning.py), notebooks set them by name.
"""

from __future__ import annotations

import dataclasses
import math

from tsr.errors import UserInputError

HIGHER_IS_BETTER = ("val_psnr", "val_mask_iou")  # validation metrics where more is better
EARLY_STOPPING_METRICS = ("val_loss", *HIGHER_IS_BETTER)


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _non_negative(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value >= 0


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
    # A bound on wall-clock time as well as on steps: a slow or busy machine trains fewer steps
    # instead of running longer. Checked at step boundaries; a final validation follows.
    time_budget_s: float | None = None  # seconds per fit() call, validations in; None: no limit
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

    def __post_init__(self) -> None:
        """Refuse, before any work, every value that would crash a later step or train
        silently wrong; one error lists them all, by field name."""
        rules = {
            "train_mode": (self.train_mode in ("lora", "full"), "'lora' or 'full'"),
            "sampling": (self.sampling in ("rays", "patches"), "'rays' or 'patches'"),
            "mixed_precision": (self.mixed_precision in ("auto", "no"), "'auto' or 'no'"),
            "early_stopping_metric": (
                self.early_stopping_metric in EARLY_STOPPING_METRICS,
                " or ".join(EARLY_STOPPING_METRICS),
            ),
            "batch_size": (isinstance(self.batch_size, int) and self.batch_size >= 1, ">= 1"),
            "grad_accum_steps": (self.grad_accum_steps >= 1, ">= 1"),
            "rays_per_object": (self.rays_per_object >= 0, ">= 0 (0: 3D losses only)"),
            "patch_size": (self.patch_size >= 1, ">= 1"),
            "object_bias": (0 <= self.object_bias <= 1, "a probability in [0, 1]"),
            "lr": (_positive(self.lr), "a finite number > 0 (gradient descent, not ascent)"),
            "lr_scale_head": (_non_negative(self.lr_scale_head), ">= 0 (0 freezes the head)"),
            "weight_decay": (_non_negative(self.weight_decay), ">= 0"),
            "max_steps": (self.max_steps is None or self.max_steps >= 1, ">= 1 or None"),
            "epochs": (self.epochs >= 1, ">= 1"),
            "time_budget_s": (
                self.time_budget_s is None or _positive(self.time_budget_s),
                "a number of seconds > 0, or None for no limit",
            ),
            "warmup_fraction": (0 <= self.warmup_fraction < 1, "in [0, 1)"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            "grad_clip": (_positive(self.grad_clip), "> 0"),
            "occupancy_level": (
                self.occupancy_level is None or _positive(self.occupancy_level),
                "a density > 0, or None for the model's threshold",
            ),
            "occupancy_points": (self.occupancy_points >= 1, ">= 1"),
            "occupancy_sdf_scale": (_non_negative(self.occupancy_sdf_scale), ">= 0"),
            "val_every": (self.val_every >= 0, ">= 0 (0: only at the end)"),
            "val_objects": (self.val_objects >= 1, ">= 1"),
            "val_rays_per_view": (self.val_rays_per_view >= 1, ">= 1"),
            "early_stopping_patience": (self.early_stopping_patience >= 0, ">= 0 (0: off)"),
            "mesh_every": (self.mesh_every >= 0, ">= 0"),
            "checkpoint_every": (self.checkpoint_every >= 0, ">= 0"),
            "seed": (isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
        }
        for name in ("lambda_rgb", "lambda_mask", "lambda_lpips", "lambda_depth",
                     "lambda_occupancy", "lambda_surface_colour"):  # fmt: skip
            rules[name] = (_non_negative(getattr(self, name)), "a finite weight >= 0")
        if self.rays_per_object == 0 and self.lambda_occupancy <= 0:
            rules["rays_per_object"] = (
                False,
                "> 0, or set lambda_occupancy > 0 to train on 3D points only",
            )
        wrong = [name for name, (ok, _) in rules.items() if not ok]
        if wrong:
            raise UserInputError(
                "training settings out of range: "
                + "; ".join(f"{n}={getattr(self, n)!r} (must be {rules[n][1]})" for n in wrong),
                ", ".join(wrong), "change them to values in range (see utils/training/config.py)",
            )  # fmt: skip

    def loss_weights(self) -> dict[str, float]:
        return {
            "rgb": self.lambda_rgb,
            "mask": self.lambda_mask,
            "lpips": self.lambda_lpips,
            "depth": self.lambda_depth,
        }
