"""Texture baking on tiny synthetic inputs, each against an oracle that shares no code with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from trimesh.visual import TextureVisuals
from trimesh.visual.color import uv_to_color

from tsr import TSR
from tsr.bake import (
    _place_left_out_faces,
    bake,
    bake_texture,
    extend_charts,
    rasterize_uv,
    sample_texture,
)
from tsr.export import save_mesh

REPO = Path(__file__).resolve().parents[1]


def linear_colour(points):
    """A colour known everywhere: linear in position, inside (0, 1) on the test sphere."""
    return 0.5 + 0.7 * points


def texel_centre(row: int, column: int, n: int) -> tuple[float, float]:
    """UV of a texel's centre, written out from the convention (v up, row 0 at the top)."""
    return (column + 0.5) / n, 1.0 - (row + 0.5) / n


def contains(triangle, point, tolerance=1e-12) -> bool:
    """Closed point-in-triangle test by the signs of the three edge cross products."""
    signs = []
    for k in range(3):
        (ax, ay), (bx, by) = triangle[k], triangle[(k + 1) % 3]
        signs.append((bx - ax) * (point[1] - ay) - (by - ay) * (point[0] - ax))
    return all(s >= -tolerance for s in signs) or all(s <= tolerance for s in signs)


def grid_triangulation(cells: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Triangles tiling the unit square: grid lines through texel centres (so some centres lie
    exactly on shared edges), interior vertices jittered off them, diagonals chosen at random."""
    rng = np.random.default_rng(seed)
    ticks = np.concatenate([[0.0], (np.round(np.linspace(0, n, cells + 1)[1:-1]) + 0.5) / n, [1]])
    u, v = np.meshgrid(ticks, ticks, indexing="ij")
    uv = np.stack([u, v], axis=-1)  # (cells+1, cells+1, 2)
    interior = uv[1:-1, 1:-1]
    jitter = rng.random(interior.shape[:2]) < 0.5
    interior[jitter] += rng.uniform(-0.3, 0.3, (jitter.sum(), 2)) / cells
    index = np.arange((cells + 1) ** 2).reshape(cells + 1, cells + 1)
    faces = []
    for i in range(cells):
        for j in range(cells):
            a, b, c, d = index[i, j], index[i + 1, j], index[i + 1, j + 1], index[i, j + 1]
            faces += [[a, b, c], [a, c, d]] if rng.random() < 0.5 else [[a, b, d], [b, c, d]]
    return uv.reshape(-1, 2), np.array(faces)


@pytest.mark.parametrize(
    "case",
    ["tiling", "scattered"],
)
def test_rasteriser_gives_each_texel_inside_a_triangle_one_owner(case):
    n = 12
    if case == "tiling":  # every texel covered; centres on shared edges must not be lost
        uv, faces = grid_triangulation(cells=4, n=n, seed=0)
    else:  # separate, overlapping and mirrored triangles with empty texels between them
        rng = np.random.default_rng(1)
        uv = rng.random((15, 2))
        faces = np.arange(15).reshape(5, 3)
    face_index, barycentric = rasterize_uv(
        torch.from_numpy(uv), torch.from_numpy(faces), resolution=n
    )
    for row in range(n):
        for column in range(n):
            centre = texel_centre(row, column, n)
            owners = [f for f, face in enumerate(faces) if contains(uv[face], centre)]
            assert face_index[row, column].item() == (min(owners) if owners else -1)
            weights = barycentric[row, column].numpy()
            if owners:  # the weights rebuild the centre from the owner's corners
                assert weights.min() >= -1e-9 and weights.sum() == pytest.approx(1.0)
                np.testing.assert_allclose(weights @ uv[faces[min(owners)]], centre, atol=1e-9)
            else:
                assert (weights == 0).all()
    if case == "tiling":
        assert (face_index >= 0).all()


def test_seams_are_dilated_from_the_neighbouring_triangles():
    n = 10
    # A triangle covering a few texel centres (top right), and a sliver inside texel (row 9,
    # column 0) that covers none. Their dilated rings do not meet.
    uv = torch.tensor(
        [[0.5, 0.9], [0.9, 0.9], [0.5, 0.5], [0.03, 0.03], [0.07, 0.03], [0.05, 0.04]],
        dtype=torch.float64,
    )
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    face_index, _ = rasterize_uv(uv, faces, n)
    assert (face_index == 0).sum() > 0 and (face_index == 1).sum() == 0
    claimed, weights = extend_charts(face_index, uv, faces, steps=2)
    assert claimed[9, 0] == 1  # the sliver keeps a texel
    # Every empty texel within 2 texels (8-neighbourhood) of the triangle's texels is claimed.
    rows, columns = (face_index == 0).nonzero().T
    for row in range(n):
        for column in range(n):
            near = ((rows - row).abs().maximum((columns - column).abs()) <= 2).any()
            if face_index[row, column] == -1 and (row < 7 or column > 2):
                assert (claimed[row, column] == 0) == bool(near)
    # Their points lie on their triangles.
    assert len(weights) == ((claimed >= 0) & (face_index < 0)).sum()
    assert (weights >= 0).all() and torch.allclose(
        weights.sum(-1), torch.ones(len(weights)).double()
    )


def test_faces_xatlas_left_out_take_a_uv_from_a_chart():
    # Atlas output for input vertices 0..3: face 0 charted; face 1 (input vertices 2, 1, 3)
    # left out at (0, 0); input vertex 3 is in no chart, vertex 2 is (atlas vertex 2).
    vertex_map = np.array([0, 1, 2, 2, 1, 3])
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    uv = np.array([[0.2, 0.2], [0.6, 0.2], [0.4, 0.5], [0, 0], [0, 0], [0, 0]], np.float32)
    new_map, new_faces, new_uv = _place_left_out_faces(vertex_map, faces, uv)
    np.testing.assert_array_equal(new_map[new_faces], vertex_map[faces])  # same geometry
    np.testing.assert_array_equal(new_uv[new_faces[0]], uv[:3])  # charted face untouched
    np.testing.assert_allclose(new_uv[new_faces[1]], [[0.4, 0.5]] * 3)  # input vertex 2's UV
    assert len(new_map) == 6  # the three (0, 0) vertices replaced, none left unused


def surface_samples(mesh: trimesh.Trimesh, count: int, seed: int = 0):
    """Random points on the faces: (face index, barycentric weights, 3D point)."""
    rng = np.random.default_rng(seed)
    face = rng.integers(0, len(mesh.faces), count)
    weights = rng.dirichlet([1.0, 1.0, 1.0], count)
    points = np.einsum("nk,nkd->nd", weights, mesh.vertices[mesh.faces[face]])
    return face, weights, points


@pytest.fixture(scope="module")
def baked() -> trimesh.Trimesh:
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    return bake(sphere, linear_colour, resolution=128, device="cpu")


def test_baked_texture_reproduces_a_known_colour_on_the_surface(baked):
    face, weights, points = surface_samples(baked, 4000)
    uv = np.einsum("nk,nkd->nd", weights, baked.visual.uv[baked.faces[face]])
    texture = np.asarray(baked.visual.material.image)
    error = np.abs(sample_texture(texture, uv) - linear_colour(points))
    # uint8 storage alone gives up to 0.002; seams filled by dilation a few hundredths.
    assert error.mean() < 0.004 and error.max() < 0.05


def test_bake_keeps_the_geometry(baked):
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    # Seam vertices are split, the triangles themselves stay where they were, in order.
    np.testing.assert_allclose(baked.triangles, sphere.triangles)
    assert baked.visual.material.image.size == (128, 128)


@pytest.mark.parametrize("suffix", ["glb", "obj"])
def test_files_keep_the_texture(baked, tmp_path, suffix):
    written = save_mesh(baked, tmp_path / f"mesh.{suffix}")
    expected = {"glb": ["mesh.glb"], "obj": ["mesh.mtl", "mesh.obj", "mesh.png"]}[suffix]
    assert sorted(p.name for p in written) == expected == sorted(os.listdir(tmp_path))
    loaded = trimesh.load(tmp_path / f"mesh.{suffix}", force="mesh", process=False)
    assert isinstance(loaded.visual, TextureVisuals)
    material = loaded.visual.material
    image = material.baseColorTexture if suffix == "glb" else material.image
    assert image.size == (128, 128)
    if suffix == "glb":  # viewers multiply the texture by this factor: it must not darken it
        assert material.baseColorFactor is None or (material.baseColorFactor == 255).all()
    # trimesh's own lookup (nearest texel, its own convention) on the file read back: the
    # colours sit where the UVs point, in both formats' v conventions.
    face, weights, points = surface_samples(loaded, 2000)
    uv = np.einsum("nk,nkd->nd", weights, loaded.visual.uv[loaded.faces[face]])
    colours = uv_to_color(uv, image)[:, :3] / 255.0
    assert np.abs(colours - linear_colour(points)).mean() < 0.01


def test_an_empty_mesh_is_refused():
    with pytest.raises(ValueError, match="empty"):
        bake(trimesh.Trimesh(), linear_colour, resolution=16, device="cpu")


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)],
)
def test_triplane_queries_run_on_the_scene_codes_device(device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = TSR.from_pretrained("tiny").to(device)
    scene_code = torch.randn(3, 8, 16, 16, device=device)  # the tiny model's (3, C, 2P, 2P)
    seen = []
    query = model.renderer.query_triplane

    def recording_query(decoder, positions, triplane):
        seen.append((positions.device, triplane.device))
        return query(decoder, positions, triplane)

    monkeypatch.setattr(model.renderer, "query_triplane", recording_query)
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    textured = bake_texture(model, scene_code, sphere, resolution=32)
    assert seen and all(p == t == scene_code.device for p, t in seen)
    assert textured.visual.material.image.size == (32, 32)


def test_inference_lora_bakes_textures(tmp_path):
    """The course CLI's --bake-texture: a GLB with its texture, on the embedded tiny model."""
    out = tmp_path / "sphere.glb"
    done = subprocess.run(
        [sys.executable, "inference_lora.py", "--image_path", "examples/sphere.png",
         "--repo_root", "tiny", "--output", str(out), "--mc-resolution", "24",
         "--threshold", "0.4", "--no-remove-bg", "--bake-texture", "--texture-resolution", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = trimesh.load(out, force="mesh")
    assert loaded.visual.material.baseColorTexture.size == (64, 64)
