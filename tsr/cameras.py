"""Cameras and rays in TripoSR's world: right-handed, z up, object inside [-0.87, 0.87]^3.

One module serves the volume renderer, the dataset renderer and the tests, so a pixel and
its ray can never disagree between them. Cameras are OpenGL-style camera-to-world matrices
whose columns are [right, up, -forward] (the camera looks down its own -z); pixel row 0 is
the image top.
"""

from __future__ import annotations

import math

import torch

# TripoSR's cameras (its renders, its conditioning view and run.py's framing), defined once
FOVY_DEG = 40.0  # vertical field of view of every render and of the conditioning view
CAMERA_DISTANCE = 1.9  # orbit radius: camera centre to the world origin
FOREGROUND_RATIO = 0.85  # run.py's resize_foreground: the object's share of the image side


def orbit_positions(
    azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, distance: torch.Tensor | float
) -> torch.Tensor:
    """Camera centres on a sphere around the origin; azimuth from +x towards +y.

    (V,), (V,) -> (V, 3)
    """
    azimuth = torch.deg2rad(azimuth_deg.to(torch.float32))
    elevation = torch.deg2rad(elevation_deg.to(torch.float32))
    distance = torch.as_tensor(distance, dtype=torch.float32)
    return torch.stack(
        [
            distance * torch.cos(elevation) * torch.cos(azimuth),
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
        ],
        dim=-1,
    )


def look_at(positions: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices for cameras at `positions` looking at `target`, up +z.

    (V, 3) -> (V, 4, 4). Columns of the rotation are [right, up, -forward].
    """
    if target is None:
        target = torch.zeros(3, dtype=positions.dtype)
    forward = torch.nn.functional.normalize(target - positions, dim=-1)
    world_up = torch.tensor([0.0, 0.0, 1.0], dtype=positions.dtype).expand_as(forward)
    right = torch.nn.functional.normalize(torch.cross(forward, world_up, dim=-1), dim=-1)
    up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(positions.shape[0], 4, 4, dtype=positions.dtype)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = positions
    c2w[:, 3, 3] = 1.0
    return c2w


def orbit_cameras(
    n_views: int, elevation_deg: float = 0.0, camera_distance: float = CAMERA_DISTANCE
) -> torch.Tensor:
    """The cameras of `TSR.render`: n evenly spaced azimuths starting at 0, one elevation.

    -> (n_views, 4, 4) camera-to-world.
    """
    azimuth = torch.linspace(0, 360, n_views + 1)[:n_views]
    elevation = torch.full_like(azimuth, elevation_deg)
    return look_at(orbit_positions(azimuth, elevation, camera_distance))


def focal_length(fovy_deg: float, height: int) -> float:
    """Focal length in pixels for a vertical field of view."""
    return 0.5 * height / math.tan(math.radians(fovy_deg) / 2)


def pixel_directions(
    rows: torch.Tensor, cols: torch.Tensor, height: int, width: int, fovy_deg: float
) -> torch.Tensor:
    """Unit camera-space directions of the rays through pixel centres (row j, column i):
    ((i + 0.5 - W/2) / f, -(j + 0.5 - H/2) / f, -1), normalised. (...), (...) -> (..., 3)

    The one definition of pixel -> ray; every camera function below goes through it.
    """
    f = focal_length(fovy_deg, height)
    j, i = rows.to(torch.float32), cols.to(torch.float32)
    directions = torch.stack(
        [(i + 0.5 - width / 2) / f, -(j + 0.5 - height / 2) / f, -torch.ones_like(i)], dim=-1
    )
    return torch.nn.functional.normalize(directions, dim=-1)


def camera_directions(height: int, width: int, fovy_deg: float) -> torch.Tensor:
    """Unit ray directions in camera space through every pixel centre. -> (H, W, 3)"""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return pixel_directions(rows, cols, height, width, fovy_deg)


def rays_from_c2w(
    c2w: torch.Tensor, height: int, width: int, fovy_deg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space rays of every pixel of each camera.

    (V, 4, 4) -> origins (V, H, W, 3), unit directions (V, H, W, 3)
    """
    directions_cam = camera_directions(height, width, fovy_deg).to(c2w)  # (H, W, 3)
    rotation = c2w[:, None, None, :3, :3]  # (V, 1, 1, 3, 3)
    rays_d = torch.nn.functional.normalize(
        (rotation @ directions_cam[None, ..., None]).squeeze(-1), dim=-1
    )
    rays_o = c2w[:, None, None, :3, 3].expand_as(rays_d)
    return rays_o, rays_d


def pixel_to_ray(
    c2w: torch.Tensor, pixels_ij: torch.Tensor, height: int, width: int, fovy_deg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through chosen pixels of one camera, without building the whole image of rays.

    c2w (4, 4), pixels_ij (N, 2) as (row, column) -> origins (N, 3), unit directions (N, 3)
    """
    directions_cam = pixel_directions(pixels_ij[:, 0], pixels_ij[:, 1], height, width, fovy_deg)
    rays_d = torch.nn.functional.normalize(directions_cam.to(c2w) @ c2w[:3, :3].T, dim=-1)
    rays_o = c2w[:3, 3].expand_as(rays_d)
    return rays_o, rays_d
