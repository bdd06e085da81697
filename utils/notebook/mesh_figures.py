"""Meshes as still pictures: a strip of fixed views drawn with matplotlib, which a notebook
saved to disk or exported to HTML keeps (widgets need a live kernel), and the mesh helpers
the 3D widget shares with it (colours, framing)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import trimesh
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from tsr.cameras import FOVY_DEG, look_at, orbit_positions

STATIC_VIEWS = ((30.0, 20.0), (120.0, 20.0), (210.0, 20.0), (300.0, 20.0))


GREY = np.array([0.7, 0.7, 0.7], dtype=np.float32)  # meshes without colours


AMBIENT = 0.35  # light on faces turned from every light, so they stay readable


# The static picture's light, in camera space (right, up, back): a headlight a little up
# and right, so whichever side a fixed view shows is lit.
HEADLIGHT_CAM = np.array([0.3, 0.5, 1.0]) / np.linalg.norm([0.3, 0.5, 1.0])


# The static picture coarsens bigger meshes on a grid of this many cells across: a panel is
# about 200 px wide, so finer faces cost drawing time (8 s at 300k faces) and add nothing.
STATIC_MAX_FACES = 30_000


STATIC_GRID_CELLS = 64


def as_trimesh(mesh: trimesh.Trimesh | str | Path) -> trimesh.Trimesh:
    """A Trimesh, or a mesh file (OBJ/GLB/PLY…) loaded and merged into one."""
    if isinstance(mesh, trimesh.Trimesh):
        return mesh
    if isinstance(mesh, str | Path):
        path = Path(mesh)
        if not path.is_file():
            raise FileNotFoundError(f"mesh file not found: {path}")
        return trimesh.load(path, force="mesh")
    raise TypeError(f"expected a trimesh.Trimesh or a mesh file path, got {type(mesh).__name__}")


def mesh_colors(mesh: trimesh.Trimesh) -> tuple[np.ndarray, str]:
    """RGB in [0, 1] and where it lives: ((V, 3), 'vertex') | ((F, 3), 'face') | ((0, 3), 'none')."""
    visual = mesh.visual
    if visual.kind == "texture":
        visual = visual.to_color()  # samples the texture at the vertices
    if visual.kind == "vertex":
        return np.asarray(visual.vertex_colors)[:, :3].astype(np.float32) / 255.0, "vertex"
    if visual.kind == "face":
        return np.asarray(visual.face_colors)[:, :3].astype(np.float32) / 255.0, "face"
    return np.zeros((0, 3), dtype=np.float32), "none"


def face_colors(mesh: trimesh.Trimesh) -> np.ndarray:
    """One RGB in [0, 1] per face: (F, 3)."""
    colors, where = mesh_colors(mesh)
    if where == "vertex":
        return colors[mesh.faces].mean(axis=1)
    if where == "face":
        return colors
    return np.broadcast_to(GREY, (len(mesh.faces), 3))


def framing_camera(
    centre: np.ndarray, radius: float, azimuth_deg: float, elevation_deg: float, aspect: float
) -> np.ndarray:
    """Camera-to-world (4, 4) looking at `centre` from far enough that the sphere of `radius`
    fits in both the vertical and the horizontal field of view (FOVY_DEG)."""
    half_fovy = math.radians(FOVY_DEG) / 2
    half_fov = min(half_fovy, math.atan(math.tan(half_fovy) * aspect))
    distance = 1.05 * max(radius, 1e-6) / math.sin(half_fov)
    offset = orbit_positions(torch.tensor([azimuth_deg]), torch.tensor([elevation_deg]), distance)
    target = torch.as_tensor(centre, dtype=torch.float32)
    return look_at(offset + target, target=target)[0].double().numpy()


def bounding_sphere(meshes: list[trimesh.Trimesh]) -> tuple[np.ndarray, float]:
    """Centre (3,) of the box around every non-empty mesh and the radius reaching their
    farthest vertex: side-by-side views share one frame, so sizes compare directly."""
    meshes = [m for m in meshes if len(m.faces)]
    if not meshes:
        return np.zeros(3), 1.0
    low = np.min([m.bounds[0] for m in meshes], axis=0)
    high = np.max([m.bounds[1] for m in meshes], axis=0)
    centre = (low + high) / 2
    radius = max(float(np.linalg.norm(m.vertices - centre, axis=1).max()) for m in meshes)
    return centre, radius


def coarsened(mesh: trimesh.Trimesh, cells: int = STATIC_GRID_CELLS) -> trimesh.Trimesh:
    """Vertex clustering: vertices in one grid cell merge into the first of them, faces that
    collapse vanish, colours follow. For pictures only; the result need not be manifold."""
    cell = max(float(mesh.extents.max()), 1e-9) / cells
    keys = np.floor((mesh.vertices - mesh.bounds[0]) / cell).astype(np.int64)  # (V, 3)
    _, first, cluster = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    faces = cluster.reshape(-1)[mesh.faces]  # (F, 3) in cluster ids
    # Drop collapsed faces and slivers: their normals are noise and would shade as dark specks.
    corners = mesh.vertices[first][faces]  # (F, 3, 3)
    edges = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # (F, 3)
    keep = np.linalg.norm(edges, axis=1) > 0.05 * cell**2  # twice the area, vs a cell's
    coarse = trimesh.Trimesh(mesh.vertices[first], faces[keep], process=False)
    colors, where = mesh_colors(mesh)
    if where == "vertex":
        coarse.visual.vertex_colors = np.round(colors[first] * 255).astype(np.uint8)
    elif where == "face":
        coarse.visual.face_colors = np.round(colors[keep] * 255).astype(np.uint8)
    return coarse


def _outward_sign(mesh: trimesh.Trimesh) -> float | None:
    """+1 / -1 when back faces may be skipped (closed mesh, normals out / in), else None.
    Skipping them halves the drawing time and keeps big far faces from painting over near
    ones, which sorting by face centre alone gets wrong (a box's sides over its top)."""
    if not mesh.is_watertight:
        return None
    return 1.0 if mesh.volume > 0 else -1.0


def _draw_mesh(ax, mesh: trimesh.Trimesh, c2w: np.ndarray) -> None:
    """Painter's algorithm: project the faces, shade them, draw far ones first."""
    rotation, origin = c2w[:3, :3], c2w[:3, 3]
    faces, normals, colors = mesh.faces, mesh.face_normals, face_colors(mesh)
    outward = _outward_sign(mesh)
    if outward is not None:
        visible = outward * np.einsum("fc,fc->f", normals, origin - mesh.triangles_center) > 0
        faces, normals, colors = faces[visible], normals[visible], colors[visible]
    points_cam = (mesh.vertices - origin) @ rotation  # (V, 3), camera looks down -z
    depth = np.maximum(-points_cam[:, 2], 1e-6)  # (V,)
    screen = points_cam[:, :2] / depth[:, None]  # (V, 2), tangent units, y up
    order = np.argsort(-depth[faces].mean(axis=1))  # far to near
    light = rotation @ HEADLIGHT_CAM
    lambert = np.abs(normals @ light)  # two-sided: open or flipped meshes are still lit
    rgb = np.clip(colors * (AMBIENT + (1 - AMBIENT) * lambert)[:, None], 0, 1)[order]
    # Edges in the face colour close the hairline gaps Agg leaves between triangles.
    polygons = PolyCollection(screen[faces[order]], facecolors=rgb, edgecolors=rgb, linewidths=0.6)
    ax.add_collection(polygons)
    limit = math.tan(math.radians(FOVY_DEG) / 2)
    ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal")


def static_mesh_figure(
    meshes: dict[str, trimesh.Trimesh],
    views: tuple[tuple[float, float], ...] = STATIC_VIEWS,
    panel_inches: float = 2.0,
    caption: str | None = None,
) -> Figure:
    """Rows of meshes, columns of (azimuth, elevation) views, all framed to one sphere;
    `caption` in small grey type below them."""
    centre, radius = bounding_sphere(list(meshes.values()))
    fig = Figure(figsize=(panel_inches * len(views), panel_inches * len(meshes)))
    axes = fig.subplots(len(meshes), len(views), squeeze=False)
    fig.subplots_adjust(left=0.06, right=1, bottom=0, top=0.9, wspace=0, hspace=0.1)
    for row, (name, mesh) in enumerate(meshes.items()):
        for col, (azimuth, elevation) in enumerate(views):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if len(mesh.faces):
                if len(mesh.faces) > STATIC_MAX_FACES:
                    mesh = coarsened(mesh)
                c2w = framing_camera(centre, radius, azimuth, elevation, 1.0)
                _draw_mesh(ax, mesh, c2w)
            else:
                ax.text(0.5, 0.5, "empty mesh", ha="center", va="center", transform=ax.transAxes)
            if row == 0:
                ax.set_title(f"az {azimuth:.0f}°, el {elevation:.0f}°", fontsize="small")
            if col == 0:
                ax.set_ylabel(name)
    if caption:
        fig.text(0.5, 0.0, caption, ha="center", va="top", fontsize="small", color="0.35")
    return fig
