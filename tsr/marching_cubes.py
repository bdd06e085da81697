"""Marching cubes on a dense volume, one function in front of three backends.

Every backend is called the way TripoSR calls torchmcubes: on the *level* volume
`density - threshold` (positive inside) at iso-value 0, and every backend's output is
brought to one convention: vertices in grid index units ordered (x, y, z) = (dim0, dim1,
dim2) of a volume indexed [x][y][z], and triangles that face outward (away from where the
level is positive).
"""

from __future__ import annotations

import importlib
from functools import cache

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# Preference order: torchmcubes runs on the GPU and is what TripoSR uses; PyMCubes gives the
# same mesh on the CPU; scikit-image is the fallback most environments already have.
BACKENDS = ("torchmcubes", "pymcubes", "skimage")
_MODULE_OF_BACKEND = {
    "torchmcubes": "torchmcubes",
    "pymcubes": "mcubes",
    "skimage": "skimage.measure",
}
_INSTALL_HINT = {
    "torchmcubes": "pip install git+https://github.com/tatsy/torchmcubes.git (needs a compiler)",
    "pymcubes": "pip install PyMCubes",
    "skimage": "pip install scikit-image",
}


@cache
def _backend_module(name: str):
    """The imported backend module, or None when it cannot be imported here."""
    try:
        return importlib.import_module(_MODULE_OF_BACKEND[name])
    except ImportError:
        return None


def available_backends() -> list[str]:
    """The backends importable here, in preference order (a subset of BACKENDS)."""
    return [name for name in BACKENDS if _backend_module(name) is not None]


def resolve_backend(backend: str = "auto") -> str:
    """`auto` -> the first available backend; a named one is checked to exist and import."""
    if backend == "auto":
        available = available_backends()
        if not available:
            hints = "; ".join(_INSTALL_HINT.values())
            raise ImportError(f"no marching-cubes backend is installed: {hints}")
        return available[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown marching-cubes backend {backend!r}: choose one of {BACKENDS}")
    if _backend_module(backend) is None:
        raise ImportError(
            f"marching-cubes backend {backend!r} cannot be imported: {_INSTALL_HINT[backend]}, "
            f"or use one of the installed backends {available_backends()}"
        )
    return backend


def crosses_zero(level: torch.Tensor | np.ndarray) -> bool:
    """Whether a level volume has values on both sides of 0, i.e. a surface can exist."""
    return bool(level.min() <= 0 and level.max() >= 0)


def marching_cubes_level(
    level: torch.Tensor, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Surface `level == 0` of a (X, Y, Z) level volume that is positive inside.

    Returns verts (V, 3) in grid index units (x, y, z) as the backend computed them
    (float64 for pymcubes, float32 otherwise) and outward faces (F, 3) int64.
    """
    backend = resolve_backend(backend)
    if level.ndim != 3:
        raise ValueError(f"marching cubes needs a 3-d volume, got shape {tuple(level.shape)}")
    if not crosses_zero(level):
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    module = _backend_module(backend)
    if backend == "torchmcubes":
        # torchmcubes reads vol[z][y][x] and returns (dim2, dim1, dim0); reversing the columns
        # gives (dim0, dim1, dim2) and, as in TripoSR, its faces then face outward.
        verts, faces = module.marching_cubes(level.to(torch.float32).contiguous(), 0.0)
        return verts[:, [2, 1, 0]].cpu().numpy(), faces.cpu().numpy().astype(np.int64)
    level_np = level.detach().cpu().numpy()
    if backend == "pymcubes":
        # PyMCubes returns (dim0, dim1, dim2), outward for a positive-inside volume.
        verts, faces = module.marching_cubes(level_np, 0.0)
        return verts, faces.astype(np.int64)
    # scikit-image's default gradient_direction="descent" winds its triangles inward for a
    # positive-inside volume (tested); "ascent" winds them outward.
    verts, faces, _normals, _values = module.marching_cubes(
        level_np, 0.0, method="lewiner", gradient_direction="ascent", allow_degenerate=False
    )
    return verts, faces.astype(np.int64)


def marching_cubes(
    volume: np.ndarray | torch.Tensor, threshold: float, backend: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Surface `volume == threshold` of an (X, Y, Z) volume indexed [x][y][z], inside > threshold.

    Returns verts (V, 3) float32 in grid index units (x, y, z) and faces (F, 3) int64 that
    face outward. The threshold is subtracted in float32 before the backend runs at level 0,
    as TripoSR does, so the vertices match its output bit for bit.
    """
    level = torch.as_tensor(volume, dtype=torch.float32) - float(threshold)
    verts, faces = marching_cubes_level(level, backend)
    return verts.astype(np.float32), faces


def weld_block_seams(verts: np.ndarray, faces: np.ndarray, seams: np.ndarray, tolerance: float):
    """Merge the copies of vertices on block seams (grid planes shared by two blocks).

    verts: (V, 3) float64 grid units. Two blocks interpolate a seam edge from its two ends in
    opposite orders, so copies may differ by a few ulps: they are matched within `tolerance`.
    """
    on_seam = np.isin(verts, seams).any(axis=1)
    seam_ids = np.flatnonzero(on_seam)
    pairs = cKDTree(verts[seam_ids]).query_pairs(tolerance, output_type="ndarray")
    if len(pairs) == 0:
        return verts, faces
    n = len(seam_ids)
    links = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, group = connected_components(links, directed=False)
    first_of_group = np.full(group.max() + 1, n)
    np.minimum.at(first_of_group, group, np.arange(n))
    representative = np.arange(len(verts))
    representative[seam_ids] = seam_ids[first_of_group[group]]
    keep = representative == np.arange(len(verts))
    new_index = np.cumsum(keep) - 1
    return verts[keep], new_index[representative[faces]]
