"""Pretrain the classroom model: a small TripoSR trained from scratch on generated primitives.

One command builds the data (4000 primitives, ~4 min) and trains (4800 steps, ~43 min on 2
CPU cores), then picks the marching-cubes threshold on validation objects (47.5 min in all):

    python pretrain.py                       # -> tsr/assets/classroom/ (the shipped model)
    python pretrain.py --objects 200 --steps 50 --out outputs/pretrain-smoke   # a quick look

The shipped model's recipe.json records the command, seeds, times and metrics of its run.

It uses the same `fit()` as LoRA fine-tuning, in full-weights mode, with one extra loss:
occupancy, a BCE on points labelled inside/outside the ground-truth mesh, which puts the
surface at `density_act = level` and so gives the model its own marching-cubes threshold.

Geometry over colour in the budget: 512 rays and the occupancy BCE at weight 2 on 2048
points per object make a step 0.52 s instead of 0.66 s (1024 rays, weight 1, 1024 points), so
4800 steps fit where 3600 did. On 60 held-out primitives that recipe's model had Chamfer-L1
0.0627 and F@0.05 0.544; this one 0.0604 and 0.561 (paired -0.0023 +- 0.0009 and +0.017 +-
0.008), with novel-view PSNR and mask IoU unchanged within noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tsr.config import ASSETS, load_config
from tsr.model import TSR
from utils.build_dataset import prepare_dataset
from utils.data import MultiViewDataset
from utils.evaluation import best_threshold_by_chamfer
from utils.train import TrainConfig, fit

CLASSROOM_CONFIG = ASSETS / "classroom-config.yaml"


def init_for_pretraining(model: TSR, cross_attention_gain: float, position_std: float) -> None:
    """Two changes to the random init that let the image steer the triplane from step 1.

    The ViT's position embeddings start at transformers' std 0.02 against patch features of
    std ~0.5: image tokens say what a patch shows but not where it is, so no triplane token can
    look up "the patch at row 3, column 5". `position_std` makes position as loud as content.
    Then the query and key weights of every cross-attention are scaled by
    `cross_attention_gain`.

    With PyTorch's init the attention logits are so small that each triplane token sees the
    plain mean of the image tokens, mostly background: every object looks alike, and the model
    learns one mean shape and stays there (val PSNR flat at 12.4 dB from step 500 to 1500).
    Logits x16 let tokens pick image patches from the start: 18.2 dB instead of 14.6 dB after
    200 steps fitting 8 objects.
    """
    with torch.no_grad():
        model.image_tokenizer.model.embeddings.position_embeddings.normal_(0.0, position_std)
        for block in model.backbone.transformer_blocks:
            block.attn2.to_q.weight.mul_(cross_attention_gain)
            block.attn2.to_k.weight.mul_(cross_attention_gain)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ASSETS / "classroom", help="model folder")
    parser.add_argument("--data", type=Path, default=Path("data/pretrain"), help="dataset folder")
    parser.add_argument("--objects", type=int, default=4000, help="generated primitives")
    parser.add_argument("--views", type=int, default=5, help="views per object (view 0 = input)")
    parser.add_argument("--size", type=int, default=128, help="render size = cond image size")
    parser.add_argument(
        "--occupancy-points",
        type=int,
        default=2048,
        help="labelled 3D points built per object; each step draws as many (with replacement)",
    )
    parser.add_argument("--steps", type=int, default=4800, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=4, help="objects per step")
    parser.add_argument("--rays", type=int, default=512, help="rays per object and step")
    parser.add_argument(
        "--lambda-occupancy", type=float, default=2.0, help="weight of the occupancy BCE"
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--lr-scale-head", type=float, default=10.0, help="lr multiplier: decoder, upsampler"
    )
    parser.add_argument("--level", type=float, default=10.0, help="density_act at the surface")
    parser.add_argument(
        "--cross-attention-gain",
        type=float,
        default=4.0,
        help="initial scale of the cross-attention query and key weights (1: PyTorch's init)",
    )
    parser.add_argument(
        "--position-std", type=float, default=1.0, help="initial std of the ViT position embeddings"
    )
    parser.add_argument("--seed", type=int, default=0, help="data, init and training seed")
    parser.add_argument("--workers", type=int, default=None, help="data generation processes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()

    # ---- data: primitives rendered in TripoSR's cameras, with occupancy samples
    data_summary = prepare_dataset(
        args.data, families=("primitives",), n_objects=args.objects, n_views=args.views,
        size=args.size, seed=args.seed, occupancy_points=args.occupancy_points,
        workers=args.workers,
    )  # fmt: skip
    data_seconds = time.perf_counter() - started
    train = MultiViewDataset(args.data, "train", cond_size=args.size, seed=args.seed)
    val = MultiViewDataset(args.data, "val", cond_size=args.size, seed=args.seed)

    # ---- model and training: all weights, from scratch
    config = load_config(CLASSROOM_CONFIG)
    model = TSR.from_config(config, seed=args.seed)
    init_for_pretraining(model, args.cross_attention_gain, args.position_std)
    model.source = "classroom (pretrain.py)"
    train_config = TrainConfig(
        train_mode="full", batch_size=args.batch_size, rays_per_object=args.rays,
        max_steps=args.steps, lr=args.lr, lr_scale_head=args.lr_scale_head, warmup_fraction=0.03, min_lr_ratio=0.05,
        lambda_mask=0.1, lambda_lpips=0.0, lambda_occupancy=args.lambda_occupancy, occupancy_level=args.level,
        occupancy_points=args.occupancy_points,
        seed=args.seed, val_every=250, val_objects=16, checkpoint_every=250,
    )  # fmt: skip
    run_dir = Path("outputs") / f"pretrain-{args.out.name}"  # checkpoints, metrics.jsonl
    train_started = time.perf_counter()
    result = fit(model, train, train_config, val_dataset=val, output_dir=run_dir)
    train_seconds = time.perf_counter() - train_started

    # ---- the model's own marching-cubes threshold, chosen on validation objects
    threshold, threshold_scores = best_threshold_by_chamfer(model, val, around=args.level)
    model.config.mc_threshold = threshold
    total_seconds = time.perf_counter() - started

    # ---- ship: config + safetensors + the recipe and its numbers
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    (args.out / "model.ckpt").unlink(missing_ok=True)
    shutil.copy(run_dir / "loss.png", args.out / "loss.png")
    last_validation = [r for r in result.history if "val_loss" in r][-1]
    recipe = {
        "command": "python pretrain.py " + " ".join(argv or []),
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train_config": train_config.__dict__,
        "data": {k: v for k, v in data_summary.items() if k != "skipped"},
        "seconds": {"data": data_seconds, "train": train_seconds, "total": total_seconds},
        "steps": result.steps,
        "last_validation": last_validation,
        "mc_threshold": threshold,
        "threshold_scores": threshold_scores,
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
    print(
        f"{args.out}: {recipe['parameters']:,} parameters, {result.steps} steps, threshold "
        f"{threshold:g}; {total_seconds / 60:.1f} min in all ({data_seconds / 60:.1f} data)"
    )


if __name__ == "__main__":
    main()
