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

import tsr  # noqa: F401  first, before torch: it sets OMP_WAIT_POLICY (tsr/__init__.py)

# isort: split
import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

import torch

from tsr.errors import (
    ArgumentParser,
    UserInputError,
    check_device,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    run_cli,
)
from tsr.files import copy_file
from tsr.io import DEFAULT_MODEL
from tsr.model import TSR
from utils.cli import field_comments, flag_type, given_flags
from utils.data import input_folder
from utils.training import adapters, lora
from utils.training.checkpoint import (
    checkpoint_file,
    load_checkpoint,
    refuse_resume_conflicts,
    start_afresh,
)
from utils.training.config import TrainConfig
from utils.training.train import fit

# TrainConfig fields that have a course-style flag of their own below
MAPPED_FIELDS = {
    "train_mode", "batch_size", "lr", "epochs", "max_steps", "rays_per_object", "sampling",
    "patch_size", "val_every", "resume_from", "grad_checkpointing", "seed",
}  # fmt: skip
# the TrainConfig fields a flag sets where their names differ
FLAG_FIELDS = {"rays": ("rays_per_object", "sampling"), "patch": ("patch_size", "sampling"),
               "full": ("train_mode",)}  # fmt: skip
FIELD_FLAGS = {name: f"--{flag}" for flag, names in FLAG_FIELDS.items() for name in names}
LORA_FLAGS = {"r": "r", "alpha": "alpha", "dropout": "dropout"}  # flag -> lora_settings key


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="fine_tuning.py", description=__doc__.split("\n\n")[0])
    course = parser.add_argument_group("course project flags")
    course.add_argument("--input_folder", required=True, help="dataset folder (prepare_data.py)")
    course.add_argument("--output_dir", default="outputs_lora", help="runs go to OUTPUT_DIR/<run>")
    course.add_argument(
        "--batch_size", type=positive_int, default=1, help="objects per step and process"
    )
    course.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW peak learning rate")
    course.add_argument(
        "--epochs", type=positive_int, default=100, help="passes over the train objects"
    )
    course.add_argument("--r", type=positive_int, default=16, help="LoRA rank")
    course.add_argument(
        "--alpha", type=positive_float, default=16, help="LoRA alpha (scale = alpha / r)"
    )
    course.add_argument(
        "--dropout", type=probability, default=0.05, help="dropout on the LoRA path"
    )
    course.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    ours = parser.add_argument_group("workbook flags")
    ours.add_argument(
        "--pretrained", default=DEFAULT_MODEL, help="base model: shipped name, folder or Hub id"
    )
    ours.add_argument("--run_name", default=None, help="run folder name (default: time stamp)")
    ours.add_argument(
        "--overwrite", action="store_true", help="replace an existing run of the same name"
    )
    ours.add_argument(
        "--max_steps", type=positive_int, default=None, help="optimiser steps (overrides --epochs)"
    )
    sampling = ours.add_mutually_exclusive_group()
    sampling.add_argument(
        "--rays", type=non_negative_int, default=None, help="random rays per object and step"
    )
    sampling.add_argument(
        "--patch", type=positive_int, default=None, help="supervise S x S patches instead"
    )
    ours.add_argument(
        "--views", type=positive_int, default=4, help="supervision views per object (k)"
    )
    ours.add_argument(
        "--val_every", type=non_negative_int, default=50, help="steps between validations"
    )
    ours.add_argument(
        "--resume", nargs="?", const="latest", default=None,
        help="continue a run (its settings, unless flags change them): its folder or "
        "checkpoint; alone: the newest run in OUTPUT_DIR",
    )  # fmt: skip
    ours.add_argument("--targets", default="attn", help="LoRA targets: attn, self, cross, attn+ff")
    ours.add_argument(
        "--grad_checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="recompute backbone blocks in backward (default: on for the full-size model)",
    )  # fmt: skip
    ours.add_argument(
        "--seed", type=non_negative_int, default=0,
        help="seeds the LoRA init, data order, rays and dropout",
    )  # fmt: skip
    ours.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    more = parser.add_argument_group("other TrainConfig fields (see utils/training/config.py)")
    comments = field_comments(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name not in MAPPED_FIELDS:
            more.add_argument(
                f"--{field.name}", type=flag_type(TrainConfig, field.name), default=field.default,
                help=f"{comments.get(field.name, '')} (default {field.default})",
            )  # fmt: skip
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _flag_values(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the flags say, one to one."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if hasattr(args, f.name)}  # fmt: skip
    values.update(
        train_mode="full" if args.full else "lora",
        sampling="patches" if args.patch is not None else "rays",
    )
    if args.rays is not None:  # 0 is a value (3D losses only), not "unset"
        values["rays_per_object"] = args.rays
    if args.patch is not None:
        values["patch_size"] = args.patch
    return values


def _make_config(values: dict) -> TrainConfig:
    """TrainConfig, its refusals naming the flags rather than the fields."""
    try:
        return TrainConfig(**values)
    except UserInputError as error:
        fields = error.where.split(", ")
        flags = sorted({FIELD_FLAGS.get(name, f"--{name}") for name in fields})
        raise UserInputError(error.what, ", ".join(flags), error.fix) from error


def train_config(args: argparse.Namespace, resume_from: str | None) -> TrainConfig:
    """The flags mapped one to one onto the dataclass."""
    return _make_config({**_flag_values(args), "resume_from": resume_from})


def resumed_config(
    args: argparse.Namespace, given: set[str], saved: dict, resume_from: str
) -> TrainConfig:
    """A resumed run's settings: its checkpoint's, changed only where a flag was typed."""
    flagged = _flag_values(args)
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in saved.items() if name in fields}
    for flag in given:
        values.update({name: flagged[name] for name in FLAG_FIELDS.get(flag, (flag,))
                       if name in flagged})  # fmt: skip
    return _make_config({**values, "resume_from": resume_from})


def resolve_run(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The run folder, and the checkpoint to resume from (None for a fresh run)."""
    output_dir = Path(args.output_dir)
    if args.resume is None:
        name = args.run_name or time.strftime(f"{'full' if args.full else 'lora'}-%Y%m%d-%H%M%S")
        if not re.fullmatch(r"[\w.+-]+", name) or set(name) == {"."}:
            raise UserInputError(
                f"{name!r} is not a plain folder name", "--run_name",
                "use letters, digits, '.', '_', '+' or '-' (runs go into --output_dir)",
            )  # fmt: skip
        return output_dir / name, None
    if args.resume != "latest":
        checkpoint = checkpoint_file(args.resume)
        return checkpoint.parent.parent, str(checkpoint)
    runs = sorted(output_dir.glob("*/checkpoints/last.pt"), key=os.path.getmtime)
    if not runs:
        raise UserInputError(
            "no run with checkpoints/last.pt to resume", output_dir,
            "pass the run folder to --resume, or start a new run without --resume",
        )  # fmt: skip
    return runs[-1].parent.parent, str(runs[-1])


def settings_to_resume(
    parser: ArgumentParser, args: argparse.Namespace, argv: list[str] | None, checkpoint: str
) -> tuple[TrainConfig, dict, int]:
    """The run's TrainConfig, base model, LoRA settings and supervision views from its
    checkpoint, changed where a flag was typed; a change a resumed run cannot make is refused
    here, before any work. -> (config, base model, LoRA settings, views)"""
    saved = load_checkpoint(checkpoint, mmap=True)["config"]
    given = given_flags(parser, argv)
    config = resumed_config(args, given, saved, checkpoint)
    saved_lora = saved.get("lora") or {}  # older checkpoints: the flags, checked by shape
    settings = {
        name: getattr(args, name) if name in given or name not in saved_lora else saved_lora[name]
        for name in ("r", "alpha", "dropout")
    }
    settings["targets"] = saved_lora.get("targets", args.targets)
    if "targets" in given:
        settings["targets"] = args.targets  # a preset: fit() compares the layers it names
    views = args.views if "views" in given else saved.get("supervision_views") or args.views
    pretrained = args.pretrained
    if "pretrained" not in given and saved.get("base_model"):
        pretrained = saved["base_model"]
    # targets stay the run's here: a preset's layers are compared by fit() once resolved
    wanted_lora = {**saved_lora, **{k: settings[k] for k in ("r", "alpha", "dropout")}}
    wanted = {**dataclasses.asdict(config), "supervision_views": views, "lora": wanted_lora,
              "base_model": pretrained}  # fmt: skip
    refuse_resume_conflicts(saved, wanted, checkpoint)
    return config, pretrained, settings, views


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    run_dir, resume_from = resolve_run(args)
    if resume_from:
        config, pretrained, lora_settings, views = settings_to_resume(
            parser, args, argv, resume_from
        )
    else:
        pretrained = args.pretrained
        config = train_config(args, None)
        lora_settings = {"r": args.r, "alpha": args.alpha, "dropout": args.dropout,
                         "targets": args.targets}  # fmt: skip
        views = args.views
        start_afresh(run_dir, args.overwrite, remove=False)  # refuse now, not after loading
    folder = Path(args.input_folder)
    layout = input_folder.check_input_folder(folder)

    model = TSR.from_pretrained(pretrained)
    if config.train_mode == "lora":
        lora.add_lora(model, **lora_settings, seed=config.seed)
    model.to(device)
    train_set, val_set = input_folder.load_datasets(
        folder, layout, views, model.config.cond_image_size, config.seed
    )
    result = fit(
        model, train_set, config, val_dataset=val_set, output_dir=run_dir, overwrite=args.overwrite
    )
    if result.artefact is not None and config.train_mode == "lora":
        course_file = adapters.export_course_adapter(model, run_dir / "lora_weights.pth")
        copy_file(course_file, Path(args.output_dir) / "lora_weights.pth")
    if result.artefact is not None:
        print(f"saved {result.artefact} after {result.steps} steps; metrics in {run_dir}")
    return run_dir


if __name__ == "__main__":
    sys.exit(run_cli(main))
