"""The course project's dataset layout, read and written with explicit conversions.

    <folder>/IMG/000.png     RGB render
             MASK/000.png    object mask (0..255)
             Depth/000.npy   z-depth along the camera's viewing axis, 0 = background (pyrender's)
             cams.json       per view K (3x3, pixels) and world-to-camera R (3x3), T (3,) in
                             pyrender's convention, or a 4x4 camera-to-world "c2w" instead

pyrender's convention: world y up; cameras are OpenGL (x right, y up, looking down -z), the
same camera axes as ours, so only the *world* changes: `Y_UP_TO_Z_UP` turns y-up into our z-up
world (and the y-up front, +z, into our view 0's side, +x). K's principal point is measured
from the image's top-left corner with pixel centres at +0.5, as OpenGL samples pixels.

The course project's loader "auto-flipped" rays that pointed away from the object because its
cameras disagreed with TripoSR's; here the conversion is exact, so nothing is ever flipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsr.files import atomic_folder
from utils.data.check import cams_views, course_layout_problems, raise_if_problems
from utils.data.meshes import Y_UP_TO_Z_UP

_CONVENTION = (
    "pyrender: world y up; camera x right, y up, looks down -z; R, T world-to-camera "
    "(x_cam = R x_world + T); K in pixels, principal point from the top-left corner, pixel "
    "centres at +0.5; Depth = z-depth along the viewing axis, 0 = background"
)


def _c2w_z_up(view: dict, source: Path, world_up: str) -> np.ndarray:
    """One view's camera -> (4, 4) camera-to-world in our z-up world."""
    if "c2w" in view:
        c2w = np.asarray(view["c2w"], dtype=np.float64)
    elif "R" in view and "T" in view:
        rotation = np.asarray(view["R"], dtype=np.float64)  # world-to-camera
        translation = np.asarray(view["T"], dtype=np.float64).reshape(3)
        c2w = np.eye(4)
        c2w[:3, :3] = rotation.T
        c2w[:3, 3] = -rotation.T @ translation
    else:
        raise ValueError(f"{source}: each view needs R and T (world-to-camera) or c2w")
    if world_up == "y":
        to_z_up = np.eye(4)
        to_z_up[:3, :3] = Y_UP_TO_Z_UP
        c2w = to_z_up @ c2w  # change of world frame: applies on the left
    return c2w


def load_course_layout(folder: str | Path) -> dict:
    """Read an IMG/MASK/Depth/cams.json folder into our conventions.

    -> dict: rgba (V,H,W,4) uint8 (MASK as alpha); depth (V,H,W) float32 ray distance, 0 =
    background; c2w (V,4,4) float32 tensor in our z-up world; K (V,3,3); fovy_deg (float, or None
    when K is not centred and square, which tsr's cameras cannot express); rays_o, rays_d
    (V,H,W,3) tensors computed from K, so they hold even then.
    """
    folder = Path(folder)
    cams_path = folder / "cams.json"
    raise_if_problems(course_layout_problems(folder), folder)
    cams = json.loads(cams_path.read_text())
    settings = cams if isinstance(cams, dict) else {}
    world_up, depth_kind = settings.get("world_up", "y"), settings.get("depth", "z")
    rgba, depth, c2w, intrinsics, rays_o, rays_d = [], [], [], [], [], []
    for index, view in enumerate(cams_views(cams)):
        name = f"{index:03d}"
        paths = [
            folder / "IMG" / f"{name}.png",
            folder / "MASK" / f"{name}.png",
            folder / "Depth" / f"{name}.npy",
        ]
        image = np.asarray(Image.open(paths[0]).convert("RGB"))
        mask = np.asarray(Image.open(paths[1]).convert("L"))
        height, width = mask.shape
        K = np.asarray(view["K"], dtype=np.float64)
        camera_to_world = _c2w_z_up(view, cams_path, world_up)
        # rays from K: ((i+0.5-cx)/fx, -(j+0.5-cy)/fy, -1) in OpenGL camera axes
        j, i = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
        camera_rays = np.stack(
            [(i - K[0, 2]) / K[0, 0], -(j - K[1, 2]) / K[1, 1], -np.ones_like(i)], -1
        )
        camera_rays /= np.linalg.norm(camera_rays, axis=-1, keepdims=True)  # (H, W, 3)
        z_depth = np.load(paths[2]).astype(np.float64)
        # z-depth -> distance along the unit ray: divide by the ray's cosine to the view axis
        ray_depth = z_depth / np.abs(camera_rays[..., 2]) if depth_kind == "z" else z_depth
        rgba.append(np.concatenate([image, mask[..., None]], axis=-1))
        depth.append(np.where(z_depth > 0, ray_depth, 0.0))
        c2w.append(camera_to_world)
        intrinsics.append(K)
        rays_d.append(camera_rays @ camera_to_world[:3, :3].T)
        rays_o.append(np.broadcast_to(camera_to_world[:3, 3], camera_rays.shape))
    K0 = intrinsics[0]
    square_centred = all(
        math.isclose(K[0, 0], K[1, 1], rel_tol=1e-6)
        and math.isclose(K[0, 2], width / 2, abs_tol=1e-6)
        and math.isclose(K[1, 2], height / 2, abs_tol=1e-6)
        and math.isclose(K[1, 1], K0[1, 1], rel_tol=1e-6)
        for K in intrinsics
    )
    return {
        "rgba": np.stack(rgba).astype(np.uint8),
        "depth": np.stack(depth).astype(np.float32),
        "c2w": torch.tensor(np.stack(c2w), dtype=torch.float32),
        "K": np.stack(intrinsics),
        "fovy_deg": math.degrees(2 * math.atan(height / 2 / K0[1, 1])) if square_centred else None,
        "rays_o": torch.tensor(np.stack(rays_o), dtype=torch.float32),
        "rays_d": torch.tensor(np.stack(rays_d), dtype=torch.float32),
    }


def write_course_layout(
    folder: str | Path,
    rgba: np.ndarray,
    depth: np.ndarray,
    c2w: torch.Tensor | np.ndarray,
    fovy_deg: float,
    background: float = 1.0,
) -> None:
    """Write views in our conventions as the course project stored them (see module doc).

    rgba (V,H,W,4) uint8, depth (V,H,W) ray distance with 0 = background, c2w (V,4,4) z-up.
    IMG is the colour composited on `background` (white); MASK is the alpha. The folder is
    replaced as a whole (tsr.files.atomic_folder).
    """
    with atomic_folder(folder) as temporary:
        _write_course_files(temporary, rgba, depth, c2w, fovy_deg, background)


def _write_course_files(folder: Path, rgba, depth, c2w, fovy_deg: float, background: float):
    for sub in ("IMG", "MASK", "Depth"):
        (folder / sub).mkdir()
    c2w = np.asarray(c2w, dtype=np.float64)
    n_views, height, width = depth.shape
    f = 0.5 * height / math.tan(math.radians(fovy_deg) / 2)
    K = [[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]
    j, i = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    cosine = 1 / np.sqrt(((i - width / 2) / f) ** 2 + ((j - height / 2) / f) ** 2 + 1)  # (H, W)
    views = []
    for v in range(n_views):
        c2w_y_up = np.eye(4)
        c2w_y_up[:3, :3] = Y_UP_TO_Z_UP.T @ c2w[v, :3, :3]
        c2w_y_up[:3, 3] = Y_UP_TO_Z_UP.T @ c2w[v, :3, 3]
        rotation = c2w_y_up[:3, :3].T  # world-to-camera
        views.append({"K": K, "R": rotation.tolist(), "T": (-rotation @ c2w_y_up[:3, 3]).tolist()})
        alpha = rgba[v, ..., 3:4] / 255.0
        image = rgba[v, ..., :3] * alpha + 255 * background * (1 - alpha)
        Image.fromarray(np.round(image).astype(np.uint8)).save(folder / "IMG" / f"{v:03d}.png")
        Image.fromarray(rgba[v, ..., 3]).save(folder / "MASK" / f"{v:03d}.png")
        np.save(folder / "Depth" / f"{v:03d}.npy", (depth[v] * cosine).astype(np.float32))
    cams = {"convention": _CONVENTION, "world_up": "y", "depth": "z", "views": views}
    (folder / "cams.json").write_text(json.dumps(cams, indent=1) + "\n")
