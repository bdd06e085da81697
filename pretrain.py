"""Pretrain the classroom model: a small TripoSR trained from scratch on generated primitives.

One command builds the data (6000 primitives x 3 views, each with 2048 labelled 3D points;
6 min) and trains (18,000 steps in two one-core processes, 44 min on 2 CPU cores), then picks
the marching-cubes threshold on validation objects (50.0 min in all for the shipped model):

    python pretrain.py                       # -> tsr/assets/classroom/ (the shipped model)
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

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tsr.config import ASSETS, load_config
from tsr.model import TSR
from utils.build_dataset import prepare_dataset
from utils.data import MultiViewDataset
from utils.evaluation import best_threshold_by_chamfer
from utils.prepare_object import DISTANCE, FOVY_DEG
from utils.train import TrainConfig, fit

CLASSROOM_CONFIG = ASSETS / "classroom-config.yaml"
# Fourier frequencies per image axis of the geometric lookup: it takes the first 4 x this
# many channels of the image and triplane tokens; the colour lookup's channels come after.
POSITION_FREQUENCIES = 8


def init_for_pretraining(
    model: TSR,
    cross_attention_gain: float,
    position_std: float,
    geometric_heads: int,
    colour_lookup: float = 0.0,
    seed: int = 0,
) -> None:
    """Init changes that let the image steer the triplane from step 1.

    The ViT's position embeddings start at transformers' std 0.02 against patch features of
    std ~0.5: image tokens say what a patch shows but not where it is, so no triplane token can
    look up "the patch at row 3, column 5". `position_std` makes position as loud as content.
    Then the query and key weights of every cross-attention are scaled by
    `cross_attention_gain`.
    `colour_lookup` > 0 builds a colour path with that amplitude (see `add_colour_lookup`).
    `seed` draws the position embeddings (from torch's global generator they would differ
    between processes: torch seeds it from the OS at start-up).

    With PyTorch's init the attention logits are so small that each triplane token sees the
    plain mean of the image tokens, mostly background: every object looks alike, and the model
    learns one mean shape and stays there (val PSNR flat at 12.4 dB from step 500 to 1500).
    Logits x16 let tokens pick image patches from the start: 18.2 dB instead of 14.6 dB after
    200 steps fitting 8 objects.

    Those tokens still do not know *which* patch is theirs, and training does not find out:
    in the earlier classroom model (16² planes, 4800 steps), a (y, z)-plane cell put 0.16-0.21
    of its attention on the 3x3 patches around the one it projects to, as uniform attention
    would (9/64 = 0.14). `geometric_heads` of each cross-attention start with that lookup built in
    (see `geometric_cross_attention`).
    """
    with torch.no_grad():
        model.image_tokenizer.model.embeddings.position_embeddings.normal_(
            0.0, position_std, generator=torch.Generator().manual_seed(seed)
        )
        for block in model.backbone.transformer_blocks:
            block.attn2.to_q.weight.mul_(cross_attention_gain)
            block.attn2.to_k.weight.mul_(cross_attention_gain)
    if geometric_heads:
        geometric_cross_attention(model, geometric_heads)
    if colour_lookup:
        add_colour_lookup(model, colour_lookup)


def _fourier(u: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """(...,) coordinates in ~[-1, 1] -> (..., 2F) features; f(u) . f(u') = mean cos(w (u - u')),
    1 at u = u' and small a patch or more away."""
    omega = torch.linspace(1.0, 3.0 * math.pi, n_frequencies)
    angles = u[..., None] * omega
    return torch.cat([angles.cos(), angles.sin()], dim=-1) / math.sqrt(n_frequencies)


def geometric_cross_attention(
    model: TSR,
    heads: int,
    amplitude: float = 3.0,
    gain: float = 3.0,
    n_frequencies: int = POSITION_FREQUENCIES,
) -> None:
    """Make triplane cells attend to the image patch they project to in the input view.

    The conditioning camera is fixed (view 0: distance 1.9, fovy 40, looking down -x, so image
    columns follow world y and rows follow -z). The first 2F channels of the ViT position
    embeddings become Fourier features of each patch's (row, column); the same channels of the
    triplane embeddings become Fourier features of where each cell projects: (row, column)
    for the (y, z) plane, the column alone for (x, y), the row alone for (x, z) (x is depth).
    `proj_in` passes those channels through unchanged, and the first `heads` heads of every
    cross-attention compare them (query and key += gain * identity): at init a cell then puts
    0.45-0.65 of those heads' attention within one patch of its own (0.14 if uniform). The
    other heads keep their content-based attention, and all of it stays trainable.

    Measured from scratch on 48 validation objects with the earlier 16^2-plane recipe: after
    450 steps occupancy BCE / IoU 0.491 / 0.428 with 2 geometric heads, 0.492 / 0.431 with all
    4, 0.501 / 0.414 with none; weaker features (amplitude 1, gain 2) were lost in the random
    logits (0.497 / 0.429), and all 4 heads without the other position channels was worse than
    none (0.518 / 0.349). After 1200 steps, Chamfer-L1 / F@0.05 0.0666 / 0.522 with 2 heads
    against 0.0673 / 0.504 without: a small gain, kept.
    """
    vit_embeddings = model.image_tokenizer.model.embeddings
    grid = math.isqrt(vit_embeddings.position_embeddings.shape[1] - 1)  # patches per side
    plane_size, radius = model.tokenizer.plane_size, model.renderer.config.radius
    width = 2 * n_frequencies  # channels per image axis
    # world length -> image coordinate in [-1, 1], for points at the origin's depth
    world_to_image = 1.0 / (math.tan(math.radians(FOVY_DEG) / 2) * DISTANCE)
    with torch.no_grad():
        patch_centres = (2 * torch.arange(grid) + 1) / grid - 1  # (g,), top/left = -1
        patch_features = _fourier(patch_centres, n_frequencies)  # (g, 2F)
        position = vit_embeddings.position_embeddings[0, 1:].view(grid, grid, -1)  # (g, g, C)
        position[..., :width] = amplitude * patch_features[:, None, :]  # row
        position[..., width : 2 * width] = amplitude * patch_features[None, :, :]  # column

        cell_centres = radius * ((2 * torch.arange(plane_size) + 1) / plane_size - 1)  # world
        column_of_y = amplitude * _fourier(cell_centres * world_to_image, n_frequencies).T
        row_of_z = amplitude * _fourier(-cell_centres * world_to_image, n_frequencies).T
        planes = model.tokenizer.embeddings  # (3, C, h, w): (x,y) h=y; (x,z) h=z; (y,z) h=z, w=y
        planes[:, : 2 * width] = 0
        planes[0, width : 2 * width] = column_of_y[:, :, None]
        planes[1, :width] = row_of_z[:, :, None]
        planes[2, :width] = row_of_z[:, :, None]
        planes[2, width : 2 * width] = column_of_y[:, None, :]

        backbone = model.backbone
        positional = 2 * width
        backbone.proj_in.weight[:positional] = 0
        backbone.proj_in.weight[:, :positional] = 0
        backbone.proj_in.weight[:positional, :positional] = torch.eye(positional)
        backbone.proj_in.bias[:positional] = 0
        for block in backbone.transformer_blocks:
            head_dim = block.attn2.to_q.weight.shape[0] // block.attn2.heads
            if head_dim < positional:
                raise ValueError(
                    f"geometric heads need head_dim >= {positional}: fewer frequencies"
                )
            for head in range(min(heads, block.attn2.heads)):
                rows = slice(head * head_dim, head * head_dim + positional)
                block.attn2.to_q.weight[rows, :positional] += gain * torch.eye(positional)
                block.attn2.to_k.weight[rows, :positional] += gain * torch.eye(positional)


def add_colour_lookup(
    model: TSR, amplitude: float = 3.0, first_channel: int = 4 * POSITION_FREQUENCIES
) -> None:
    """Give the scene code a path for the input's colour, from step 1.

    Trained without it, the classroom model rendered grey: a linear probe reads an object's
    hue from the ViT tokens (chromaticity error 0.11, grey 0.24), but not from the triplane
    tokens (0.18) or the scene code (0.27), and 18,000 steps of surface-colour loss never
    opened a way through (the decoded colour had R = G = B). So three channels, from
    `first_channel` on (past the geometric position channels), carry colour end to end at
    init: the patch embedding writes each patch's mean (normalised) R, G, B into them, the
    first head of every cross-attention reads them from the patch it looks up (its geometric
    lookup, see `geometric_cross_attention`) and writes them to the triplane token, which
    `proj_out` and the upsampler pass to the last 3 channels of each scene-code plane.
    Everything stays trainable, so the path lasts only if colour matters to the loss: at the
    colour weight of 1, 1200 steps had written over it; at 100 it carries the hue.
    """
    colour = slice(first_channel, first_channel + 3)
    vit = model.image_tokenizer.model.embeddings
    backbone = model.backbone
    upsample = model.post_processor.upsample  # ConvTranspose2d weight (C_in, C_out, 2, 2)
    code = slice(upsample.out_channels - 3, upsample.out_channels)
    blocks = backbone.transformer_blocks
    if min(block.attn2.to_v.weight.shape[0] // block.attn2.heads for block in blocks) < 3:
        raise ValueError("a colour lookup needs cross-attention heads of >= 3 channels")
    with torch.no_grad():
        patch = vit.patch_embeddings.projection  # Conv2d (C_vit, 3, p, p)
        patch.weight[colour] = 0
        patch.bias[colour] = 0
        for rgb in range(3):
            patch.weight[first_channel + rgb, rgb] = amplitude / patch.weight[0, 0].numel()
        vit.position_embeddings[..., colour] = 0
        vit.cls_token[..., colour] = 0
        # clean channels in the triplane stream: nothing but the looked-up colour at init
        model.tokenizer.embeddings[:, colour] = 0
        backbone.proj_in.weight[colour] = 0
        backbone.proj_in.bias[colour] = 0
        for block in blocks:
            attn = block.attn2
            attn.to_v.weight[:3] = 0  # head 0's first 3 value channels <- the patch colour
            attn.to_v.weight[:3, colour] = torch.eye(3)
            attn.to_out[0].weight[colour] = 0
            attn.to_out[0].weight[colour, :3] = torch.eye(3) / len(blocks)
            attn.to_out[0].bias[colour] = 0
        backbone.proj_out.weight[colour] = 0
        backbone.proj_out.weight[colour, colour] = torch.eye(3)
        backbone.proj_out.bias[colour] = 0
        upsample.weight[:, code] = 0
        upsample.weight[colour, code] = torch.eye(3)[:, :, None, None]
        upsample.bias[code] = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ASSETS / "classroom", help="model folder")
    parser.add_argument("--data", type=Path, default=Path("data/pretrain"), help="dataset folder")
    parser.add_argument("--objects", type=int, default=6000, help="generated primitives")
    parser.add_argument("--views", type=int, default=3, help="views per object (view 0 = input)")
    parser.add_argument("--size", type=int, default=128, help="render size = cond image size")
    parser.add_argument(
        "--occupancy-points",
        type=int,
        default=2048,
        help="labelled 3D points built per object; each step draws as many (with replacement)",
    )
    parser.add_argument("--steps", type=int, default=18000, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=4, help="objects per step")
    parser.add_argument("--rays", type=int, default=16, help="rendered rays per object and step")
    parser.add_argument(
        "--lambda-occupancy", type=float, default=2.0, help="weight of the occupancy loss"
    )
    parser.add_argument(
        "--sdf-scale",
        type=float,
        default=100.0,
        help="occupancy target: density logit = -scale x signed distance (0: BCE on the side)",
    )
    parser.add_argument(
        "--lambda-surface-colour",
        type=float,
        default=100.0,
        help="weight of the colour MSE at labelled points near the surface",
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
    parser.add_argument(
        "--geometric-heads",
        type=int,
        default=2,
        help="cross-attention heads per block that start out looking up the cell's own patch",
    )
    parser.add_argument(
        "--colour-lookup",
        type=float,
        default=3.0,
        help="amplitude of the input-colour path built at init (0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data, init and training seed")
    parser.add_argument("--workers", type=int, default=None, help="data generation processes")
    parser.add_argument(
        "--processes",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="training processes, one core each, averaging gradients (DDP over gloo)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint (built data is kept)",
    )
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> TSR:
    """The classroom architecture at its pretraining init; the same on every process."""
    model = TSR.from_config(load_config(CLASSROOM_CONFIG), seed=args.seed)
    init_for_pretraining(
        model,
        args.cross_attention_gain,
        args.position_std,
        args.geometric_heads,
        args.colour_lookup,
        args.seed,
    )
    model.source = "classroom (pretrain.py)"
    return model


def train_config_for(args: argparse.Namespace) -> TrainConfig:
    if args.batch_size % args.processes:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --processes")
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
    train = MultiViewDataset(args.data, "train", cond_size=args.size, seed=args.seed)
    val = MultiViewDataset(args.data, "val", cond_size=args.size, seed=args.seed)
    fit(
        build_model(args),
        train,
        train_config_for(args),
        val_dataset=val,
        output_dir=run_dir_for(args),
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    shutil.copy(run_dir / "loss.png", args.out / "loss.png")
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
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
    print(
        f"{args.out}: {recipe['parameters']:,} parameters, {recipe['steps']} steps, threshold "
        f"{threshold:g}; {total_seconds / 60:.1f} min in all ({data_seconds / 60:.1f} data)"
    )


if __name__ == "__main__":
    main()
