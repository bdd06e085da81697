"""Writing outputs: atomically, and under names that two inputs never share.

Every file is written to a temporary file in its own folder and renamed over the target
(`os.replace`), so a crash or a full disk leaves the previous file or none, never half of one,
and a viewer polling the folder never reads a partial mesh.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import trimesh
from PIL import Image
from trimesh.exchange.obj import export_obj
from trimesh.visual import TextureVisuals

from .files import write_bytes


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """A PIL image, atomically, in the format its suffix names."""
    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions()[Path(path).suffix.lower()])
    return write_bytes(path, buffer.getvalue())


def save_mesh(
    mesh: trimesh.Trimesh, path: str | os.PathLike, file_type: str | None = None
) -> list[Path]:
    """Write a mesh atomically as file_type (obj, glb, ply, stl; default: the path's suffix).

    Returns the files written. GLB embeds a texture. A textured OBJ also writes `<stem>.mtl` and `<stem>.png` beside it,
    named after the mesh so that meshes sharing a folder keep their own.
    """
    path = Path(path)
    file_type = file_type or path.suffix.lstrip(".").lower()
    extras: dict[str, bytes] = {}
    if file_type == "obj":
        if isinstance(mesh.visual, TextureVisuals):
            mesh = mesh.copy()  # the material's name becomes the texture's file name
            mesh.visual.material.name = path.stem
        text, extras = export_obj(mesh, return_texture=True, mtl_name=f"{path.stem}.mtl")
        data = text.encode()
    else:
        data = mesh.export(file_type=file_type)
    written = [write_bytes(path.with_name(name), content) for name, content in extras.items()]
    # The mesh last: it never names a material or a texture that is not there yet.
    written.append(write_bytes(path, data))
    return written


def output_names(paths: Sequence[Path]) -> list[str]:
    """A distinct output name per input file, the same for the same inputs in any order.

    The name is the file's stem, unless another input (a different file) has the same stem,
    compared case-insensitively for case-insensitive file systems (`a/x.png`, `b/X.jpg`): then
    every such input gets `<stem>-<8 hex digits of a hash of its absolute path>`. The same file
    given twice keeps one name: it is the same input.
    """
    resolved = [Path(p).resolve() for p in paths]
    files_per_stem = Counter(p.stem.casefold() for p in set(resolved))
    names = [
        p.stem
        if files_per_stem[p.stem.casefold()] == 1
        else f"{p.stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
        for p in resolved
    ]
    owners = {(name.casefold(), p) for name, p in zip(names, resolved, strict=True)}
    clashes = Counter(name for name, _ in owners)
    if any(count > 1 for count in clashes.values()):  # a stem that looks like a hashed name
        raise ValueError(f"inputs {[str(p) for p in paths]} give clashing output names {names}")
    return names
