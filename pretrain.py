"""Pretrain the classroom model: a small TripoSR trained from scratch on generated primitives.

One command builds the data (6000 primitives x 3 views, each with 2048 labelled 3D points;
6 min) and trains (18,000 steps in two one-core processes, 44 min on 2 CPU cores), then picks
the marching-cubes threshold on validation objects (50.0 min in all for the shipped model):

    python pretrain.py --overwrite           # -> tsr/assets/classroom/ (the shipped model)
    python pretrain.py --objects 200 --steps 50 --out outputs/pretrain-smoke   # a quick look

The shipped model's recipe.json records the command, seeds, times and metrics of its run.
An interrupted run continues from its last checkpoint (every 500 steps) with `--resume`.

It uses the same `fit()` as LoRA fine-tuning, in full-weights mode, and learns mostly in 3D:
each step decodes 2048 labelled points per object, regressing the density logit to -100 x
their signed distance (clamped; it puts the surface at density_act = level, so the model
carries its own marching-cubes threshold) and their colour to the surface's (weight 100),
and renders only 16 rays per object (RGB and mask) of its 3 views.

What decided the recipe, measured from scratch (Chamfer-L1 / F@0.05 on 48 validation
objects, marching cubes at 64^3; the earlier recipe, 16^2 planes and 512 rays, made the
shipped model of 0.0592 / 0.571 on this measure in 43 min):
- Steps beat size in this budget. Self-attention over 3 x 16^2 triplane tokens and volume
  rendering of 512 rays made a step 0.66 s; with 8^2 planes (upsampled to 16^2) and 16 rays
  it is 0.18 s, 0.145 s in two one-core processes. In equal time (18 min): 0.0633 / 0.547
  against 0.0673 / 0.504. Bigger 8^2 models were worse in that time: 32-channel scene codes,
  a 128-wide decoder and 6 blocks 0.0661 / 0.531, and with 8-pixel ViT patches 0.0674 / 0.522.
- The signed-distance target matched the BCE on inside/outside labels in Chamfer (0.0641 vs
  0.0633) with a better IoU (0.496 vs 0.476) and a calibrated field: meshed at twice the
  level, Chamfer 0.065 instead of 0.088.
- Geometric cross-attention heads (`geometric_cross_attention`): small gain, kept.
- Colour (surface chromaticity error of the decoded colour on 32 validation objects after
  1200 steps; 0.272 is plain grey's): the previous recipe learnt none (0.272, with R = G = B
  even after 18,000 steps), nor did a 10 x colour weight (0.272), nor the colour path of
  `add_colour_lookup` at weight 1 (0.272: training wrote over it). A 100 x weight alone reached
  0.204; with the colour path, 0.116, and Chamfer / F@0.05 0.0663 / 0.534 against 0.0676 /
  0.523 without either: colour for free.
- Not adopted: a depth L1 on rays (0.0732 vs 0.0713 after 420 steps), 8-pixel patches on
  16^2 planes (0.0715), the decoder at the backbone's learning rate (0.0791).
"""

from __future__ import annotations

import tsr  # noqa: F401  first, before torch: it sets OMP_WAIT_POLICY (tsr/__init__.py)

# isort: split
import argparse
import dataclasses
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tsr.config import ASSETS
from tsr.errors import (
    ArgumentParser,
    UserInputError,
    flag_check,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)
from tsr.files import copy_file, write_text
from tsr.model import TSR
from utils.data.build import MIN_SIZE, MIN_VIEWS, prepare_dataset
from utils.data.check import check_dataset
from utils.data.dataset import MultiViewDataset
from utils.evaluation.threshold import best_threshold_by_chamfer
from utils.training.checkpoint import load_checkpoint, refuse_resume_conflicts, start_afresh
from utils.training.config import TrainConfig
from utils.training.pretraining import pretraining_model
from utils.training.train import fit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="pretrain.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=ASSETS / "classroom", help="model folder")
    parser.add_argument("--data", type=Path, default=Path("data/pretrain"), help="dataset folder")
    parser.add_argument("--objects", type=positive_int, default=6000, help="generated primitives")
    parser.add_argument(
        "--views",
        type=flag_check(int, lambda v: v >= MIN_VIEWS, f"an integer >= {MIN_VIEWS}"),
        default=3,
        help="views per object (view 0 = input)",
    )
    parser.add_argument(
        "--size",
        type=flag_check(int, lambda v: v >= MIN_SIZE, f"an integer >= {MIN_SIZE}"),
        default=128,
        help="render size = cond image size",
    )
    parser.add_argument(
        "--occupancy-points",
        type=positive_int,
        default=2048,
        help="labelled 3D points built per object; each step draws as many (with replacement)",
    )
    parser.add_argument("--steps", type=positive_int, default=18000, help="optimiser steps")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="objects per step")
    parser.add_argument(
        "--rays", type=non_negative_int, default=16, help="rendered rays per object and step"
    )
    parser.add_argument(
        "--lambda-occupancy",
        type=non_negative_float,
        default=2.0,
        help="weight of the occupancy loss",
    )
    parser.add_argument(
        "--sdf-scale",
        type=non_negative_float,
        default=100.0,
        help="occupancy target: density logit = -scale x signed distance (0: BCE on the side)",
    )
    parser.add_argument(
        "--lambda-surface-colour",
        type=non_negative_float,
        default=100.0,
        help="weight of the colour MSE at labelled points near the surface",
    )
    parser.add_argument("--lr", type=positive_float, default=5e-4)
    parser.add_argument(
        "--lr-scale-head",
        type=non_negative_float,
        default=10.0,
        help="lr multiplier: decoder, upsampler",
    )
    parser.add_argument(
        "--level", type=positive_float, default=10.0, help="density_act at the surface"
    )
    parser.add_argument(
        "--cross-attention-gain",
        type=positive_float,
        default=4.0,
        help="initial scale of the cross-attention query and key weights (1: PyTorch's init)",
    )
    parser.add_argument(
        "--position-std",
        type=positive_float,
        default=1.0,
        help="initial std of the ViT position embeddings",
    )
    parser.add_argument(
        "--geometric-heads",
        type=non_negative_int,
        default=2,
        help="cross-attention heads per block that start out looking up the cell's own patch",
    )
    parser.add_argument(
        "--colour-lookup",
        type=non_negative_float,
        default=3.0,
        help="amplitude of the input-colour path built at init (0: none)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="data, init and training seed"
    )
    parser.add_argument(
        "--workers", type=positive_int, default=None, help="data generation processes"
    )
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=min(2, os.cpu_count() or 1),
        help="training processes, one core each, averaging gradients (DDP over gloo)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint (built data is kept)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run and the model in --out"
    )
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> TSR:
    return pretraining_model(
        args.seed, args.cross_attention_gain, args.position_std, args.geometric_heads,
        args.colour_lookup,
    )  # fmt: skip


def train_config_for(args: argparse.Namespace) -> TrainConfig:
    if args.batch_size % args.processes:
        raise UserInputError(
            f"{args.batch_size} objects do not share evenly over {args.processes} processes",
            "--batch-size", "pass a multiple of --processes",
        )  # fmt: skip
    return TrainConfig(
        train_mode="full", batch_size=args.batch_size // args.processes, rays_per_object=args.rays,
        max_steps=args.steps, lr=args.lr, lr_scale_head=args.lr_scale_head, warmup_fraction=0.03, min_lr_ratio=0.05,
        lambda_mask=0.1, lambda_lpips=0.0, lambda_occupancy=args.lambda_occupancy, occupancy_level=args.level,
        occupancy_points=args.occupancy_points, occupancy_sdf_scale=args.sdf_scale,
        lambda_surface_colour=args.lambda_surface_colour,
        seed=args.seed, val_every=500, val_objects=16, checkpoint_every=500,
        restore_best=False,  # the end of the cosine schedule, not a noisy 16-object pick
        resume_from=str(run_dir_for(args)) if args.resume else None,
    )  # fmt: skip


def run_dir_for(args: argparse.Namespace) -> Path:
    return Path("outputs") / f"pretrain-{args.out.name}"  # checkpoints, metrics.jsonl, model/


def train_process(rank: int, args: argparse.Namespace, port: int) -> None:
    """One of `args.processes` training processes, one core each. fit() joins the process
    group from the environment torchrun would set, trains on its shard of the objects and
    averages gradients every step; rank 0 validates and writes <run dir>/model."""
    if args.processes > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.processes),
        )  # fmt: skip
        torch.set_num_threads(1)
    # checked in main(): an error here would come back from torch's spawn as text
    train = MultiViewDataset(args.data, "train", cond_size=args.size, seed=args.seed, check=False)
    val = MultiViewDataset(args.data, "val", cond_size=args.size, seed=args.seed, check=False)
    fit(
        build_model(args),
        train,
        train_config_for(args),
        val_dataset=val,
        output_dir=run_dir_for(args),
        overwrite=args.overwrite,
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = train_config_for(args)  # refuse bad settings before hours of work
    if args.resume:  # here, not in the training processes, whose errors come back as text
        saved = load_checkpoint(run_dir_for(args), mmap=True)["config"]
        refuse_resume_conflicts(saved, dataclasses.asdict(config), run_dir_for(args))
    else:
        start_afresh(run_dir_for(args), args.overwrite, remove=False)
        if (args.out / "config.yaml").exists() and not args.overwrite:
            raise UserInputError(
                "a model is already there", args.out,
                "pass --overwrite to replace it, or another --out",
            )  # fmt: skip
    started = time.perf_counter()

    # ---- data: primitives rendered in TripoSR's cameras, with occupancy samples
    data_summary = prepare_dataset(
        args.data, families=("primitives",), n_objects=args.objects, n_views=args.views,
        size=args.size, seed=args.seed, occupancy_points=args.occupancy_points,
        workers=args.workers,
    )  # fmt: skip
    data_seconds = time.perf_counter() - started
    check_dataset(args.data, ("train", "val"))

    # ---- training: all weights from scratch, in `args.processes` processes
    run_dir = run_dir_for(args)
    train_started = time.perf_counter()
    if args.processes > 1:
        torch.multiprocessing.spawn(train_process, (args, free_port()), nprocs=args.processes)
    else:
        train_process(0, args, 0)
    train_seconds = time.perf_counter() - train_started
    model = TSR.from_pretrained(run_dir / "model")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # ---- the model's own marching-cubes threshold, chosen on validation objects
    val = MultiViewDataset(args.data, "val", cond_size=args.size, seed=args.seed)
    threshold, threshold_scores = best_threshold_by_chamfer(model, val, around=args.level)
    model.config.mc_threshold = threshold
    total_seconds = time.perf_counter() - started

    # ---- ship: config + safetensors + the recipe and its numbers
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    (args.out / "model.ckpt").unlink(missing_ok=True)
    copy_file(run_dir / "loss.png", args.out / "loss.png")
    recipe = {
        "command": " ".join(["python pretrain.py", *(sys.argv[1:] if argv is None else argv)]),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_config": dataclasses.asdict(train_config_for(args)),
        "data": {k: v for k, v in data_summary.items() if k != "skipped"},
        # this invocation's; after --resume, the time before the interruption is not in it
        "seconds": {"data": data_seconds, "train": train_seconds, "total": total_seconds},
        "resumed": args.resume,
        "steps": max(record["step"] for record in history),
        "last_validation": [record for record in history if "val_loss" in record][-1],
        "mc_threshold": threshold,
        "threshold_scores": threshold_scores,
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": {"cpus": os.cpu_count(), "processes": args.processes, "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }  # fmt: skip
    write_text(args.out / "recipe.json", json.dumps(recipe, indent=2, default=str))
    print(
        f"{args.out}: {recipe['parameters']:,} parameters, {recipe['steps']} steps, threshold "
        f"{threshold:g}; {total_seconds / 60:.1f} min in all ({data_seconds / 60:.1f} data)"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
