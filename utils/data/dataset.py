"""The dataset as training, evaluation and the notebooks read it.

A prepared dataset folder (written by `utils.data.build`) holds per object RGBA views, depth,
cameras.json, the normalised mesh and, optionally, labelled 3D points. This module reads it and
imports none of the building code (no CAD kernel, no ray caster), so a machine that only
trains needs neither: `read_object` (plain arrays, for plots), `MultiViewDataset`
(conditioning image + supervision views), `novel_views` (which views evaluation and
validation score), `sample_rays` / `sample_patches` (ray batches for the volume renderer, so
a training step never renders whole images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsr.cameras import FOREGROUND_RATIO, pixel_to_ray
from tsr.errors import UserInputError
from tsr.preprocess import prepare_images, resize_foreground
from utils.data.check import check_dataset

SPLITS = ("train", "val", "test", "all")
DEPTH_BACKGROUND = 0.0  # stored depth where a pixel's centre ray misses: no camera is on a surface


def read_object(object_dir: str | Path, views: list[int] | None = None) -> dict:
    """One object folder -> plain arrays: rgba (V,H,W,4) uint8, depth (V,H,W) float32 (0 =
    background), c2w (V,4,4) float32, fovy_deg, view_indices, cameras and meta (the json)."""
    object_dir = Path(object_dir)
    if not (object_dir / "meta.json").exists():
        raise FileNotFoundError(f"{object_dir} is not a prepared object: run prepare_data.py")
    cameras = json.loads((object_dir / "cameras.json").read_text())
    views = list(range(len(cameras["views"]))) if views is None else list(views)
    return {
        "rgba": np.stack(
            [np.asarray(Image.open(object_dir / "rgba" / f"{v:03d}.png")) for v in views]
        ),
        "depth": np.stack([np.load(object_dir / "depth" / f"{v:03d}.npy") for v in views]),
        "c2w": np.array([cameras["views"][v]["c2w"] for v in views], dtype=np.float32),
        "fovy_deg": float(cameras["fovy_deg"]),
        "view_indices": np.array(views),
        "cameras": cameras,
        "meta": json.loads((object_dir / "meta.json").read_text()),
    }


def novel_views(item: dict) -> list[int]:
    """Positions in item["rgb"] of the views a model is scored on: every view but the
    conditioning view 0 (the model saw that one). One definition for validation, evaluation
    and the notebooks."""
    return [i for i, view in enumerate(item["view_indices"].tolist()) if view != 0]


def conditioning_image(rgba_view0: np.ndarray, cond_size: int) -> torch.Tensor:
    """View 0 -> what inference feeds the model for it: run.py's resize_foreground(0.85), then
    the model's own preprocessing (grey compositing, antialiased bilinear resize).

    The renders are framed so resize_foreground is nearly the identity here; applying it anyway
    keeps training input and inference input the same function of the picture. -> (S, S, 3)
    """
    framed = resize_foreground(Image.fromarray(rgba_view0, mode="RGBA"), FOREGROUND_RATIO)
    return prepare_images(framed, cond_size)[0]


class MultiViewDataset(torch.utils.data.Dataset):
    """Objects of one split of a prepared dataset folder.

    Item: object_id; cond_image (S,S,3) in [0,1] from view 0 as at inference; supervision views
    rgb (V,H,W,3) on WHITE (the volume renderer's background), mask (V,H,W) = alpha, depth
    (V,H,W) ray distance (0 = background), c2w (V,4,4), fovy_deg, view_indices (V,); with
    occupancy samples also occupancy_points (N,3), occupancy (N,) 1 inside, occupancy_sdf (N,)
    and occupancy_colour (N,3) in [0,1].
    Supervision views always start with view 0. With `n_supervision_views`, train draws the
    others from (seed, epoch, index) (call `set_epoch`), val/test take evenly spaced ones.
    """

    def __init__(
        self, root: str | Path, split: str = "train", n_supervision_views: int | None = None,
        cond_size: int = 512, seed: int = 0, check: bool = True,
    ):  # fmt: skip
        """`check`: first look at every object of the split (`utils.data.check`) and refuse a
        set with missing or inconsistent files, listing them all; False when already done."""
        self.root = Path(root)
        if split not in SPLITS:
            raise UserInputError(f"unknown split {split!r}", "split", f"choose one of {SPLITS}")
        if check:
            check_dataset(self.root, SPLITS[:3] if split == "all" else (split,))
        splits = json.loads((self.root / "split.json").read_text())
        self.object_ids = (
            sorted(i for s in SPLITS[:3] for i in splits[s]) if split == "all" else splits[split]
        )
        self.split, self.n_supervision_views, self.cond_size = split, n_supervision_views, cond_size
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.object_ids)

    def set_epoch(self, epoch: int) -> None:
        """Training draws other supervision views each epoch, reproducibly."""
        self.epoch = epoch

    def supervision_views(self, index: int, n_available: int) -> list[int]:
        n = self.n_supervision_views or n_available
        if n >= n_available:
            return list(range(n_available))
        if self.split == "train":
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            )
            others = (
                (torch.randperm(n_available - 1, generator=generator)[: n - 1] + 1).sort().values
            )
            return [0, *others.tolist()]
        return (
            [0, *np.linspace(1, n_available - 1, n - 1).round().astype(int).tolist()]
            if n > 1
            else [0]
        )

    def __getitem__(self, index: int) -> dict:
        object_dir = self.root / self.object_ids[index]
        n_available = len(json.loads((object_dir / "cameras.json").read_text())["views"])
        views = read_object(object_dir, self.supervision_views(index, n_available))
        item = make_item(self.object_ids[index], views, self.cond_size)
        if (object_dir / "occupancy.npz").exists():  # built with --occupancy-points
            with np.load(object_dir / "occupancy.npz") as occupancy:
                item["occupancy_points"] = torch.from_numpy(occupancy["points"].astype(np.float32))
                item["occupancy"] = torch.from_numpy(occupancy["inside"].astype(np.float32))
                if "sdf" in occupancy:  # datasets built before signed distances lack them
                    item["occupancy_sdf"] = torch.from_numpy(occupancy["sdf"].astype(np.float32))
                    item["occupancy_colour"] = torch.from_numpy(occupancy["colour"]).float() / 255
        return item


def make_item(object_id: str, views: dict, cond_size: int) -> dict:
    """Plain arrays of an object's views (as `read_object` or the course layout's reader
    return them: rgba, depth, c2w, fovy_deg, view_indices) -> a dataset item (see
    `MultiViewDataset`). View 0 of the arrays is the conditioning view."""
    rgba = torch.from_numpy(views["rgba"]).float() / 255.0  # (V, H, W, 4), straight alpha
    mask = rgba[..., 3]
    return {
        "object_id": object_id,
        "cond_image": conditioning_image(views["rgba"][0], cond_size),
        "rgb": rgba[..., :3] * mask[..., None] + (1 - mask[..., None]),  # on white
        "mask": mask,
        "depth": torch.as_tensor(views["depth"]),
        "c2w": torch.as_tensor(views["c2w"], dtype=torch.float32),
        "fovy_deg": float(views["fovy_deg"]),
        "view_indices": torch.as_tensor(views["view_indices"]),
    }


def _gather(item: dict, view: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> dict:
    """Rays and targets at pixels (any equal shapes (...)) of one item's views."""
    height, width = item["mask"].shape[1:]
    rays_o = torch.empty(*view.shape, 3)
    rays_d = torch.empty(*view.shape, 3)
    for v in view.unique():
        chosen = view == v
        pixels = torch.stack([row[chosen], col[chosen]], dim=-1)  # (n, 2) as (row, col)
        rays_o[chosen], rays_d[chosen] = pixel_to_ray(
            item["c2w"][v], pixels, height, width, item["fovy_deg"]
        )
    return {
        "rays_o": rays_o, "rays_d": rays_d, "rgb": item["rgb"][view, row, col],
        "mask": item["mask"][view, row, col], "depth": item["depth"][view, row, col],
        "view_index": view,
    }  # fmt: skip


def sample_rays(item: dict, n_rays: int, generator: torch.Generator | None = None) -> dict:
    """Uniformly random pixels over all supervision views of one item.

    -> rays_o, rays_d, rgb (N,3); mask, depth, view_index (N,); pixel_ij (N,2)
    """
    n_views, height, width = item["mask"].shape
    flat = torch.randint(n_views * height * width, (n_rays,), generator=generator)
    view, row, col = flat // (height * width), flat // width % height, flat % width
    return {**_gather(item, view, row, col), "pixel_ij": torch.stack([row, col], dim=-1)}


def sample_patches(
    item: dict, n_patches: int, patch_size: int, generator: torch.Generator | None = None,
    object_bias: float = 0.75,
) -> dict:  # fmt: skip
    """Square patches of pixels, as TripoSR trains (128 px patches of 512 px renders).

    With probability `object_bias` a patch is centred on a random pixel of the object's mask
    bounding box (clamped into the image), otherwise placed uniformly, so most patches teach
    shape while some still teach the empty space around it.
    -> rays_o, rays_d, rgb (P,S,S,3); mask, depth (P,S,S); view_index (P,); top_left (P,2)
    """
    n_views, height, width = item["mask"].shape
    if patch_size > min(height, width):
        raise ValueError(f"patch_size {patch_size} is larger than the {height}x{width} views")
    view = torch.randint(n_views, (n_patches,), generator=generator)
    occupied = item["mask"] > 0  # (V, H, W)
    has_object = occupied.flatten(1).any(dim=1)  # (V,)
    rows_any, cols_any = occupied.any(dim=2), occupied.any(dim=1)  # (V, H), (V, W)
    top_left = []
    for any_along, extent in ((rows_any, height), (cols_any, width)):
        index = torch.arange(extent).expand_as(any_along)
        low = torch.where(any_along, index, extent).min(dim=1).values[view]  # bbox per patch
        high = torch.where(any_along, index, -1).max(dim=1).values[view]
        centre = low + (torch.rand(n_patches, generator=generator) * (high - low + 1)).long()
        biased = (centre - patch_size // 2).clamp(0, extent - patch_size)
        uniform = torch.randint(extent - patch_size + 1, (n_patches,), generator=generator)
        top_left.append((biased, uniform))
    use_object = (torch.rand(n_patches, generator=generator) < object_bias) & has_object[view]
    top = torch.where(use_object, *top_left[0])
    left = torch.where(use_object, *top_left[1])
    offsets = torch.arange(patch_size)
    row = (top[:, None, None] + offsets[None, :, None]).expand(-1, -1, patch_size)  # (P, S, S)
    col = (left[:, None, None] + offsets[None, None, :]).expand(-1, patch_size, -1)
    patches = _gather(item, view[:, None, None].expand_as(row), row, col)
    return {**patches, "view_index": view, "top_left": torch.stack([top, left], dim=-1)}


