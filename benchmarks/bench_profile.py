"""Notebook 03's training at a model's profile: a few fit() steps with the profile's recipe on
a device, on objects rendered at the profile's dataset size. Reports seconds per step, peak
RSS and the CUDA memory peak; --find-batch doubles the batch until it no longer fits.

    python benchmarks/bench_profile.py --model classroom --steps 2
    python benchmarks/bench_profile.py --model outputs/rehearsal/model --steps 2
    python benchmarks/bench_profile.py --model outputs/rehearsal/model --device cuda --find-batch

Each case runs in a fresh process, so its peak RSS (ru_maxrss) is its own. The first step
pays for one-off work (allocations, kernel choices): "step_s" is the mean of the later ones
(the first alone when there is one step). The data is a few objects of the profile's
family at its dataset size and views, built once in --data-root.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from tsr.model import TSR
from utils.data.build import prepare_dataset
from utils.data.dataset import MultiViewDataset
from utils.training import lora, recipes
from utils.training.config import TrainConfig
from utils.training.profiles import Profile
from utils.training.train import fit

OUT_OF_MEMORY = 3  # a case's exit status when its batch does not fit


def bench_data(profile: Profile, root: Path, n_objects: int) -> Path:
    """`n_objects` objects at the profile's dataset settings (size, views, 3D points)."""
    folder = root / f"{profile.name}-{n_objects}"
    prepare_dataset(folder, **{**profile.dataset, "n_objects": n_objects})
    return folder


def run_case(args: argparse.Namespace) -> dict:
    """One fit() of args.steps steps in this process. -> its measurements"""
    model = TSR.from_pretrained(args.model)
    profile = recipes.profile_for(model, args.device)
    settings = profile.train_settings(args.device)
    if args.batch_size:
        settings |= {"batch_size": args.batch_size, "grad_accum_steps": 1}
    config = TrainConfig(**settings, max_steps=args.steps, val_every=0, checkpoint_every=0)
    train = MultiViewDataset(args.data, "train", 4, cond_size=model.config.cond_image_size)
    lora.add_lora(model, r=16, alpha=16, dropout=0.05)  # notebook 03's adapter
    model.to(args.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    # overwrite: each case replaces the previous case's run (fit() refuses otherwise)
    result = fit(model, train, config, output_dir=Path(args.out) / "run", overwrite=True)
    seconds = [r["seconds"] for r in result.history if "seconds" in r]
    return {
        "profile": profile.name, "device": args.device, "steps": len(seconds),
        "batch_size": config.batch_size, "grad_accum_steps": config.grad_accum_steps,
        "sampling": config.sampling, "rays_per_object": config.rays_per_object,
        "patch_size": config.patch_size, "grad_checkpointing": config.grad_checkpointing,
        "mixed_precision": config.mixed_precision,
        "first_step_s": round(seconds[0], 2),
        "step_s": round(sum(seconds[1:]) / len(seconds[1:]) if len(seconds) > 1 else seconds[0], 2),
        "fit_s": round(time.perf_counter() - started, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rss_before_steps_gb": round(rss_before / 1024, 2),
        "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.device.startswith("cuda") else None,
    }  # fmt: skip


def spawn(args: argparse.Namespace, batch_size: int | None) -> dict | None:
    """run_case in a fresh process. -> its record, or None when the batch did not fit"""
    command = [sys.executable, __file__, "--case", "--model", args.model, "--device",
               args.device, "--steps", str(args.steps), "--data", str(args.data), "--out",
               str(args.out), "--batch-size", str(batch_size or 0)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode == OUT_OF_MEMORY:
        return None
    if done.returncode != 0:
        raise SystemExit(f"case failed (batch {batch_size}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="classroom", help="shipped name, folder or Hub id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per case")
    parser.add_argument("--objects", type=int, default=6, help="objects rendered for the run")
    parser.add_argument("--find-batch", action="store_true", help="double the batch until OOM")
    parser.add_argument("--max-batch", type=int, default=64, help="where --find-batch stops")
    parser.add_argument("--data-root", type=Path, default=Path("outputs/bench_profile"))
    parser.add_argument("--json", type=Path, default=Path("outputs/bench_profile.json"))
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_profile/run"))
    parser.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        try:
            print(json.dumps(run_case(args)))
        except torch.cuda.OutOfMemoryError:
            return OUT_OF_MEMORY
        return 0

    profile = recipes.profile_for(args.model, args.device)
    args.data = bench_data(profile, args.data_root, args.objects)
    records = [spawn(args, None)]  # the profile's own settings
    print(json.dumps(records[0]))
    if args.find_batch:
        batch = records[0]["batch_size"]
        while batch * 2 <= args.max_batch and (record := spawn(args, batch * 2)) is not None:
            batch *= 2
            records.append(record)
            print(json.dumps(record))
        print(f"largest batch that fits: {batch} objects per micro-batch")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
