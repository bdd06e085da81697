"""What fine_tuning.py trains on: a prepare_data.py set (split.json) or the course project's
layout (IMG/MASK/Depth/cams.json per object), checked whole before any model loads, then read
as datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tsr.errors import UserInputError
from utils.data import course_layout
from utils.data import dataset as data
from utils.data.check import check_dataset, course_layout_problems, raise_if_problems


def course_object_dirs(folder: Path) -> list[Path]:
    """The course layout's objects: `folder` itself or its sub-folders with a cams.json."""
    if (folder / "cams.json").is_file():
        return [folder]
    return sorted(path.parent for path in folder.glob("*/cams.json"))


def check_input_folder(folder: Path) -> str:
    """Which layout `folder` holds ("prepared" or "course"), after checking every object the
    run reads: all problems at once, before any model is loaded."""
    if not folder.is_dir():
        raise UserInputError(
            "no such folder", folder, "pass a dataset folder built by prepare_data.py --out"
        )
    if (folder / "split.json").is_file():
        check_dataset(folder, ("train", "val"))
        return "prepared"
    object_dirs = course_object_dirs(folder)
    if object_dirs:
        raise_if_problems([p for d in object_dirs for p in course_layout_problems(d)], folder)
        return "course"
    raise UserInputError(
        "neither a prepare_data.py set (split.json) nor the course layout (cams.json)", folder,
        f"build one with `python prepare_data.py --out {folder}`",
    )  # fmt: skip


def course_layout_items(folder: Path, cond_size: int) -> list[dict]:
    """The course project's IMG/MASK/Depth/cams.json folders (one object each: `folder` itself
    or its sub-folders) as dataset items, all views supervising, in our conventions."""
    items = []
    for object_dir in course_object_dirs(folder):
        views = course_layout.load_course_layout(object_dir)
        if views["fovy_deg"] is None:
            raise UserInputError(
                "K is not square and centred, which TripoSR's cameras cannot express",
                object_dir / "cams.json", "re-render the views with a centred principal point",
            )  # fmt: skip
        views["view_indices"] = np.arange(len(views["rgba"]))  # every view supervises
        items.append(data.make_item(object_dir.name, views, cond_size))
    return items


def load_datasets(folder: Path, layout: str, n_views: int, cond_size: int, seed: int) -> tuple:
    """(train, val or None) from a checked prepare_data.py set or course project layout;
    conditioning images at cond_size (the model's cond_image_size)."""
    if layout == "prepared":
        train_set, val_set = (
            data.MultiViewDataset(folder, split, n_views, cond_size, seed=seed, check=False)
            for split in ("train", "val")
        )
        return train_set, val_set if len(val_set) else None
    print(f"{folder}: the course project's layout; every object trains, none validates")
    return course_layout_items(folder, cond_size), None
