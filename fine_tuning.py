"""Fine-tune TripoSR with LoRA (or train all weights with --full) on a multi-view dataset.

    python fine_tuning.py --input_folder data/parts --output_dir outputs_lora/ \
        --batch_size 1 --lr 1e-4 --epochs 100 --r 16 --alpha 16 --dropout 0.05

The course project's flags keep their names and meanings; ours are added beside them and
every other `TrainConfig` field is a flag of the same name. Writes outputs_lora/<run>/:
adapter/ (peft format), lora_weights.pth (the course format, also copied to
<output_dir>/lora_weights.pth where the course's inference looks), config.json,
metrics.jsonl, loss.png and checkpoints/last.pt. Under torchrun each process trains a shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import shutil
import time
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tsr.io import DEFAULT_MODEL
from tsr.model import TSR
from utils.data import course_layout
from utils.data import dataset as data
from utils.training import adapters, lora
from utils.training.config import TrainConfig
from utils.training.train import fit

# TrainConfig fields that have a course-style flag of their own below
MAPPED_FIELDS = {
    "train_mode", "batch_size", "lr", "epochs", "max_steps", "rays_per_object", "sampling",
    "patch_size", "val_every", "resume_from", "grad_checkpointing", "seed",
}  # fmt: skip


def field_comments(cls: type) -> dict[str, str]:
    """The why-comment after each dataclass field in the source, to serve as --help."""
    field_line = re.compile(r"^\s+(\w+): [^#]*#\s*(.+)$")
    lines = inspect.getsource(cls).splitlines()
    return {m.group(1): m.group(2) for line in lines if (m := field_line.match(line))}


def strict_bool(text: str) -> bool:
    """'true'/'false' (also 1/0, yes/no, on/off); anything else is an error, never False."""
    value = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}.get(text.lower())  # fmt: skip
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def flag_type(cls: type, name: str) -> Callable[[str], object]:
    """The parser of a dataclass field's flag, from its annotation: `float | None` parses a
    float (the flag's default stays None), bool parses strictly."""
    kind = typing.get_type_hints(cls)[name]
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # X | None -> X
    return strict_bool if kind is bool else kind


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    course = parser.add_argument_group("course project flags")
    course.add_argument("--input_folder", required=True, help="dataset folder (prepare_data.py)")
    course.add_argument("--output_dir", default="outputs_lora", help="runs go to OUTPUT_DIR/<run>")
    course.add_argument("--batch_size", type=int, default=1, help="objects per step and process")
    course.add_argument("--lr", type=float, default=1e-4, help="AdamW peak learning rate")
    course.add_argument("--epochs", type=int, default=100, help="passes over the train objects")
    course.add_argument("--r", type=int, default=16, help="LoRA rank")
    course.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scale = alpha / r)")
    course.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA path")
    course.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    ours = parser.add_argument_group("workbook flags")
    ours.add_argument(
        "--pretrained", default=DEFAULT_MODEL, help="base model: shipped name, folder or Hub id"
    )
    ours.add_argument("--run_name", default=None, help="run folder name (default: time stamp)")
    ours.add_argument(
        "--max_steps", type=int, default=None, help="optimiser steps (overrides --epochs)"
    )
    sampling = ours.add_mutually_exclusive_group()
    sampling.add_argument("--rays", type=int, default=None, help="random rays per object and step")
    sampling.add_argument("--patch", type=int, default=None, help="supervise S x S patches instead")
    ours.add_argument("--views", type=int, default=4, help="supervision views per object (k)")
    ours.add_argument("--val_every", type=int, default=50, help="steps between validations")
    ours.add_argument(
        "--resume", nargs="?", const="latest", default=None,
        help="continue a run: its folder or checkpoint; alone: the newest run in OUTPUT_DIR",
    )  # fmt: skip
    ours.add_argument("--targets", default="attn", help="LoRA targets: attn, self, cross, attn+ff")
    ours.add_argument(
        "--grad_checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="recompute backbone blocks in backward (default: on for the full-size model)",
    )  # fmt: skip
    ours.add_argument("--seed", type=int, default=0, help="seeds data order, rays and dropout")
    ours.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    more = parser.add_argument_group("other TrainConfig fields (see utils/training/config.py)")
    comments = field_comments(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name not in MAPPED_FIELDS:
            more.add_argument(
                f"--{field.name}", type=flag_type(TrainConfig, field.name), default=field.default,
                help=f"{comments.get(field.name, '')} (default {field.default})",
            )  # fmt: skip
    return parser.parse_args(argv)


def train_config(args: argparse.Namespace, resume_from: str | None) -> TrainConfig:
    """The flags mapped one to one onto the dataclass."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    values.update(
        train_mode="full" if args.full else "lora",
        sampling="patches" if args.patch is not None else "rays",
        resume_from=resume_from,
    )
    if args.rays is not None:  # 0 is a value (3D losses only), not "unset"
        values["rays_per_object"] = args.rays
    if args.patch is not None:
        values["patch_size"] = args.patch
    return TrainConfig(**values)


def resolve_run(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The run folder, and the checkpoint to resume from (None for a fresh run)."""
    output_dir = Path(args.output_dir)
    if args.resume is None:
        name = args.run_name or time.strftime(f"{'full' if args.full else 'lora'}-%Y%m%d-%H%M%S")
        return output_dir / name, None
    if args.resume != "latest":
        resume = Path(args.resume)
        run_dir = resume.parent.parent if resume.is_file() else resume
        return run_dir, str(resume)
    runs = sorted(output_dir.glob("*/checkpoints/last.pt"), key=os.path.getmtime)
    if not runs:
        raise SystemExit(f"--resume: no run with checkpoints/last.pt in {output_dir}")
    return runs[-1].parent.parent, str(runs[-1])


def course_layout_items(folder: Path, cond_size: int) -> list[dict]:
    """The course project's IMG/MASK/Depth/cams.json folders (one object each: `folder` itself
    or its sub-folders) as dataset items, all views supervising, in our conventions."""
    object_dirs = [folder] if (folder / "cams.json").is_file() else sorted(
        path.parent for path in folder.glob("*/cams.json")
    )  # fmt: skip
    items = []
    for object_dir in object_dirs:
        views = course_layout.load_course_layout(object_dir)
        if views["fovy_deg"] is None:
            raise ValueError(
                f"{object_dir}/cams.json: K is not square and centred, which TripoSR's cameras "
                "cannot express; re-render the views with a centred principal point"
            )
        views["view_indices"] = np.arange(len(views["rgba"]))  # every view supervises
        items.append(data.make_item(object_dir.name, views, cond_size))
    return items


def load_datasets(folder: Path, n_views: int, model: TSR) -> tuple:
    """(train, val or None) from a prepare_data.py set or the course project's layout."""
    cond_size = model.config.cond_image_size
    if (folder / "split.json").is_file():
        train_set, val_set = (
            data.MultiViewDataset(folder, split, n_supervision_views=n_views, cond_size=cond_size)
            for split in ("train", "val")
        )
        return train_set, val_set if len(val_set) else None
    if (folder / "cams.json").is_file() or any(folder.glob("*/cams.json")):
        print(f"{folder}: the course project's layout; every object trains, none validates")
        return course_layout_items(folder, cond_size), None
    raise SystemExit(
        f"--input_folder {folder}: neither a prepare_data.py set (split.json) nor the course "
        "layout (cams.json); build one with `python prepare_data.py --out DATA`"
    )


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    run_dir, resume_from = resolve_run(args)
    config = train_config(args, resume_from)

    model = TSR.from_pretrained(args.pretrained)
    if config.train_mode == "lora":
        lora.add_lora(model, r=args.r, alpha=args.alpha, dropout=args.dropout, targets=args.targets)
    model.to(device)
    train_set, val_set = load_datasets(Path(args.input_folder), args.views, model)
    result = fit(model, train_set, config, val_dataset=val_set, output_dir=run_dir)
    if result.artefact is not None and config.train_mode == "lora":
        course_file = adapters.export_course_adapter(model, run_dir / "lora_weights.pth")
        shutil.copyfile(course_file, Path(args.output_dir) / "lora_weights.pth")
    if result.artefact is not None:
        print(f"saved {result.artefact} after {result.steps} steps; metrics in {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
