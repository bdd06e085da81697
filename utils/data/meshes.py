"""Reading a mesh file into TripoSR's world: one triangle mesh, z up, and how it looks.

Only trimesh's loaders: no ray casting, no CAD kernel, so evaluation can read ground truth
without the dataset builder's libraries.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import trimesh

from utils.data.materials import UNTEXTURED_COLOUR, Appearance, appearance_of, concatenate

MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl")
GLTF_SUFFIXES = (".glb", ".gltf")


# y-up files (glTF's convention, pyrender's scenes) -> our z-up world: y becomes z, and the
# y-up "front" (+z, where a y-up front camera sits) becomes +x, where our view 0 sits.
Y_UP_TO_Z_UP = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
# glTF sampler wrap codes (OpenGL enums) -> materials.WRAP_MODES
GLTF_WRAP = {10497: "repeat", 33071: "clamp", 33648: "mirror"}


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


def input_up_axis(path: str | Path, flag: str) -> str:
    """The up axis of an input mesh file: y for glTF, whose specification says so, else `flag`
    (OBJ, PLY and STL do not say). The mesh.glb files prepare_object writes hold z-up
    coordinates: they are read with up="z" (load_mesh's default)."""
    return "y" if Path(path).suffix.lower() in GLTF_SUFFIXES else flag


def load_mesh(path: str | Path, up: str = "z") -> trimesh.Trimesh:
    """Read a mesh file as one triangle mesh in our z-up world, coloured per vertex (a preview
    of its materials: what viewers and evaluation need). See `read_mesh`."""
    mesh, appearance = read_mesh(path, up)
    if appearance.materials:  # some face has colours or a material
        colours = appearance.vertex_colours(mesh, np.asarray(UNTEXTURED_COLOUR))
        colours = np.round(colours * 255).astype(np.uint8)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colours)
    return mesh


def read_mesh(path: str | Path, up: str = "z") -> tuple[trimesh.Trimesh, Appearance]:
    """Read .obj/.glb/.gltf/.ply/.stl as one triangle mesh in our z-up world (no visual) and
    the appearance of its faces (materials, textures, colours; see utils.data.materials).

    A scene is flattened node by node with each primitive's material kept per face: joining
    the primitives' visuals instead would drop every material when one primitive has none.
    `up`: the file's up axis, "z" or "y" (for input files: `input_up_axis`).
    """
    path = Path(path)
    if up not in ("z", "y"):
        raise ValueError(f"up must be 'z' or 'y', got {up!r}")
    gltf = path.suffix.lower() in GLTF_SUFFIXES
    try:
        wraps = gltf_wrap_modes(path) if gltf else {}
        # unprocessed: processing silently drops faces at NaN vertices, which left a
        # one-triangle object where the file held a broken mesh (checked below instead)
        mesh, appearance = _flatten(trimesh.load_scene(path, process=False), wraps)
    except MeshLoadError:
        raise
    except Exception as error:  # trimesh raises many types for broken files; name the file
        raise MeshLoadError(
            f"{path}: cannot be read as a mesh ({type(error).__name__}: {error})"
        ) from error
    if mesh is None:
        raise MeshLoadError(f"{path}: holds no triangle mesh (empty, points or lines only)")
    if problem := geometry_problem(mesh):
        raise MeshLoadError(f"{path}: {problem}")
    if up == "y":
        rotation = np.eye(4)
        rotation[:3, :3] = Y_UP_TO_Z_UP
        mesh.apply_transform(rotation)
    return mesh, appearance


def _flatten(scene: trimesh.Scene, wraps: dict) -> tuple[trimesh.Trimesh | None, Appearance | None]:
    """Every triangle geometry instance in world coordinates, faces in order. -> mesh, look"""
    vertices, faces, parts, textures, offset = [], [], [], {}, 0
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geometry = scene.geometry[name]
        if not isinstance(geometry, trimesh.Trimesh) or len(geometry.faces) == 0:
            continue
        part_faces = np.asarray(geometry.faces)
        part = appearance_of(geometry, wraps, textures)
        if np.linalg.det(transform[:3, :3]) < 0:  # a mirroring node turns its faces inside out
            part_faces, part = part_faces[:, ::-1], part.reversed_corners()
        vertices.append(trimesh.transform_points(geometry.vertices, transform))
        faces.append(part_faces + offset)
        parts.append(part)
        offset += len(geometry.vertices)
    if not faces:
        return None, None
    mesh = trimesh.Trimesh(np.concatenate(vertices), np.concatenate(faces), process=False)
    mesh.merge_vertices()  # primitives and UV seams split vertices of one surface; faces stay
    return mesh, concatenate(parts)


def gltf_wrap_modes(path: Path) -> dict[str | None, tuple[str, str]]:
    """Base-colour texture wrap modes by material name, from the glTF JSON (trimesh drops
    samplers). Names with conflicting samplers are left out (-> repeat, glTF's default)."""
    if path.suffix.lower() == ".glb":
        with open(path, "rb") as file:
            _magic, _version, _length, chunk_length, _chunk_type = struct.unpack(
                "<4sII I4s", file.read(20)
            )
            header = json.loads(file.read(chunk_length))
    else:
        header = json.loads(path.read_text())
    samplers, textures = header.get("samplers", []), header.get("textures", [])
    modes: dict[str | None, set] = {}
    for material in header.get("materials", []):
        texture = material.get("pbrMetallicRoughness", {}).get("baseColorTexture")
        if texture is None:
            continue
        sampler_index = textures[texture["index"]].get("sampler")
        sampler = samplers[sampler_index] if sampler_index is not None else {}
        wrap = tuple(GLTF_WRAP.get(sampler.get(k, 10497), "repeat") for k in ("wrapS", "wrapT"))
        modes.setdefault(material.get("name"), set()).add(wrap)
    return {name: wrap.pop() for name, wrap in modes.items() if len(wrap) == 1}
