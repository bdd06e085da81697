"""Is a dataset folder readable, before any training or evaluation starts?

A missing view or a camera without its field of view used to surface after the first step as
a raw KeyError or a numpy broadcast error that named no file. These checks read only what is
cheap (json files, image and .npy headers), look at every object of the splits asked for and
report ALL problems in one error, each as `<what> (<file>): <what to do>`.

Reader side: imports no dataset builder, like `utils.data.dataset`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from tsr.errors import UserInputError

SHOWN_PROBLEMS = 30  # a broken set can have thousands; the first ones tell what is wrong


def cams_views(cams: dict | list) -> list[dict]:
    """The course layout's cams.json as {"views": [...]}, a bare list, or {"000": {...}, ...}
    -> list of views."""
    if isinstance(cams, list):
        return cams
    if "views" in cams:
        return cams["views"]
    return [cams[key] for key in sorted(k for k in cams if isinstance(cams[k], dict))]


def _read_json(path: Path, problems: list[str], fix: str):
    if not path.is_file():
        problems.append(f"missing ({path}): {fix}")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        problems.append(f"not readable JSON: {error} ({path}): {fix}")
        return None


def _image_size(path: Path, problems: list[str], fix: str, mode: str | None = None):
    """(width, height) from the header, or None with the problem noted."""
    if not path.is_file():
        problems.append(f"missing ({path}): {fix}")
        return None
    try:
        with Image.open(path) as image:
            size, found = image.size, image.mode
    except (OSError, ValueError) as error:
        problems.append(f"not a readable image: {error} ({path}): {fix}")
        return None
    if mode is not None and found != mode:
        problems.append(f"an image of mode {found}, not {mode} ({path}): {fix}")
    return size


def _depth_size(path: Path, problems: list[str], fix: str):
    """(width, height) of a depth map from its .npy header, or None with the problem noted."""
    if not path.is_file():
        problems.append(f"missing ({path}): {fix}")
        return None
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as error:
        problems.append(f"not a readable .npy array: {error} ({path}): {fix}")
        return None
    if len(shape) != 2:
        problems.append(f"a depth map of shape {shape}, not (height, width) ({path}): {fix}")
        return None
    return shape[1], shape[0]


def _matrix_problem(value, shape: tuple[int, ...]) -> str | None:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return f"not a {'x'.join(map(str, shape))} matrix of numbers"
    if array.shape != shape:
        return f"shape {array.shape}, not {shape}"
    return None if np.isfinite(array).all() else "holds NaN or inf"


def _view_sizes_agree(sizes: dict[str, tuple], owner: Path, problems: list[str], fix: str):
    """Every file of every view must have the size of the first: the reader stacks them."""
    known = {name: size for name, size in sizes.items() if size is not None}
    if not known:
        return
    first_name, first = next(iter(known.items()))
    for name, size in known.items():
        if size != first:
            problems.append(
                f"{size[0]}x{size[1]} pixels where {first_name} has {first[0]}x{first[1]} "
                f"({owner / name}): {fix}"
            )


def object_problems(object_dir: Path) -> list[str]:
    """What keeps `read_object` from reading one prepared object folder."""
    fix = (
        f"delete {object_dir} and run prepare_data.py again with the set's settings to "
        "rebuild it"
    )
    problems: list[str] = []
    if not object_dir.is_dir():
        return [
            f"listed in split.json but missing ({object_dir}): run prepare_data.py again with "
            "the set's settings (it builds missing objects), or remove it from split.json"
        ]
    _read_json(object_dir / "meta.json", problems, fix)
    cameras = _read_json(object_dir / "cameras.json", problems, fix)
    if cameras is None:
        return problems
    where = object_dir / "cameras.json"
    fovy = cameras.get("fovy_deg") if isinstance(cameras, dict) else None
    if not (isinstance(fovy, int | float) and math.isfinite(fovy) and 0 < fovy < 180):
        problems.append(f"fovy_deg is {fovy!r}, not an angle in (0, 180) degrees ({where}): {fix}")
    views = cameras.get("views") if isinstance(cameras, dict) else None
    if not isinstance(views, list) or not views:
        problems.append(f"no list of views ({where}): {fix}")
        return problems
    sizes = {}
    for index, view in enumerate(views):
        matrix = view.get("c2w") if isinstance(view, dict) else None
        problem = _matrix_problem(matrix, (4, 4))
        if problem:
            problems.append(f"view {index}'s c2w is {problem} ({where}): {fix}")
        png, npy = f"rgba/{index:03d}.png", f"depth/{index:03d}.npy"
        sizes[png] = _image_size(object_dir / png, problems, fix, mode="RGBA")
        sizes[npy] = _depth_size(object_dir / npy, problems, fix)
    _view_sizes_agree(sizes, object_dir, problems, fix)
    return problems


def dataset_problems(root: str | Path, splits: tuple[str, ...] = ("train", "val", "test")):
    """Every problem of the objects in `splits` of a prepare_data.py set, as message lines."""
    root = Path(root)
    fix = f"build the set with `python prepare_data.py --out {root}`"
    if not root.is_dir():
        return [f"no such folder ({root}): {fix}"]
    problems: list[str] = []
    split = _read_json(root / "split.json", problems, fix)
    if split is None:
        return problems
    object_ids = []
    for name in splits:
        ids = split.get(name) if isinstance(split, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            problems.append(f"no list of object ids for {name!r} ({root / 'split.json'}): {fix}")
            continue
        object_ids += [i for i in ids if i not in object_ids]
    for object_id in object_ids:
        problems += object_problems(root / object_id)
    return problems


def course_layout_problems(folder: Path) -> list[str]:
    """What keeps `load_course_layout` from reading one IMG/MASK/Depth/cams.json folder."""
    fix = "re-export this object in the course layout (see utils/data/course_layout.py)"
    problems: list[str] = []
    cams = _read_json(folder / "cams.json", problems, fix)
    if cams is None:
        return problems
    where = folder / "cams.json"
    try:
        views = cams_views(cams)
    except (AttributeError, KeyError, TypeError):
        views = None
    if not isinstance(views, list) or not views:
        return [*problems, f"no list of views ({where}): {fix}"]
    sizes = {}
    for index, view in enumerate(views):
        view = view if isinstance(view, dict) else {}
        wrong = {"K": _matrix_problem(view.get("K"), (3, 3))}
        if "c2w" in view:
            wrong["c2w"] = _matrix_problem(view["c2w"], (4, 4))
        else:
            wrong["R"] = _matrix_problem(view.get("R"), (3, 3))
            wrong["T"] = _matrix_problem(np.ravel(view.get("T", [])), (3,))
        for key, problem in wrong.items():
            if problem:
                absent = key not in view
                problems.append(
                    f"view {index} {'has no ' + key if absent else 'has a ' + key + ' that is '}"
                    f"{'' if absent else problem} ({where}): {fix}"
                )
        name = f"{index:03d}"
        sizes[f"IMG/{name}.png"] = _image_size(folder / "IMG" / f"{name}.png", problems, fix)
        sizes[f"MASK/{name}.png"] = _image_size(folder / "MASK" / f"{name}.png", problems, fix)
        sizes[f"Depth/{name}.npy"] = _depth_size(folder / "Depth" / f"{name}.npy", problems, fix)
    _view_sizes_agree(sizes, folder, problems, fix)
    return problems


def raise_if_problems(problems: list[str], where: str | Path) -> None:
    """One UserInputError listing them all (the first SHOWN_PROBLEMS), if there are any."""
    if not problems:
        return
    shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
    hidden = len(problems) - SHOWN_PROBLEMS
    more = f"\n  ... and {hidden} more" if hidden > 0 else ""
    raise UserInputError(
        f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the dataset", where,
        f"fix each below, then run again:\n  {shown}{more}",
    )  # fmt: skip


def check_dataset(root: str | Path, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """Raise one UserInputError listing every problem of `splits` of a prepared set."""
    raise_if_problems(dataset_problems(root, splits), root)
