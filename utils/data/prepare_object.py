"""One mesh -> one object folder of multi-view renders in TripoSR's cameras.

    data/<set>/<object_id>/rgba/000.png    RGBA, alpha = pixel coverage
                           depth/000.npy   float32 ray distance, 0 = background
                           cameras.json    fovy, per view a 4x4 camera-to-world (TripoSR world)
                           mesh.glb        the normalised ground truth (z-up coordinates)
                           meta.json       source, seed, scale, offset, settings
                           occupancy.npz   labelled 3D points (--occupancy-points; not for
                                           surfaces without a clear inside: meta.json says why)

View 0 is TripoSR's canonical conditioning camera (`orbit_cameras(1, 0, 1.9)`, fovy 40) and the
object is scaled (and shifted across the view axis) so that view 0 already looks like what
inference preprocessing produces: the alpha bounding box centred, its longer side 0.85 of the
frame. 3D and image stay consistent because the mesh itself is scaled, not the image.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

from tsr.cameras import (
    CAMERA_DISTANCE,
    FOREGROUND_RATIO,
    FOVY_DEG,
    focal_length,
    look_at,
    orbit_cameras,
    orbit_positions,
)
from tsr.config import RendererConfig
from tsr.files import atomic_folder
from tsr.renderer import ray_cube_radius
from utils.data.dataset import DEPTH_BACKGROUND
from utils.data.materials import (
    UNTEXTURED_COLOUR,
    Appearance,
    appearance_of,
    untextured_colour,
    untextured_setting,
)
from utils.data.meshes import CONVENTION
from utils.data.occupancy_labels import label_sides
from utils.data.render_views import Shader, render_views

# objects stay inside the cube the volume renderer cuts rays to
CUBE_RADIUS = ray_cube_radius(RendererConfig().radius)
DENSE_SURFACE_SAMPLES = 20_000  # surface samples the occupancy points' distances are taken to


def conditioning_framing(
    vertices: np.ndarray,
    size: int,
    fovy_deg: float = FOVY_DEG,
    distance: float = CAMERA_DISTANCE,
    ratio: float = FOREGROUND_RATIO,
    max_radius: float = CUBE_RADIUS,
) -> tuple[float, np.ndarray, bool]:
    """Scale s and offset t so that `s * vertices + t`, seen by view 0, has its projected
    bounding box centred with its longer side `ratio * size` pixels.
    -> (s, t (3,), whether that size was reached)

    A polyhedron's silhouette extremes are at vertices, so projecting vertices is exact. The
    offset lies across the view axis; perspective makes this a small fixed-point iteration.
    The scale never takes a vertex beyond `max_radius` (an object deep along the view axis
    then fills less of view 0; `prepare_object` records it).
    """
    c2w = orbit_cameras(1, 0.0, distance)[0].double().numpy()
    right, up, backward, eye = c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3]
    f, target = focal_length(fovy_deg, size), ratio * size
    scale_limit = max_radius / np.abs(vertices).max()
    scale, offset = min(1.0, scale_limit), np.zeros(3)
    for _ in range(100):
        relative = scale * vertices + offset - eye  # (N, 3)
        depth = -(relative @ backward)  # (N,) distance in front of the camera, > 0 inside the cube
        u, v = f * (relative @ right) / depth, f * (relative @ up) / depth  # pixels from centre
        extent = max(np.ptp(u), np.ptp(v))
        centre_u, centre_v = (u.max() + u.min()) / 2, (v.max() + v.min()) / 2
        new_scale = min(scale * target / extent, scale_limit)
        converged = (
            abs(new_scale - scale) < 1e-9 * scale and max(abs(centre_u), abs(centre_v)) < 1e-7
        )
        offset -= (centre_u * right + centre_v * up) * distance / f
        scale = new_scale
        if converged:
            break
    return scale, offset, extent >= target * (1 - 1e-6)


def view_cameras(
    n_views: int,
    rng: np.random.Generator,
    elevation_range: tuple[float, float] = (-10.0, 40.0),
    distance: float = CAMERA_DISTANCE,
    axis_views: bool = False,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """View 0 = TripoSR's conditioning camera; the rest around it. -> c2w (V,4,4), az, el (V,)

    Default: azimuths evenly spaced with jitter, elevations uniform in `elevation_range`.
    `axis_views`: the course project's six views front, right, back, left, top, bottom.
    """
    if axis_views:
        azimuth = np.array([0.0, 90.0, 180.0, 270.0, 0.0, 0.0])
        elevation = np.array([0.0, 0.0, 0.0, 0.0, 90.0, -90.0])
        c2w = look_at(
            orbit_positions(torch.tensor(azimuth[:4]), torch.tensor(elevation[:4]), distance)
        )
        # look_at is undefined straight up/down; use its limit at azimuth 0: right stays +y
        top = [[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, distance], [0, 0, 0, 1]]
        bottom = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, -distance], [0, 0, 0, 1]]
        return (
            torch.cat([c2w, torch.tensor([top, bottom], dtype=torch.float32)]),
            azimuth,
            elevation,
        )
    step = 360.0 / n_views
    azimuth = np.arange(n_views) * step + rng.uniform(-0.5, 0.5, n_views) * step
    elevation = rng.uniform(*elevation_range, n_views)
    azimuth[0], elevation[0] = 0.0, 0.0
    positions = orbit_positions(torch.tensor(azimuth), torch.tensor(elevation), distance)
    return look_at(positions), azimuth, elevation


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")


def object_rng(seed: int, object_id: str) -> np.random.Generator:
    """A per-object generator that does not depend on which other objects are built."""
    return np.random.default_rng([seed, zlib.crc32(object_id.encode())])


def prepare_object(
    mesh: trimesh.Trimesh,
    out_dir: str | Path,
    n_views: int = 8,
    size: int = 256,
    seed: int = 0,
    *,
    source: str = "",
    axis_views: bool = False,
    elevation_range: tuple[float, float] = (-10.0, 40.0),
    antialias: int = 5,
    occupancy_points: int = 0,
    force: bool = False,
    appearance: Appearance | None = None,
    untextured: str | tuple = UNTEXTURED_COLOUR,
) -> dict:
    """Normalise, frame, render and write one object atomically. -> its meta.json contents.

    `occupancy_points` > 0 also writes `occupancy.npz`: 3D points near and around the surface
    with inside/outside labels, a direct geometry signal for pretraining.
    `appearance`: the faces' materials as `read_mesh` gives them (default: the mesh's visual).
    `untextured`: sRGB colour of faces without one, or "palette": a seeded colour per object.

    An existing `out_dir` is a finished object (it only appears by an atomic rename) and is
    kept unless `force`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        return json.loads((out_dir / "meta.json").read_text())
    settings = {
        "n_views": 6 if axis_views else n_views, "size": size, "fovy_deg": FOVY_DEG,
        "distance": CAMERA_DISTANCE, "foreground_ratio": FOREGROUND_RATIO, "axis_views": axis_views,
        "elevation_range": list(elevation_range), "antialias": antialias,
        "occupancy_points": occupancy_points,
        "untextured": untextured_setting(untextured),
    }  # fmt: skip
    colour = untextured_colour(settings["untextured"], object_rng(seed + 2, out_dir.name))
    appearance = appearance_of(mesh) if appearance is None else appearance
    shader_look = {"appearance": appearance, "untextured": colour}
    mesh = mesh.copy()
    low, high = mesh.bounds
    mesh.apply_translation(-(low + high) / 2)
    mesh.apply_scale(1.0 / float(np.ptp(mesh.bounds, axis=0).max()))
    scale, offset, filled = conditioning_framing(mesh.vertices, size)
    reach = np.abs(scale * mesh.vertices + offset).max()
    if reach > CUBE_RADIUS:  # the offset pushed a corner out: shrink about the origin
        scale, offset, filled = scale * CUBE_RADIUS / reach, offset * CUBE_RADIUS / reach, False
    # "shrunk_to_cube": too deep along view 0's axis to fill 85 % of it inside TripoSR's cube
    framing = "foreground_ratio" if filled else "shrunk_to_cube"
    mesh.apply_scale(scale)
    mesh.apply_translation(offset)

    c2w, azimuth, elevation = view_cameras(
        settings["n_views"], object_rng(seed, out_dir.name), elevation_range, axis_views=axis_views
    )
    views = render_views(mesh, c2w, FOVY_DEG, size, antialias=antialias, **shader_look)
    alpha0 = views["rgba"][0, ..., 3] > 0
    rows, cols = np.nonzero(alpha0)
    bbox_side = max(np.ptp(rows), np.ptp(cols)) + 1 if len(rows) else 0
    meta = {
        "object_id": out_dir.name, "source": source, "seed": seed, "settings": settings,
        "scale": float(scale), "offset": offset.tolist(), "framing": framing,
        "view0_foreground_ratio": float(bbox_side / size), "bounds": mesh.bounds.tolist(),
        "n_vertices": len(mesh.vertices), "n_faces": len(mesh.faces),
        "watertight": bool(mesh.is_watertight), "n_supersampled_pixels": views["n_supersampled"],
        "untextured_colour": colour.tolist(),
        **{k: v for k, v in mesh.metadata.items() if k in ("family", "kind", "index")},
    }  # fmt: skip
    cameras = {
        "convention": CONVENTION, "fovy_deg": FOVY_DEG, "width": size, "height": size,
        "depth_background": DEPTH_BACKGROUND,
        "views": [
            {"c2w": c2w[v].tolist(), "azimuth_deg": float(azimuth[v]),
             "elevation_deg": float(elevation[v]), "distance": CAMERA_DISTANCE}
            for v in range(len(c2w))
        ],
    }  # fmt: skip

    occupancy = None
    if occupancy_points > 0:
        occupancy, meta["occupancy_labels"] = occupancy_samples(
            mesh, occupancy_points, object_rng(seed + 1, out_dir.name), Shader(mesh, **shader_look)
        )
    if mesh.visual.kind is None:  # no colours of its own: mesh.glb keeps the rendered ones
        preview = np.round(appearance.vertex_colours(mesh, colour) * 255).astype(np.uint8)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=preview)
    _write_object_atomically(out_dir, views, cameras, meta, mesh, occupancy)
    return meta


def occupancy_samples(
    mesh: trimesh.Trimesh, n_points: int, rng: np.random.Generator, shader: Shader | None = None
) -> tuple[dict[str, np.ndarray] | None, dict]:
    """Points with inside/outside labels: half within ~0.02 of the surface (where the
    marching-cubes level set must fall), a quarter within ~0.08, a quarter anywhere in the cube.
    Each also gets its signed distance to the surface and the colour the renderer shows at the
    nearest surface point (shaded, as seen from outside): a label for every point, not only a
    side, and colour supervision in 3D, where rays would mostly see background.

    -> (samples, labels). samples: points (N, 3) float16, inside (N,) bool, sdf (N,) float16
       (negative inside), colour (N, 3) uint8; None where the sides cannot be trusted (an open
       surface without a clear inside). labels: how sides were decided, `label_sides`' record.
    """
    n_near, n_wide = n_points // 2, n_points // 4
    n_uniform = n_points - n_near - n_wide
    surface, _ = trimesh.sample.sample_surface(mesh, n_near + n_wide, seed=rng)
    noise = rng.normal(size=(n_near + n_wide, 3))
    noise[:n_near] *= 0.02
    noise[n_near:] *= 0.08
    uniform = rng.uniform(-CUBE_RADIUS, CUBE_RADIUS, size=(n_uniform, 3))
    points = np.clip(np.concatenate([surface + noise, uniform]), -CUBE_RADIUS, CUBE_RADIUS)
    points = points.astype(np.float16).astype(np.float64)  # label the points as stored
    inside, labels = label_sides(mesh, points, n_near, rng)
    if inside is None:
        return None, labels

    # Nearest of dense surface samples rather than trimesh's exact closest_point (0.3 s for a
    # 5k-face mesh): within 0.002 of exact on average near the surface, 0.01 at the 99th
    # percentile (12 primitives), for ~10 ms
    dense, dense_faces = trimesh.sample.sample_surface(mesh, DENSE_SURFACE_SAMPLES, seed=rng)
    distance, nearest = cKDTree(dense).query(points)
    faces = dense_faces[nearest]
    shader = Shader(mesh) if shader is None else shader
    colour = shader.shade(faces, dense[nearest], -mesh.face_normals[faces])
    samples = {
        "points": points.astype(np.float16),
        "inside": inside,
        "sdf": np.where(inside, -distance, distance).astype(np.float16),
        "colour": np.round(colour * 255).astype(np.uint8),
    }
    return samples, labels


def _write_object_atomically(
    out_dir: Path,
    views: dict,
    cameras: dict,
    meta: dict,
    mesh: trimesh.Trimesh,
    occupancy: dict[str, np.ndarray] | None = None,
) -> None:
    """Write into a temporary sibling that then replaces `out_dir`: never a half-written
    object, and a full disk is reported as such (tsr.files.atomic_folder)."""
    with atomic_folder(out_dir) as temporary:
        (temporary / "rgba").mkdir()
        (temporary / "depth").mkdir()
        for v, (rgba, depth) in enumerate(zip(views["rgba"], views["depth"], strict=True)):
            Image.fromarray(rgba, mode="RGBA").save(temporary / "rgba" / f"{v:03d}.png")
            np.save(temporary / "depth" / f"{v:03d}.npy", depth)
        mesh.export(temporary / "mesh.glb")
        if occupancy is not None:
            np.savez(temporary / "occupancy.npz", **occupancy)
        _write_json(temporary / "cameras.json", cameras)
        _write_json(temporary / "meta.json", meta)
