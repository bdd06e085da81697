"""Model profiles as data: everything that depends on the model, chosen from its config in one
place, with the reason for each value.

`profile_for(model)` takes a TSR, its config, or a name or folder as `TSR.from_pretrained`
takes them, prints one line saying what the profile sets, and returns it:

- "classroom": the shipped 2.3 M-parameter model (128² input) and models of its size. The
  recipe measured in the README ("The classroom model"); its numbers are unchanged.
- "official": full-size TripoSR (512² input, 16 backbone blocks, 419 M parameters). The
  paper's losses (MSE + 2 LPIPS + 0.05 mask) on foreground-biased patches of 512² renders,
  backbone checkpointing, bf16 autocast with fp32 master weights on CUDA.

A dataset is built for one profile: its folder name says which (`Profile.data_dir`), and
`profiles.check_dataset` refuses a folder whose dataset.json settings are not the profile's.
"""

from __future__ import annotations

import torch

from utils.training.profiles import Profile, model_config

FULL_SIZE_INPUT = 512  # the official cond_image_size: models this big get the official profile
FULL_SIZE_BLOCKS = 16  # the official backbone depth


CLASSROOM = Profile(
    name="classroom",
    dataset={
        "families": ("parts",),
        "n_objects": 600,
        "n_views": 5,
        "size": 128,
        "seed": 1,
        "occupancy_points": 2048,
    },
    smoke_dataset={
        "families": ("parts",),
        "n_objects": 6,
        "n_views": 4,
        "size": 64,
        "seed": 1,
        "occupancy_points": 256,
    },
    data_dir="data/parts",
    smoke_data_dir="outputs/smoke/data",
    recipe={
        "rays_per_object": 1024,
        "lr": 1e-3,
        "lambda_mask": 0.1,
        "lambda_lpips": 0.0,
        "lambda_occupancy": 1.0,
        "occupancy_sdf_scale": 100.0,
        "early_stopping_patience": 4,
        "time_budget_s": 180.0,
    },
    device_recipe={
        device: {
            "batch_size": 4,
            "grad_accum_steps": 1,
            "grad_checkpointing": False,
            "mixed_precision": "auto",
        }
        for device in ("cpu", "cuda")
    },
    smoke_recipe={},
    steps=600,
    smoke_steps=4,
    mesh_resolution=128,
    chunk_size={"cpu": 8192, "cuda": 131072},
    why={
        "families": "the classroom model was pretrained on primitives only: parts are new to it",
        "n_objects": "480 train / 60 val / 60 test: paired errors of about 0.004 in Chamfer",
        "n_views": "view 0 conditions, 4 supervise from other sides",
        "size": "the model's 128² input: view 0 is fed at its own size",
        "seed": "the objects and split the README's numbers were measured on",
        "occupancy_points": "labelled 3D points with signed distances for the occupancy loss",
        "steps": "at most; the time budget ends the demo's run first (the README's 800-step "
        "run kept step 700)",
        "time_budget_s": "3 min, what make demo can afford in about 12 min on 2 idle cores "
        "(about 250 steps of 0.7 s with validation); a busier machine trains fewer steps",
        "rays_per_object": "1024 random rays per object: 800 steps took 7 min 43 s on one core",
        "lr": "1e-3 beat 5e-4 (-16.1 % against -12.9 % Chamfer on held-out parts, README)",
        "lambda_mask": "the mask BCE weight the classroom model was pretrained with",
        "lambda_lpips": "off: its VGG weights are a download, and 1024 single rays are no image",
        "lambda_occupancy": "3D points teach geometry directly; the pretraining loss",
        "sampling": "random rays: without LPIPS nothing needs whole patches",
        "object_bias": "unused: rays, not patches",
        "patch_size": "unused: rays, not patches",
        "lambda_rgb": "TrainConfig's 1, as in pretraining",
        "occupancy_sdf_scale": "logit = -100 x signed distance, as in pretraining",
        "early_stopping_patience": "4 validations (200 steps) without a better validation loss",
        "batch_size": "4 objects per step, as measured",
        "grad_accum_steps": "the batch fits at once on any device",
        "grad_checkpointing": "4 blocks: recomputing them would cost more than it saves",
        "mixed_precision": "bf16 autocast on CUDA (fp32 master weights), fp32 on the CPU",
        "mesh_resolution": "128³, the README's measured resolution; the model has 16² planes",
        "chunk_size": "8192 points per call on a CPU (cache), 131072 on a GPU (occupancy)",
        "mc_threshold": "10: the level the model was trained to put its surface at",
    },
)

OFFICIAL = Profile(
    name="official",
    dataset={
        "families": ("parts",),
        "n_objects": 600,
        "n_views": 5,
        "size": 512,
        "seed": 1,
        "occupancy_points": 0,
    },
    smoke_dataset={
        "families": ("parts",),
        "n_objects": 6,
        "n_views": 4,
        "size": 64,
        "seed": 1,
        "occupancy_points": 0,
    },
    data_dir="data/parts-official",
    smoke_data_dir="outputs/smoke/data-official",
    recipe={
        "sampling": "patches",
        "object_bias": 0.75,
        "lr": 1e-4,
        "lambda_rgb": 1.0,
        "lambda_lpips": 2.0,
        "lambda_mask": 0.05,
        "lambda_occupancy": 0.0,
        "early_stopping_patience": 4,
    },
    device_recipe={
        "cuda": {
            "patch_size": 128,
            "rays_per_object": 128**2,
            "batch_size": 4,
            "grad_accum_steps": 2,
            "grad_checkpointing": True,
            "mixed_precision": "auto",
        },
        "cpu": {
            "patch_size": 32,
            "rays_per_object": 32**2,
            "batch_size": 1,
            "grad_accum_steps": 1,
            "grad_checkpointing": True,
            "mixed_precision": "no",
        },
    },
    smoke_recipe={
        "batch_size": 1,
        "grad_accum_steps": 1,
        "patch_size": 32,
        "rays_per_object": 32**2,
    },
    steps=800,
    smoke_steps=1,
    mesh_resolution=256,
    chunk_size={"cpu": 8192, "cuda": 131072},
    why={
        "families": "the same parts as the classroom profile, so results compare",
        "n_objects": "480 train / 60 val / 60 test; ~1 h to render at 512² on 2 cores",
        "n_views": "view 0 conditions, 4 supervise from other sides",
        "size": "512²: view 0 at the model's cond_image_size, and the paper's patches are cut "
        "from 512² renders",
        "seed": "the classroom profile's objects and split",
        "occupancy_points": "none: the paper trains on renders only",
        "steps": "the README's classroom run's 800; not tuned on the full model (no GPU run yet)",
        "time_budget_s": "none: not yet timed on a GPU, so no limit is chosen for it",
        "sampling": "patches: LPIPS needs images, not single rays (the paper's 128² patches)",
        "object_bias": "3 of 4 patches centred on the object, the rest anywhere",
        "patch_size": "128² on a GPU, as the paper; 32² on a CPU, where a step must fit in RAM",
        "rays_per_object": "one patch per object and micro-batch",
        "lr": "1e-4, the course's and peft's usual LoRA rate; not tuned on this model",
        "lambda_rgb": "the paper's MSE",
        "lambda_lpips": "the paper's 2 x LPIPS, when the lpips package and its VGG weights "
        "load (a one-line notice says when not)",
        "lambda_mask": "the paper's 0.05 x mask BCE",
        "lambda_occupancy": "off: the official weights were not trained with it",
        "occupancy_sdf_scale": "unused: no occupancy loss",
        "early_stopping_patience": "4 validations without a better validation loss",
        "batch_size": "4 x 2 accumulated on a GPU (to be confirmed by scripts/gpu_check.sh); "
        "1 on a CPU",
        "grad_accum_steps": "a larger effective batch at the memory of 4 objects",
        "grad_checkpointing": "16 blocks of 3072 tokens: recompute them rather than store them",
        "mixed_precision": "bf16 autocast + fp32 master weights on CUDA; fp32 on a CPU, where "
        "bf16 matrix work is slow",
        "mesh_resolution": "256³, TripoSR's default for its 64² planes",
        "chunk_size": "8192 points per call on a CPU (cache), 131072 on a GPU (occupancy)",
        "mc_threshold": "25, TripoSR's level",
    },
)

PROFILES = {profile.name: profile for profile in (CLASSROOM, OFFICIAL)}


def profile_for(model, device: str | torch.device = "cpu", verbose: bool = True) -> Profile:
    """The profile of a model: "official" for full size (512² input or 16 backbone blocks),
    "classroom" for anything smaller. Prints its one-line summary on `device` unless
    verbose=False."""
    config = model_config(model)
    full_size = (
        config.cond_image_size >= FULL_SIZE_INPUT or config.backbone.num_layers >= FULL_SIZE_BLOCKS
    )
    profile = OFFICIAL if full_size else CLASSROOM
    if verbose:
        print(profile.summary(device))
    return profile


def comparison_rows(
    active: Profile, device: str | torch.device = "cpu", smoke: bool = False,
    group: str | None = None,
) -> list[dict]:  # fmt: skip
    """Each profile's value of every setting side by side (training: the fields some profile
    sets), with the active profile's reason; `group` keeps "dataset", "training" or "mesh".
    -> table rows"""
    by_profile = {name: p.settings(device, smoke) for name, p in PROFILES.items()}
    trained = {"steps"}.union(*(p.chosen() for p in PROFILES.values()))
    rows = []
    for name in [group] if group else list(by_profile[active.name]):
        for key in by_profile[active.name][name]:
            if name != "training" or key in trained:
                values = {p: str(by_profile[p][name][key]) for p in by_profile}
                rows.append({"setting": key, **values, f"why ({active.name})": active.why[key]})
    return rows
