"""Reading a mesh file into TripoSR's world: one triangle mesh, z up, colours kept.

Only trimesh's loaders: no ray casting, no CAD kernel, so evaluation can read ground truth
without the dataset builder's libraries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh


MESH_SUFFIXES = (".obj", ".glb", ".ply", ".stl")


# y-up files (glTF's convention, pyrender's scenes) -> our z-up world: y becomes z, and the
# y-up "front" (+z, where a y-up front camera sits) becomes +x, where our view 0 sits.
Y_UP_TO_Z_UP = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


CONVENTION = (
    "TripoSR world: right-handed, z up. c2w is camera-to-world, OpenGL camera (columns right, "
    "up, -forward; looks down its -z). Pixel (row j, col i) has the unit ray through "
    "((i+0.5-W/2)/f, -(j+0.5-H/2)/f, -1), f = 0.5*H/tan(fovy/2). depth = distance along that "
    "unit ray, 0 = background."
)


class MeshLoadError(ValueError):
    """A file that cannot be used as a mesh; prepare_dataset names it and carries on."""


def _finite_faces(mesh: trimesh.Trimesh) -> bool:
    return len(mesh.faces) == 0 or bool(np.isfinite(mesh.vertices[mesh.faces]).all())


def geometry_problem(mesh: trimesh.Trimesh) -> str | None:
    """Why a mesh cannot be rendered into a dataset object, or None when it can."""
    if len(mesh.faces) == 0:
        return "has no triangles (empty or not a mesh file)"
    if not _finite_faces(mesh):
        return "vertices with NaN or inf coordinates; repair the file"
    if np.ptp(mesh.vertices, axis=0).max() <= 0 or not mesh.area > 0:
        return "degenerate geometry (every triangle has zero area)"
    return None


def load_mesh(path: str | Path, up: str = "z") -> trimesh.Trimesh:
    """Read .obj/.glb/.ply/.stl as one triangle mesh in our z-up world; textures -> colours."""
    path = Path(path)
    try:
        # unprocessed first: processing silently drops faces with NaN vertices, which left a
        # one-triangle object where the file held a broken mesh
        loaded = trimesh.load(path, force="mesh", process=False)
        if isinstance(loaded, trimesh.Trimesh) and _finite_faces(loaded):
            loaded.process()  # merge duplicate vertices, drop unused ones, as trimesh.load does
            if isinstance(loaded.visual, trimesh.visual.TextureVisuals):
                loaded.visual = loaded.visual.to_color()  # the renderer shades vertex colours
    except Exception as error:  # trimesh raises many types for broken files; name the file
        raise MeshLoadError(
            f"{path}: cannot be read as a mesh ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(loaded, trimesh.Trimesh):
        raise MeshLoadError(f"{path}: holds a {type(loaded).__name__}, not a triangle mesh")
    problem = geometry_problem(loaded)
    if problem:
        raise MeshLoadError(f"{path}: {problem}")
    if up == "y":
        rotation = np.eye(4)
        rotation[:3, :3] = Y_UP_TO_Z_UP
        loaded.apply_transform(rotation)
    elif up != "z":
        raise ValueError(f"up must be 'z' or 'y', got {up!r}")
    return loaded
